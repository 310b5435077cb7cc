"""1:1 evaluation on labelled pairs, in the terms of the LFW protocol and the FaceNet paper.

Input: `distances` (n,) squared L2 distances of labelled pairs, NaN where a face of the pair could not be found,
and `same` (n,) bool (True = same person). Missing pairs are COUNTED (`n_missing`, per label) and left out of every
rate; `accuracy_missing_as_errors` also shows accuracy when each missing pair counts as a wrong decision.

Definitions (a pair is accepted when distance <= threshold):
- TAR(t) = VAL(t) = TA(t) / P_same, FAR(t) = FA(t) / P_diff (FaceNet's VAL/FAR), FRR = 1 - TAR.
- ROC: (FAR, TAR) at every distinct distance; AUC is the trapezoid area with (0, 0) prepended (ties count 1/2,
  so AUC = P(d_same < d_diff) + P(d_same == d_diff) / 2).
- EER: where FAR = FRR, linearly interpolated between the two ROC points around the crossing; `eer_threshold`
  is interpolated the same way.
- Accuracy at t: (TA + TR) / (P_same + P_diff).
- k-fold accuracy (LFW protocol, k = 10): folds are formed deterministically, stratified and round-robin in input
  order: the i-th same pair (of those found) goes to fold i % k, the j-th different pair to fold j % k. For each
  fold, the threshold maximising accuracy on the other k-1 folds is chosen among the midpoints between consecutive
  distinct training distances (plus "accept none" / "accept all"); among equally good candidates the middle one
  is taken. It is then applied to the held-out fold. Mean and standard deviation over folds are reported.
- VAL@FAR (targets 1e-3, 1e-2 by default): threshold = the largest one whose FAR <= target
  (`calibration.threshold_for_far`), VAL measured there.
- Histograms of same and different distances on shared bin edges (for the plot).

Public surface: `roc_curve`, `auc`, `equal_error_rate`, `accuracy_at`, `kfold_accuracy`, `val_at_far`,
`distance_histograms`, `evaluate_pairs` -> `VerificationReport` (frozen; `to_dict()` is JSON-ready).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from app.matching.calibration import threshold_for_far
from app.matching.thresholds import DEFAULT_THRESHOLD

__all__ = [
    "EerPoint",
    "Histograms",
    "KFoldResult",
    "RocCurve",
    "ValAtFar",
    "VerificationReport",
    "accuracy_at",
    "auc",
    "distance_histograms",
    "equal_error_rate",
    "evaluate_pairs",
    "kfold_accuracy",
    "roc_curve",
    "split_pairs",
    "val_at_far",
]

FloatArray = NDArray[np.float64]

KFOLDS = 10  # the LFW protocol's 10-fold accuracy


def split_pairs(distances: ArrayLike, same: ArrayLike) -> tuple[FloatArray, FloatArray, int, int]:
    """(same distances, different distances, n_missing_same, n_missing_different); NaN distances are missing."""
    d = np.asarray(distances, dtype=np.float64).ravel()
    s = np.asarray(same, dtype=bool).ravel()
    if d.shape != s.shape:
        raise ValueError(f"distances and same must have the same length, got {d.size} and {s.size}")
    if np.any(np.isinf(d)) or np.any(d[~np.isnan(d)] < 0):
        raise ValueError("distances must be >= 0 and finite (NaN marks a missing face)")
    missing = np.isnan(d)
    return d[s & ~missing], d[~s & ~missing], int((s & missing).sum()), int((~s & missing).sum())


def _need_both(same_d: FloatArray, diff_d: FloatArray) -> None:
    if same_d.size == 0 or diff_d.size == 0:
        raise ValueError("need at least one same pair and one different pair with both faces found")


@dataclass(frozen=True)
class RocCurve:
    """ROC at every distinct distance (ascending): far[i], tar[i] are the rates when accepting d <= thresholds[i]."""

    thresholds: FloatArray
    far: FloatArray
    tar: FloatArray


def roc_curve(same_d: ArrayLike, diff_d: ArrayLike) -> RocCurve:
    """ROC of same/different distances (no NaN): FAR and TAR at each distinct distance."""
    s = np.sort(np.asarray(same_d, dtype=np.float64))
    f = np.sort(np.asarray(diff_d, dtype=np.float64))
    _need_both(s, f)
    t = np.unique(np.concatenate([s, f]))
    tar = np.searchsorted(s, t, side="right") / s.size
    far = np.searchsorted(f, t, side="right") / f.size
    return RocCurve(thresholds=t, far=far, tar=tar)


def auc(roc: RocCurve) -> float:
    """Area under the ROC (trapezoids from (0, 0) to (1, 1))."""
    far = np.concatenate([[0.0], roc.far])
    tar = np.concatenate([[0.0], roc.tar])
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0))


@dataclass(frozen=True)
class EerPoint:
    eer: float
    threshold: float


def equal_error_rate(roc: RocCurve) -> EerPoint:
    """EER: the rate where FAR = FRR, interpolated linearly between the ROC points on each side of the crossing."""
    far = np.concatenate([[0.0], roc.far])
    frr = np.concatenate([[1.0], 1.0 - roc.tar])
    thr = np.concatenate([[roc.thresholds[0]], roc.thresholds])
    gap = far - frr  # non-decreasing, from -1 to +1
    k = int(np.argmax(gap >= 0.0))  # first point where FAR >= FRR (exists: the last point has FAR = 1, FRR = 0)
    if gap[k] == 0.0 or k == 0:
        return EerPoint(eer=float(far[k]), threshold=float(thr[k]))
    w = -gap[k - 1] / (gap[k] - gap[k - 1])  # fraction of the way from point k-1 to point k
    eer = far[k - 1] + w * (far[k] - far[k - 1])
    return EerPoint(eer=float(eer), threshold=float(thr[k - 1] + w * (thr[k] - thr[k - 1])))


@dataclass(frozen=True)
class RatesAt:
    threshold: float
    accuracy: float
    tar: float
    far: float
    true_accepts: int
    false_accepts: int
    n_same: int
    n_different: int


def accuracy_at(same_d: ArrayLike, diff_d: ArrayLike, threshold: float) -> RatesAt:
    """Accuracy, TAR and FAR when accepting distance <= threshold."""
    s = np.asarray(same_d, dtype=np.float64)
    f = np.asarray(diff_d, dtype=np.float64)
    _need_both(s, f)
    ta = int(np.count_nonzero(s <= threshold))
    fa = int(np.count_nonzero(f <= threshold))
    return RatesAt(
        threshold=float(threshold),
        accuracy=(ta + f.size - fa) / (s.size + f.size),
        tar=ta / s.size,
        far=fa / f.size,
        true_accepts=ta,
        false_accepts=fa,
        n_same=int(s.size),
        n_different=int(f.size),
    )


def _best_threshold(d: FloatArray, same: NDArray[np.bool_]) -> float:
    """Threshold maximising accuracy on (d, same): midpoints between distinct values; ties -> the middle candidate."""
    order = np.argsort(d, kind="stable")
    ds, ys = d[order], same[order]
    n_diff = int((~ys).sum())
    # After accepting the first i+1 sorted distances: correct = same accepted + different rejected.
    correct = np.cumsum(ys) + (n_diff - np.cumsum(~ys))
    cut = np.flatnonzero(np.diff(ds) > 0)  # valid cuts: between distinct values
    cand_thr = np.concatenate([[np.nextafter(ds[0], -np.inf)], (ds[cut] + ds[cut + 1]) / 2.0, [ds[-1]]])
    cand_cor = np.concatenate([[n_diff], correct[cut], [correct[-1]]])
    best = np.flatnonzero(cand_cor == cand_cor.max())
    return float(cand_thr[best[(best.size - 1) // 2]])


@dataclass(frozen=True)
class KFoldResult:
    """LFW-protocol accuracy: threshold chosen on k-1 folds, accuracy measured on the held-out fold."""

    accuracies: tuple[float, ...]
    thresholds: tuple[float, ...]
    mean: float
    std: float
    n_folds: int


def fold_ids(same: ArrayLike, n_folds: int = KFOLDS) -> NDArray[np.int64]:
    """Fold of each pair: stratified round-robin in input order (i-th same pair -> i % k, j-th different -> j % k)."""
    s = np.asarray(same, dtype=bool).ravel()
    folds = np.empty(s.size, dtype=np.int64)
    folds[s] = np.arange(int(s.sum())) % n_folds
    folds[~s] = np.arange(int((~s).sum())) % n_folds
    return folds


def kfold_accuracy(distances: ArrayLike, same: ArrayLike, n_folds: int = KFOLDS) -> KFoldResult:
    """k-fold accuracy of found pairs (NaN distances are dropped first; see the module docstring for the folds)."""
    d = np.asarray(distances, dtype=np.float64).ravel()
    s = np.asarray(same, dtype=bool).ravel()
    keep = ~np.isnan(d)
    d, s = d[keep], s[keep]
    if n_folds < 2:
        raise ValueError("n_folds must be >= 2")
    if min(int(s.sum()), int((~s).sum())) < n_folds:
        raise ValueError(f"need at least {n_folds} same and {n_folds} different pairs for {n_folds}-fold accuracy")
    folds = fold_ids(s, n_folds)
    accs, thrs = [], []
    for k in range(n_folds):
        test = folds == k
        t = _best_threshold(d[~test], s[~test])
        accs.append(float(np.mean((d[test] <= t) == s[test])))
        thrs.append(t)
    return KFoldResult(tuple(accs), tuple(thrs), float(np.mean(accs)), float(np.std(accs)), n_folds)


@dataclass(frozen=True)
class ValAtFar:
    target_far: float
    threshold: float
    val: float
    far: float
    false_accepts: int
    n_different: int


def val_at_far(same_d: ArrayLike, diff_d: ArrayLike, target_far: float) -> ValAtFar:
    """FaceNet's VAL at a target FAR: at the largest threshold whose FAR <= target."""
    s = np.asarray(same_d, dtype=np.float64)
    f = np.asarray(diff_d, dtype=np.float64)
    _need_both(s, f)
    t = threshold_for_far(f, target_far)
    fa = int(np.count_nonzero(f <= t))
    return ValAtFar(float(target_far), t, float(np.mean(s <= t)), fa / f.size, fa, int(f.size))


@dataclass(frozen=True)
class Histograms:
    bin_edges: FloatArray
    same_counts: NDArray[np.int64]
    different_counts: NDArray[np.int64]


def distance_histograms(same_d: ArrayLike, diff_d: ArrayLike, *, bin_width: float = 0.02) -> Histograms:
    """Counts of same and different distances on shared bins [0, w), [w, 2w), ... up to the largest distance."""
    s = np.asarray(same_d, dtype=np.float64)
    f = np.asarray(diff_d, dtype=np.float64)
    top = max(float(np.max(s, initial=0.0)), float(np.max(f, initial=0.0)), bin_width)
    n_bins = math.floor(top / bin_width) + 1
    edges = np.arange(n_bins + 1, dtype=np.float64) * bin_width
    return Histograms(edges, np.histogram(s, edges)[0], np.histogram(f, edges)[0])


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


@dataclass(frozen=True)
class VerificationReport:
    """Everything `facegate eval` prints and plots. `to_dict()` is JSON-ready (numpy arrays become lists)."""

    n_pairs: int
    n_same: int
    n_different: int
    n_missing: int
    n_missing_same: int
    n_missing_different: int
    threshold: float
    at_threshold: RatesAt
    accuracy_missing_as_errors: float
    auc: float
    eer: EerPoint
    kfold: KFoldResult
    val_at_far: tuple[ValAtFar, ...]
    histograms: Histograms
    roc: RocCurve = field(repr=False)

    def to_dict(self, *, roc_points: int = 200) -> dict[str, Any]:
        """JSON-ready dict; the ROC is thinned to about `roc_points` points (the AUC/EER use all of them)."""
        idx = np.unique(np.linspace(0, self.roc.thresholds.size - 1, min(roc_points, self.roc.thresholds.size)).round().astype(int))
        out: dict[str, Any] = _jsonable(
            {
                "n_pairs": self.n_pairs,
                "n_same": self.n_same,
                "n_different": self.n_different,
                "n_missing": self.n_missing,
                "n_missing_same": self.n_missing_same,
                "n_missing_different": self.n_missing_different,
                "threshold": self.threshold,
                "at_threshold": vars(self.at_threshold),
                "accuracy_missing_as_errors": self.accuracy_missing_as_errors,
                "auc": self.auc,
                "eer": vars(self.eer),
                "kfold": vars(self.kfold),
                "val_at_far": [vars(v) for v in self.val_at_far],
                "histograms": vars(self.histograms),
                "roc": {"thresholds": self.roc.thresholds[idx], "far": self.roc.far[idx], "tar": self.roc.tar[idx]},
            }
        )
        return out


def evaluate_pairs(
    distances: ArrayLike,
    same: ArrayLike,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    n_folds: int = KFOLDS,
    far_targets: tuple[float, ...] = (1e-3, 1e-2),
    bin_width: float = 0.02,
) -> VerificationReport:
    """The full 1:1 report for labelled pairs (NaN distance = a face not found: counted, not used in the rates)."""
    same_d, diff_d, miss_s, miss_f = split_pairs(distances, same)
    roc = roc_curve(same_d, diff_d)
    at = accuracy_at(same_d, diff_d, threshold)
    n_pairs = same_d.size + diff_d.size + miss_s + miss_f
    correct = round(at.accuracy * (same_d.size + diff_d.size))
    d = np.asarray(distances, dtype=np.float64).ravel()
    return VerificationReport(
        n_pairs=n_pairs,
        n_same=int(same_d.size + miss_s),
        n_different=int(diff_d.size + miss_f),
        n_missing=miss_s + miss_f,
        n_missing_same=miss_s,
        n_missing_different=miss_f,
        threshold=float(threshold),
        at_threshold=at,
        accuracy_missing_as_errors=correct / n_pairs,
        auc=auc(roc),
        eer=equal_error_rate(roc),
        kfold=kfold_accuracy(d, np.asarray(same, dtype=bool).ravel(), n_folds),
        val_at_far=tuple(val_at_far(same_d, diff_d, f) for f in far_targets),
        histograms=distance_histograms(same_d, diff_d, bin_width=bin_width),
        roc=roc,
    )
