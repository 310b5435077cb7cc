"""Choosing a 1:1 threshold from data: threshold for a target FAR, its VAL, confidence intervals, calibration tables.

- `threshold_for_far(diff_distances, target_far)`: the LARGEST threshold whose FAR <= target. With the n different
  distances sorted d(1) <= ... <= d(n) and k = floor(target * n) false accepts allowed, that is the largest float
  below d(k+1) (accepting d <= t, so d(k+1) itself is rejected). NaN distances are ignored.
- `calibrate_far(same_distances, diff_distances, target_far)` -> `FarCalibration`: the threshold, the FAR and VAL
  measured there, and binomial confidence intervals for both from the number of pairs (Clopper-Pearson by default,
  Wilson on request). Caveats: pairs that share photos or people are not independent, so the intervals are
  optimistic; the Clopper-Pearson UPPER bound on FAR is also the right bound for the selected threshold, since the
  true FAR at the (k+1)-th smallest impostor distance is Beta(k+1, n-k) distributed.
- `CalibrationTable`: a grid threshold -> FAR, VAL (+ FAR's upper confidence bound), JSON round-trip
  (`to_dict` / `from_dict` / `save` / `load`), `far_at(t)` / `val_at(t)` / `far_upper_at(t)` by linear
  interpolation (clamped to the grid's ends).
- `compute_default_table(distances, same, *, model_version, source)`: the table for labelled pairs (NaN = missing,
  counted). `load_default_table()` reads the shipped `app/matching/data/default_calibration.json`
  (dev pairs; see its `source` field for the embeddings it was computed with).
- `pairs_from_gallery(identity_ids, embeddings)` -> `GalleryPairs`: same/different pairs among the gallery
  identities with >= 2 faces, for `/calibrate` on a live gallery.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from app.matching.data_files import DATA_DIR, TABLE_FILE
from app.matching.distances import pairwise_squared_l2
from app.matching.thresholds import MAX_THRESHOLD, validate_rate

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_TABLE_PATH",
    "CalibrationTable",
    "FarCalibration",
    "GalleryPairs",
    "IntervalMethod",
    "binomial_interval",
    "calibrate_far",
    "compute_default_table",
    "load_default_table",
    "pairs_from_gallery",
    "threshold_for_far",
]

DEFAULT_TABLE_PATH = DATA_DIR / TABLE_FILE
DEFAULT_GRID = np.round(np.arange(0.0, 1.2 + 1e-9, 0.01), 2)


class IntervalMethod(StrEnum):
    CLOPPER_PEARSON = "clopper-pearson"  # exact (conservative), good for the few false accepts at low FAR
    WILSON = "wilson"  # score interval, closed form


# ---------------------------------------------------------------------------- binomial confidence intervals


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of Beta(a, b) by bisection on I_x(a, b) (monotone in x)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return (lo + hi) / 2.0


def binomial_interval(
    successes: int, trials: int, *, confidence: float = 0.95, method: IntervalMethod = IntervalMethod.CLOPPER_PEARSON
) -> tuple[float, float]:
    """Two-sided confidence interval for a proportion successes/trials (e.g. false accepts / different pairs)."""
    k, n = int(successes), int(trials)
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {k}/{n}")
    alpha = 1.0 - validate_rate(confidence, "confidence")
    method = IntervalMethod(method)
    if method is IntervalMethod.CLOPPER_PEARSON:
        lo = 0.0 if k == 0 else _beta_ppf(alpha / 2.0, k, n - k + 1)
        hi = 1.0 if k == n else _beta_ppf(1.0 - alpha / 2.0, k + 1, n - k)
        return lo, hi
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------------- threshold for a target FAR


def threshold_for_far(diff_distances: ArrayLike, target_far: float) -> float:
    """Largest threshold t with FAR(t) = #(d <= t) / n <= target_far over the different-person distances."""
    target = validate_rate(target_far, "target_far")
    d = np.asarray(diff_distances, dtype=np.float64).ravel()
    d = np.sort(d[~np.isnan(d)])
    if d.size == 0:
        raise ValueError("need at least one different-person distance")
    allowed = min(most_allowed(target, d.size), d.size - 1)  # fewer than n: target < 1
    return float(np.nextafter(d[allowed], -np.inf))


def most_allowed(rate: float, n: int) -> int:
    """The largest k <= n with k / n <= rate: how many of n impostors a rate lets in, compared as the reported rate
    (k / n) is. floor(rate * n) can be one off either way in float (0.29 * 100 is 28.999999999999996), and a fixed
    slack would let k / n pass a rate just below it (n = 3, rate 0.3333333333: 1/3 is over it)."""
    k = min(math.floor(rate * n), n)
    while k < n and (k + 1) / n <= rate:
        k += 1
    while k > 0 and k / n > rate:
        k -= 1
    return k


@dataclass(frozen=True)
class FarCalibration:
    """The threshold for a target FAR, with what it gives and how sure we are (`confidence`-level intervals)."""

    target_far: float
    threshold: float
    far: float
    far_interval: tuple[float, float]
    val: float
    val_interval: tuple[float, float]
    false_accepts: int
    true_accepts: int
    n_same: int
    n_different: int
    confidence: float
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}

    def unusable(self) -> str | None:
        """Why this threshold cannot be used to decide anything (None when it can): at or below 0 (the nearest
        different pairs are at distance 0), or over MAX_THRESHOLD, which no real pair reaches (raw dlib embeddings,
        norms 1.2-1.7, are at most ~1.5 apart; a head's unit-norm ones at most 4)."""
        if not self.threshold > 0:
            return (
                f"no threshold above 0 keeps the FAR at or below {self.target_far:g} on these pairs "
                f"({self.n_different} different pairs; the nearest are at distance 0)"
            )
        if self.threshold > MAX_THRESHOLD:
            return (
                f"the threshold for FAR {self.target_far:g} on these pairs, {self.threshold:g}, is over "
                f"{MAX_THRESHOLD:g}: not a usable threshold"
            )
        return None


def calibrate_far(
    same_distances: ArrayLike,
    diff_distances: ArrayLike,
    target_far: float,
    *,
    confidence: float = 0.95,
    method: IntervalMethod = IntervalMethod.CLOPPER_PEARSON,
) -> FarCalibration:
    """Threshold for `target_far` (see `threshold_for_far`), VAL there, and binomial intervals on FAR and VAL."""
    s = np.asarray(same_distances, dtype=np.float64).ravel()
    f = np.asarray(diff_distances, dtype=np.float64).ravel()
    s, f = s[~np.isnan(s)], f[~np.isnan(f)]
    if s.size == 0 or f.size == 0:
        raise ValueError("need at least one same pair and one different pair")
    t = threshold_for_far(f, target_far)
    fa = int(np.count_nonzero(f <= t))
    ta = int(np.count_nonzero(s <= t))
    return FarCalibration(
        target_far=float(target_far),
        threshold=t,
        far=fa / f.size,
        far_interval=binomial_interval(fa, f.size, confidence=confidence, method=method),
        val=ta / s.size,
        val_interval=binomial_interval(ta, s.size, confidence=confidence, method=method),
        false_accepts=fa,
        true_accepts=ta,
        n_same=int(s.size),
        n_different=int(f.size),
        confidence=float(confidence),
        method=str(IntervalMethod(method)),
    )


# ---------------------------------------------------------------------------- calibration table


@dataclass(frozen=True)
class CalibrationTable:
    """FAR and VAL measured on labelled pairs at a grid of thresholds (ascending)."""

    thresholds: NDArray[np.float64]
    far: NDArray[np.float64]
    val: NDArray[np.float64]
    far_upper: NDArray[np.float64]  # one-sided 97.5 % Clopper-Pearson upper bound on FAR at each threshold
    n_same: int
    n_different: int
    n_missing: int = 0
    model_version: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = np.asarray(self.thresholds, dtype=np.float64)
        if t.ndim != 1 or t.size < 2 or np.any(np.diff(t) <= 0):
            raise ValueError("thresholds must be a strictly increasing 1-d grid of at least 2 points")
        for name in ("far", "val", "far_upper"):
            if np.asarray(getattr(self, name)).shape != t.shape:
                raise ValueError(f"{name} must have one value per threshold")

    def far_at(self, threshold: float) -> float:
        """Estimated FAR at `threshold` (linear interpolation on the grid; clamped beyond its ends)."""
        return float(np.interp(threshold, self.thresholds, self.far))

    def val_at(self, threshold: float) -> float:
        return float(np.interp(threshold, self.thresholds, self.val))

    def far_upper_at(self, threshold: float) -> float:
        return float(np.interp(threshold, self.thresholds, self.far_upper))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "source": self.source,
            "n_same": self.n_same,
            "n_different": self.n_different,
            "n_missing": self.n_missing,
            "meta": self.meta,
            "columns": ["threshold", "far", "val", "far_upper"],
            "rows": [
                [round(float(t), 6), float(f), float(v), float(u)]
                for t, f, v, u in zip(self.thresholds, self.far, self.val, self.far_upper, strict=True)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationTable:
        rows = np.asarray(data["rows"], dtype=np.float64)
        return cls(
            thresholds=rows[:, 0],
            far=rows[:, 1],
            val=rows[:, 2],
            far_upper=rows[:, 3],
            n_same=int(data["n_same"]),
            n_different=int(data["n_different"]),
            n_missing=int(data.get("n_missing", 0)),
            model_version=str(data.get("model_version", "")),
            source=str(data.get("source", "")),
            meta=dict(data.get("meta", {})),
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> CalibrationTable:
        return cls.from_dict(json.loads(Path(path).read_text()))


def compute_default_table(
    distances: ArrayLike,
    same: ArrayLike,
    *,
    model_version: str = "",
    source: str = "",
    grid: ArrayLike = DEFAULT_GRID,
    meta: dict[str, Any] | None = None,
) -> CalibrationTable:
    """Calibration table of labelled pairs (NaN distance = a face not found: counted in n_missing, not used)."""
    d = np.asarray(distances, dtype=np.float64).ravel()
    s = np.asarray(same, dtype=bool).ravel()
    if d.shape != s.shape:
        raise ValueError("distances and same must have the same length")
    missing = np.isnan(d)
    same_d = np.sort(d[s & ~missing])
    diff_d = np.sort(d[~s & ~missing])
    if same_d.size == 0 or diff_d.size == 0:
        raise ValueError("need at least one same pair and one different pair with both faces found")
    t = np.asarray(grid, dtype=np.float64)
    fa = np.searchsorted(diff_d, t, side="right")
    ta = np.searchsorted(same_d, t, side="right")
    upper = np.array([binomial_interval(int(k), diff_d.size)[1] for k in fa])
    return CalibrationTable(
        thresholds=t,
        far=fa / diff_d.size,
        val=ta / same_d.size,
        far_upper=upper,
        n_same=int(same_d.size),
        n_different=int(diff_d.size),
        n_missing=int(missing.sum()),
        model_version=model_version,
        source=source,
        meta=dict(meta or {}),
    )


def load_default_table(path: Path = DEFAULT_TABLE_PATH) -> CalibrationTable:
    """The calibration table shipped with the package (computed on the dev pairs)."""
    return CalibrationTable.load(path)


# ---------------------------------------------------------------------------- pairs from a live gallery

# Below this many pairs of faces, every pair is listed and the different ones sampled from the list; above it the
# list alone would hold 16 bytes a pair (50k faces: 1.25 billion pairs, 20 GB), so pairs are drawn at random instead.
_LISTED_PAIRS = 2_000_000


@dataclass(frozen=True)
class GalleryPairs:
    """Pairs of gallery faces (row indices into the embeddings), their squared distances and labels."""

    index_a: NDArray[np.int64]
    index_b: NDArray[np.int64]
    distances: NDArray[np.float32]
    same: NDArray[np.bool_]
    n_identities: int  # identities with >= 2 faces that were used


def pairs_from_gallery(
    identity_ids: ArrayLike,
    embeddings: ArrayLike,
    *,
    max_different: int = 200_000,
    max_same: int = 200_000,
    seed: int = 0,
) -> GalleryPairs:
    """All same pairs (up to `max_same`) and up to `max_different` different pairs, sampled with `seed`, among
    identities with >= 2 faces. Memory and time grow with those caps, not with the square of the gallery.

    `identity_ids` (n,) labels any hashable-to-numpy type; `embeddings` (n, 128). Faces of identities with a
    single face take no part (they cannot give a same pair, and using them only on one side would skew the mix).
    A sample is uniform over the pairs of its kind, without repeats.
    """
    ids = np.asarray(identity_ids)
    emb = np.asarray(embeddings, dtype=np.float32)
    if ids.ndim != 1 or emb.ndim != 2 or ids.shape[0] != emb.shape[0]:
        raise ValueError("identity_ids must be (n,) and embeddings (n, d)")
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    keep = np.flatnonzero(counts[inverse] >= 2)
    if keep.size == 0:
        raise ValueError("no identity has 2 or more faces")
    labels = inverse[keep]
    rng = np.random.default_rng(seed)
    if keep.size * (keep.size - 1) // 2 <= _LISTED_PAIRS:
        iu, ju = np.triu_indices(keep.size, k=1)
        same_mask = labels[iu] == labels[ju]
        si, sj = _subsample(iu[same_mask], ju[same_mask], max_same, rng)
        di, dj = _subsample(iu[~same_mask], ju[~same_mask], max_different, rng)
    else:
        si, sj = _same_pairs(labels, max_same, rng)
        di, dj = _different_pairs(labels, max_different, rng)
    a = keep[np.concatenate([si, di])]
    b = keep[np.concatenate([sj, dj])]
    return GalleryPairs(
        index_a=a.astype(np.int64),
        index_b=b.astype(np.int64),
        distances=_distances(emb, a, b),
        same=np.concatenate([np.ones(si.size, bool), np.zeros(di.size, bool)]),
        n_identities=int((counts >= 2).sum()),
    )


Pairs = tuple[NDArray[np.int64], NDArray[np.int64]]
_DISTANCE_BLOCK = 16_384  # pairs whose two embeddings are gathered at once (16 MB for 128-d float32)


def _distances(emb: NDArray[np.float32], a: NDArray[np.intp], b: NDArray[np.intp]) -> NDArray[np.float32]:
    """Bit for bit the distances verify/identify will compute, a block of pairs at a time (gathering every pair's
    embeddings at once would hold 1 kB per pair)."""
    out = np.empty(a.size, np.float32)
    for start in range(0, a.size, _DISTANCE_BLOCK):
        part = slice(start, start + _DISTANCE_BLOCK)
        out[part] = pairwise_squared_l2(emb[a[part]], emb[b[part]])
    return out


def _subsample(i: NDArray[np.int64], j: NDArray[np.int64], limit: int, rng: np.random.Generator) -> Pairs:
    if i.size <= limit:
        return i, j
    pick = np.sort(rng.choice(i.size, size=limit, replace=False))
    return i[pick], j[pick]


def _groups(labels: NDArray[np.intp]) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.intp]]:
    """The faces sorted by identity (`order`, stable), and where each identity's run starts in it and its size."""
    order = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(labels[order]) != 0])
    return order, starts, np.diff(np.r_[starts, labels.size])


def _same_pairs(labels: NDArray[np.intp], limit: int, rng: np.random.Generator) -> Pairs:
    """Same-identity pairs (i < j): all of them, or `limit` drawn uniformly without repeats."""
    order, starts, sizes = _groups(labels)
    per_group = sizes * (sizes - 1) // 2
    if int(per_group.sum()) <= _LIST_BELOW * limit:
        pairs = [np.triu_indices(int(s), k=1) for s in sizes]
        i = np.concatenate([order[start + p] for start, (p, _) in zip(starts, pairs, strict=True)])
        j = np.concatenate([order[start + q] for start, (_, q) in zip(starts, pairs, strict=True)])
        return _subsample(*_ordered(i, j), limit, rng)

    def draw(count: int) -> Pairs:
        # a group in proportion to its pairs, then two different members of it: uniform over all same pairs
        group = rng.choice(sizes.size, size=count, p=per_group / per_group.sum())
        first = rng.integers(0, sizes[group])
        second = (first + rng.integers(1, sizes[group])) % sizes[group]
        return order[starts[group] + first], order[starts[group] + second]

    return _draw_distinct(draw, labels.size, limit)


def _different_pairs(labels: NDArray[np.intp], limit: int, rng: np.random.Generator) -> Pairs:
    """Different-identity pairs (i < j), `limit` drawn uniformly without repeats (all of them if there are fewer)."""
    n = labels.size
    order, starts, sizes = _groups(labels)
    ends = starts + sizes
    available = (n * n - int((sizes * sizes).sum())) // 2
    if available <= _LIST_BELOW * limit:  # nearly every face is one person's: list the few pairs across identities
        i = np.concatenate([np.repeat(order[s:e], n - e) for s, e in zip(starts, ends, strict=True)])
        j = np.concatenate([np.tile(order[e:], e - s) for s, e in zip(starts, ends, strict=True)])
        return _subsample(*_ordered(i, j), limit, rng)
    group = np.empty(n, np.int64)  # each face's group in `order`
    group[order] = np.repeat(np.arange(sizes.size), sizes)
    partners = n - sizes[group]  # faces of other identities, per face

    def draw(count: int) -> Pairs:
        # a face in proportion to its partners, then one of them: every ordered different pair is as likely, and
        # an unordered pair is drawn as (i, j) or (j, i): uniform, with nothing rejected
        i = rng.choice(n, size=count, p=partners / partners.sum())
        g = group[i]
        r = rng.integers(0, n - sizes[g])
        return i, order[np.where(r < starts[g], r, r + sizes[g])]

    return _draw_distinct(draw, n, limit)


_MAX_DRAW = 4_000_000  # candidate pairs drawn in one round (64 MB of indices)
# Kinds of pair with at most this many times the sample's size are listed and sampled from the list: drawing nearly
# all of them at random would take ever more rounds to find the last ones not yet drawn.
_LIST_BELOW = 4


def _draw_distinct(draw: Callable[[int], Pairs], n: int, limit: int) -> Pairs:
    """`limit` distinct unordered pairs from repeated uniform draws, kept in the order first drawn (so the sample
    stays uniform), returned sorted."""
    keys = np.zeros(0, np.int64)
    while keys.size < limit:
        i, j = draw(min(_MAX_DRAW, 2 * (limit - keys.size) + 64))
        new = np.minimum(i, j).astype(np.int64) * n + np.maximum(i, j)
        keys = np.concatenate([keys, new])
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)]
    keys = np.sort(keys[:limit])
    return keys // n, keys % n


def _ordered(i: NDArray[np.int64], j: NDArray[np.int64]) -> Pairs:
    low, high = np.minimum(i, j), np.maximum(i, j)
    order = np.lexsort((high, low))
    return low[order].astype(np.int64), high[order].astype(np.int64)
