"""PNG plots for `facegate eval` and `facegate eval-identify` (matplotlib, Agg backend, imported lazily).

- `plot_verification(report, path)`: ROC (TAR vs FAR, log FAR axis) beside both distance histograms (same /
  different person) with the threshold marked. `report` is an `evaluation.VerificationReport`.
- `plot_identification(report, path)`: DIR vs FPIR (log axis) for each rule of an
  `openset_eval.IdentificationReport`, with the default operating point marked.

matplotlib is an optional dependency (extra `report`); importing this module does not import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.names import printable

if TYPE_CHECKING:
    from app.matching.evaluation import VerificationReport
    from app.matching.openset_eval import IdentificationReport

__all__ = ["plot_identification", "plot_verification"]


def _drawable(title: str) -> str:
    """A title (it names a file or folder) as matplotlib draws it literally: what lies between two `$` is TeX to
    it, and a name like `run_$5_$.csv` made the report fail (a mathtext ValueError) after every photo was embedded."""
    return printable(title).replace("$", r"\$")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_verification(report: VerificationReport, path: Path, *, title: str = "facegate 1:1") -> Path:
    """Write the ROC + distance histograms PNG; returns `path`."""
    plt = _pyplot()
    fig, (ax_roc, ax_hist) = plt.subplots(1, 2, figsize=(12, 4.8))
    try:
        far = np.maximum(report.roc.far, 1e-6)
        ax_roc.plot(far, report.roc.tar, color="tab:blue")
        at = report.at_threshold
        ax_roc.scatter([max(at.far, 1e-6)], [at.tar], color="tab:red", zorder=3, label=f"threshold {report.threshold:g}")
        for v in report.val_at_far:
            ax_roc.scatter([v.target_far], [v.val], marker="x", color="black", zorder=3)
            ax_roc.annotate(f"VAL {v.val:.3f} @ FAR {v.target_far:g}", (v.target_far, v.val), textcoords="offset points", xytext=(5, -12), fontsize=8)
        ax_roc.set_xscale("log")
        ax_roc.set_xlim(1e-5, 1.0)
        ax_roc.set_ylim(0.0, 1.01)
        ax_roc.set_xlabel("FAR (false accept rate)")
        ax_roc.set_ylabel("TAR = VAL")
        ax_roc.set_title(f"ROC  AUC {report.auc:.4f}  EER {report.eer.eer:.3%}  10-fold acc {report.kfold.mean:.2%}")
        ax_roc.grid(True, which="both", alpha=0.3)
        ax_roc.legend(loc="lower right")

        h = report.histograms
        centres = (h.bin_edges[:-1] + h.bin_edges[1:]) / 2
        width = float(h.bin_edges[1] - h.bin_edges[0])
        same = h.same_counts / max(int(h.same_counts.sum()), 1)
        diff = h.different_counts / max(int(h.different_counts.sum()), 1)
        ax_hist.bar(centres, same, width=width, alpha=0.6, color="tab:green", label=f"same person ({report.at_threshold.n_same})")
        ax_hist.bar(centres, diff, width=width, alpha=0.6, color="tab:orange", label=f"different people ({report.at_threshold.n_different})")
        ax_hist.axvline(report.threshold, color="tab:red", linestyle="--", label=f"threshold {report.threshold:g}")
        ax_hist.set_xlabel("squared L2 distance")
        ax_hist.set_ylabel("share of pairs")
        missing = f", {report.n_missing} pairs without a face" if report.n_missing else ""
        ax_hist.set_title(f"Distance distributions{missing}")
        ax_hist.legend()
        fig.suptitle(_drawable(title))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


_FPIR_FLOOR = 1e-3  # the DIR-vs-FPIR plot's left edge (a log axis has no 0)


def _point_label(name: str, point: dict[str, Any]) -> str:
    """A marked operating point's legend entry with its measured FPIR and DIR: one under the axis' left edge (0 % on a
    small set of strangers, as on dev) is drawn on that edge, where without its figures it read as an FPIR of 0.1 %."""
    fpir = point["fpir"]
    edge = f", drawn at {_FPIR_FLOOR:.1%}" if fpir < _FPIR_FLOOR else ""
    return f"{name}: FPIR {fpir:.2%}{edge}, DIR {point['dir']:.1%}"


def plot_identification(report: IdentificationReport, path: Path, *, title: str = "facegate 1:N open set") -> Path:
    """Write the DIR-vs-FPIR PNG (one curve per rule, default operating point marked); returns `path`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    try:
        colours = {"raw": "tab:gray", "ratio": "tab:orange", "facegate": "tab:blue"}
        for rule, curve in report.curves.items():
            at1 = report.dir_at_fpir[rule].get("0.01")
            label = f"{rule}" + (f" (DIR {at1:.1%} @ FPIR 1%)" if at1 is not None else "")
            ax.plot(curve["fpir"], curve["dir"], label=label, color=colours.get(rule))
        p = report.default_point
        ax.scatter(
            [max(p["fpir"], _FPIR_FLOOR)], [p["dir"]], color="tab:red", zorder=3,
            label=_point_label(f"facegate default (target FPIR {p['target_fpir']:g}, N={p['gallery_size']})", p),
        )
        rp = report.raw_threshold_point
        ax.scatter(
            [max(rp["fpir"], _FPIR_FLOOR)], [rp["dir"]], color="black", marker="x", zorder=3,
            label=_point_label(f"raw rule at {rp['threshold']:g}", rp),
        )
        ax.axhline(report.rank1, color="black", linewidth=0.8, linestyle=":", label=f"rank-1 ceiling {report.rank1:.1%}")
        ax.set_xscale("log")
        ax.set_xlim(_FPIR_FLOOR, 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("FPIR (strangers matched to someone)")
        ax.set_ylabel("DIR (enrolled people identified correctly)")
        ax.set_title(f"{_drawable(title)}: {report.n_enrolled} enrolled, {report.n_probes} probes, {report.n_strangers} strangers", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)
