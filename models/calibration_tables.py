"""Regenerate the two tables shipped in app/matching/data/ from labelled photos, with facegate's own pipeline.

    [FACEGATE_EMBEDDING__FLIP=true] python -m models.calibration_tables --faces DIR [--out DIR] [--cache FILE]

DIR holds `dev/` (53 people, 476 photos, with `pairs.csv`) and `lfw-dev/` (828 LFW people), one folder per person (the
project's ../shared/faces). Every photo of both sets is embedded with the built models (`make models`) through
`Pipeline.embed_photo(face="largest")` on the CPU provider, with the detection settings of the environment
(FACEGATE_*; the shipped tables use the defaults). Photos without a usable face get no embedding: pairs that
involve one are counted in the table's `n_missing`; such photos are no reference strangers.

- `default_calibration.json` (1:1: FAR, VAL and FAR's upper 97.5 % bound per threshold 0.00..1.20, step 0.01,
  behind every response's `far_estimate`) comes from the DEV pairs, `dev/pairs.csv`
  (`app.matching.calibration.compute_default_table`).
- `openset.json` (1:N: stranger-score quantiles per gallery size and FPIR, behind /identify's acceptance) comes
  from LFW-DEV: every photo against the first photo of every other person, leave-one-identity-out
  (`app.matching.openset.leave_one_identity_out`, then `build_model` with 128 seeded draws per photo).

With FACEGATE_EMBEDDING__FLIP=true the same run makes the tables of the mirror-averaged embeddings, keyed
"<network>+flip", into app/matching/data/flip/ (the service picks the folder of its variant).

The two sets are kept apart on purpose: the 1:N rule is calibrated on lfw-dev, so dev stays an independent check
of it (issue 9: calibrated on lfw-dev, FPIR <= 3 % on dev).

Deterministic: the same models, photos and settings give byte-identical files (the simulation is seeded). It takes
minutes (about 2 for dev and 6 for lfw-dev on 2 busy cores): `--cache` keeps the embeddings between runs
(app.evaluate.EmbeddingCache: reused only for the same model and detection settings and unchanged files). Not
part of `make models`, which must not need the photos: rerun it whenever the models or the vision path change,
and commit both files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from app.config import (
    DetectorSettings,
    ImageSettings,
    Provider,
    RuntimeSettings,
    Settings,
)
from app.evaluate import (
    Embedded,
    EmbeddingCache,
    embed_photos,
    pipeline_signature,
    read_pairs,
)
from app.identify_eval import person_photos
from app.matching.calibration import (
    CalibrationTable,
    compute_default_table,
)
from app.matching.data_files import OPENSET_FILE, TABLE_FILE, data_dir
from app.matching.distances import pairwise_squared_l2
from app.matching.openset import (
    OpenSetModel,
    build_model,
    leave_one_identity_out,
)
from app.vision.pipeline import Pipeline

DEV = "dev"
LFW = "lfw-dev"
OPENSET_DRAWS = 128  # simulated galleries per reference photo and gallery size
TAIL_CHOICE = (
    "local exponent k(u) = a + b ln(1/u) fitted to pooled Hill estimates at depths m/(2M), m = 3..160; checked on "
    "held-out galleries (notes/openset.md)"
)


def _settings_note(settings: Settings) -> str:
    default = settings.detector == DetectorSettings() and settings.image == ImageSettings()
    flip = ", mirror-averaged (embedding.flip)" if settings.embedding.flip else ""
    return f"{'default' if default else 'non-default'} settings{flip}, CPU, largest face; python -m models.calibration_tables"


def embed_set(
    pipeline: Pipeline, faces: Path, name: str, cache: EmbeddingCache | None
) -> tuple[list[str], dict[str, Embedded]]:
    """Every photo of faces/name ("person/file", sorted by person then file), keyed "name/person/file"."""
    photos = person_photos(faces / name)
    keys = [f"{name}/{p}" for p in photos]
    start, done = time.monotonic(), 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if done % 100 == 0 or done == len(keys):
            print(f"{name}: {done}/{len(keys)} photos, {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)

    embedded = embed_photos(pipeline, faces, keys, cache=cache, progress=progress)
    return photos, {p: embedded[k] for p, k in zip(photos, keys, strict=True)}


def calibration_table(faces: Path, embedded: dict[str, Embedded], *, model_name: str, note: str) -> CalibrationTable:
    pairs = read_pairs(faces / DEV / "pairs.csv")
    a = np.stack([embedded[p.img_a].embedding for p in pairs])
    b = np.stack([embedded[p.img_b].embedding for p in pairs])
    return compute_default_table(
        pairwise_squared_l2(a, b),
        np.array([p.same for p in pairs]),
        model_version=model_name,
        source=f"dev pairs (../shared/faces/dev/pairs.csv) embedded with facegate's pipeline ({note})",
        meta={"pairs_file": "dev/pairs.csv", "grid": "0.00..1.20 step 0.01"},
    )


def openset_model(photos: list[str], embedded: dict[str, Embedded], *, model_name: str, note: str) -> OpenSetModel:
    found = [p for p in photos if not embedded[p].error]
    people = {p.split("/", 1)[0] for p in photos}
    reference = leave_one_identity_out(
        np.stack([embedded[p].embedding for p in found]), [p.split("/", 1)[0] for p in found], found
    )
    return build_model(
        reference,
        draws=OPENSET_DRAWS,
        meta={
            "model_name": model_name,
            "reference": f"lfw-dev ({len(people)} identities, {len(photos):,} photos), leave-one-identity-out",
            "embeddings": f"facegate pipeline ({note})",
            "tail_choice": TAIL_CHOICE,
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=Path, required=True, help="folder holding dev/ (with pairs.csv) and lfw-dev/")
    parser.add_argument("--out", type=Path, help="where the two JSON files go (default: the package's, per variant)")
    parser.add_argument("--cache", type=Path, help="embeddings .npz kept between runs (created if missing)")
    args = parser.parse_args(argv)

    settings = Settings(runtime=RuntimeSettings(providers=[Provider.CPU]))
    pipeline = Pipeline.from_settings(settings)
    pipeline.load()
    model_name = pipeline.embedding_name  # "+flip" with FACEGATE_EMBEDDING__FLIP: those tables go to data/flip/
    out = args.out or data_dir(pipeline.flip)
    note = _settings_note(settings)
    cache = (
        EmbeddingCache.load(args.cache, pipeline_signature(pipeline.model_version, settings.detector))
        if args.cache
        else None
    )
    try:
        dev_photos, dev = embed_set(pipeline, args.faces, DEV, cache)
        lfw_photos, lfw = embed_set(pipeline, args.faces, LFW, cache)
    finally:
        if cache is not None:
            cache.save(args.cache)
    for name, photos, embedded in ((DEV, dev_photos, dev), (LFW, lfw_photos, lfw)):
        missing = sorted(p for p in photos if embedded[p].error)
        print(f"{name}: {len(photos)} photos, {len(missing)} without a face {missing}", file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    table = calibration_table(args.faces, dev, model_name=model_name, note=note)
    table.save(out / TABLE_FILE)
    model = openset_model(lfw_photos, lfw, model_name=model_name, note=note)
    model.save(out / OPENSET_FILE)
    print(f"wrote {out / TABLE_FILE} and {out / OPENSET_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
