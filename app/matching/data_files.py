"""The calibrations shipped with the package (app/matching/data/), one folder per embedding variant.

Both are measured on embeddings made one way: `data/` for the embedder's own output, `data/flip/` for each face's
embedding averaged with its mirror image's (FACEGATE_EMBEDDING__FLIP), whose distances are smaller. Regenerated
by `python -m models.calibration_tables` (with FACEGATE_EMBEDDING__FLIP=true for `flip/`).
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
TABLE_FILE = "default_calibration.json"  # 1:1: FAR / VAL per threshold (app.matching.calibration)
OPENSET_FILE = "openset.json"  # 1:N: stranger-score quantiles per gallery size (app.matching.openset)


def data_dir(flip: bool) -> Path:
    """Where the calibrations of the plain (`flip` False) or mirror-averaged embeddings are."""
    return DATA_DIR / "flip" if flip else DATA_DIR
