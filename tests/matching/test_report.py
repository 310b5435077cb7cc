"""The PNG plots are written (matplotlib Agg), and importing the module does not import matplotlib."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.matching.evaluation import evaluate_pairs
from app.matching.openset import load_default_model
from app.matching.openset_eval import evaluate_identification

PNG = b"\x89PNG\r\n\x1a\n"


def test_import_is_lazy() -> None:
    code = "import sys, app.matching.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from app.matching.report import plot_identification, plot_verification

    rng = np.random.default_rng(0)
    d = np.concatenate([rng.normal(0.2, 0.05, 300), rng.normal(0.7, 0.1, 3000), [np.nan]])
    same = np.concatenate([np.ones(300, bool), np.zeros(3001, bool)])
    out = plot_verification(evaluate_pairs(np.abs(d), same), tmp_path / "roc.png")
    assert out.read_bytes()[:8] == PNG

    centres = rng.normal(size=(20, 128)).astype(np.float32) * 0.1
    rep = evaluate_identification(
        centres[:10], list(range(10)), centres[:10] + 0.005, list(range(10)), centres[10:], model=load_default_model()
    )
    out2 = plot_identification(rep, tmp_path / "dir.png")
    assert out2.read_bytes()[:8] == PNG
    assert out2.stat().st_size > 10_000


def test_a_marked_point_says_its_fpir_when_drawn_on_the_axis_edge() -> None:
    """The default point of dev (FPIR 0 %) sat on the plot's left edge, 0.1 %, with no figure saying it was 0 %."""
    from app.matching.report import _point_label

    assert _point_label("facegate default", {"fpir": 0.0, "dir": 0.603}) == (
        "facegate default: FPIR 0.00%, drawn at 0.1%, DIR 60.3%"
    )
    assert _point_label("raw rule at 0.36", {"fpir": 0.116, "dir": 0.799}) == "raw rule at 0.36: FPIR 11.60%, DIR 79.9%"
