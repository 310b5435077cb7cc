"""Open-set 1:N identification: who is this, or nobody? (issue 9; the margin/ambiguous rule of issue 5).

The measurement comes in as each enrolled identity's distance to the probe (squared L2; for an identity with several
faces, its nearest face: `nearest_identities`). The decision `decide(...)` is one explainable rule.

The rule ("facegate rule")
--------------------------
With d1 the distance to the nearest identity and d2 to the second nearest (d2 = +inf when the gallery has one
identity), the score is

    s = log(d1) - beta * log(min(d2, cap))            beta = 0.75, cap = 0.45   (lower = more confident)

and the probe is ACCEPTED as the nearest identity when s <= t(N, FPIR): in distance terms,
d1 <= exp(t) * min(d2, cap) ** beta, an acceptance distance that shrinks when another enrolled person is almost as
close. `cap` makes a runner-up farther than 0.45 count as "far" (and a one-identity gallery fall back to a plain
distance threshold). Why this and not the alternatives: see /work/notes/openset.md (measured on lfw-dev and dev):
raw distance (what every open-source service ships), the plain ratio d1/d2, z-/cohort-normalised scores,
per-identity (gallery-side) normalisation and a logistic regression / gradient boosting over ~30 such features
were compared; this two-parameter score matches the 30-feature models within a point and is the most stable
as the gallery grows.

Gallery-size awareness
----------------------
A stranger is accepted when the best of N impostor comparisons looks good enough, so the threshold that keeps
FPIR (share of strangers matched to someone) at the target depends on the gallery size N. `OpenSetModel` stores,
for a grid of gallery sizes N (1 .. 100k) and FPIR levels (1e-4 .. 0.5), the score t such that a stranger's score
is <= t with probability FPIR. `threshold(N, fpir)` interpolates it (linear in log N and log FPIR); `fpir_at(s, N)`
inverts it (the explanation "a stranger scores this well with probability x at this gallery size").
The grid is computed by `build_model(reference_distances, ...)` from a reference set of stranger probes: for each
probe x, its distances to M reference identities (not its own) give its own impostor distribution F_x: empirical
between its smallest and largest distance (log-linear between Hazen positions (j - 0.5)/M), and below the smallest a
lower tail whose local exponent k(u) = d ln F / d ln d grows with the depth u as k(u) = 4.2 + 1.3 ln(1/u) (fitted
to pooled Hill estimates on lfw-dev: the tail is lighter than any power law, faces have a floor of dissimilarity).
A gallery of N unrelated identities is then N independent draws from F_x: the two smallest are sampled exactly as
uniform order statistics (u1 = 1 - V1^(1/N), u2 = u1 + (1 - u1)(1 - V2^(1/(N-1)))) mapped through F_x^-1, `draws`
times per probe, and t(N, FPIR) is the FPIR-quantile of the resulting scores. Per-probe distributions keep the
probe-to-probe differences (some faces look like many people) that one pooled impostor distribution would miss;
the tail extrapolates to galleries larger than M. The threshold is NOT monotone in N, and need not be: as N grows
the nearest stranger gets closer (the d1 part tightens) but so does the second nearest (the ratio part loosens);
leave-one-identity-out galleries on lfw-dev show the same shape. Beyond 3 x M (where the tail model was checked
against held-out galleries) thresholds may only tighten as N grows (cumulative minimum).

Several faces per identity
--------------------------
The model's galleries hold one face per identity. An identity enrolled with k faces is as near as its nearest face,
so it gives a stranger between 1 (its faces all alike) and k (its faces independent draws) chances: a gallery of N
identities and F faces behaves like one of N' one-face identities for some N' in [N, F] (with independent faces the
two smallest of F draws are d1 and, up to the nearest identity's other faces, d2: the model at N' = F). Which N'
depends on how alike a person's photos are, which is unknown, so `decide` takes the strictest threshold over that
range (`OpenSetModel.strictest_size`): never looser than t(N) (more faces can only add chances), tighter where t
falls with N (small galleries: on lfw-dev, galleries of N = 2 with 3 faces each let 2 % of strangers in under t(N)
alone at a 1 % target). With one face per identity (F = N) it is t(N) exactly.
Only these aggregate score quantiles are shipped (app/matching/data/openset.json), no embeddings.

Decision (`decide`)
-------------------
The score threshold is t(N', FPIR), N' = `strictest_size(N, F, FPIR)` (N' = N with one face per identity).
1. no identity enrolled -> "unknown".
2. d1 > max_distance (the 1:1 threshold, 0.36 by default): "unknown" (never name someone you would not verify).
3. N >= 2 and margin = d2 - d1 <= ambiguity_margin (the runner-up within the margin of the nearest): "ambiguous".
   So two identities at exactly the same distance are never named, even with a margin of 0: which one came first
   is not a reason to name it.
4. s <= t(N, target_fpir): "accepted" (match_identity = nearest identity).
5. otherwise "ambiguous" when the runner-up is also within max_distance (several enrolled people look like this
   face and none stands out), else "unknown".
Only "accepted" names someone; FPIR counts strangers that end "accepted".
What the decision reports agrees with it to the last bit: `accept_distance` is the largest distance whose score
passes (d1 <= accept_distance exactly when s <= t), and `fpir_estimate` is at most the target FPIR exactly when
the score passes (the interpolation inverts `threshold` only to rounding).

Public surface: `Reason`, `IdentifyDecision`, `OpenSetModel` (+ `load_default_model`, `build_model`,
`leave_one_identity_out`, `simulate_stranger_scores`), `nearest_identities`, `facegate_score`, `decide`,
`DEFAULT_BETA`, `DEFAULT_CAP`, `DEFAULT_FPIR`, `DEFAULT_AMBIGUITY_MARGIN`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from app.matching.data_files import DATA_DIR, OPENSET_FILE
from app.matching.distances import squared_l2
from app.matching.thresholds import DEFAULT_THRESHOLD, validate_rate

__all__ = [
    "DEFAULT_AMBIGUITY_MARGIN",
    "DEFAULT_BETA",
    "DEFAULT_CAP",
    "DEFAULT_FPIR",
    "DEFAULT_GALLERY_SIZES",
    "DEFAULT_LEVELS",
    "DEFAULT_MODEL_PATH",
    "DEFAULT_TAIL",
    "IdentifyDecision",
    "OpenSetModel",
    "Reason",
    "build_model",
    "decide",
    "facegate_score",
    "leave_one_identity_out",
    "load_default_model",
    "nearest_identities",
    "simulate_stranger_scores",
]

DEFAULT_MODEL_PATH = DATA_DIR / OPENSET_FILE
DEFAULT_BETA = 0.75
DEFAULT_CAP = 0.45
DEFAULT_FPIR = 0.01
DEFAULT_AMBIGUITY_MARGIN = 0.02
DEFAULT_TAIL = (4.2, 1.3)  # local tail exponent k(u) = 4.2 + 1.3 ln(1/u), fitted on lfw-dev (notes/openset.md)
DEFAULT_GALLERY_SIZES = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)
DEFAULT_LEVELS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


class Reason(StrEnum):
    ACCEPTED = "accepted"
    UNKNOWN = "unknown"
    AMBIGUOUS = "ambiguous"


# Distances below this count as this in the score (log 0 would be -inf): the same photo enrolled twice gives 0.
SCORE_FLOOR = 1e-12


def facegate_score(d1: ArrayLike, d2: ArrayLike, *, beta: float = DEFAULT_BETA, cap: float = DEFAULT_CAP) -> NDArray[np.float64]:
    """s = log(d1) - beta * log(min(d2, cap)); d2 = inf for a one-identity gallery. Lower = more confident."""
    a = np.maximum(np.asarray(d1, dtype=np.float64), SCORE_FLOOR)
    b = np.minimum(np.asarray(d2, dtype=np.float64), cap)
    return np.asarray(np.log(a) - beta * np.log(np.maximum(b, SCORE_FLOOR)))


# ---------------------------------------------------------------------------- the calibrated model


@dataclass(frozen=True)
class OpenSetModel:
    """Stranger-score quantiles per gallery size: quantiles[i, j] = t with P(stranger score <= t | N_i) = levels[j]."""

    gallery_sizes: NDArray[np.float64]
    levels: NDArray[np.float64]
    quantiles: NDArray[np.float64]
    beta: float = DEFAULT_BETA
    cap: float = DEFAULT_CAP
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = np.asarray(self.gallery_sizes, dtype=np.float64)
        lv = np.asarray(self.levels, dtype=np.float64)
        q = np.asarray(self.quantiles, dtype=np.float64)
        if n.ndim != 1 or n.size < 1 or n[0] != 1 or np.any(np.diff(n) <= 0):
            raise ValueError("gallery_sizes must start at 1 and increase")
        if lv.ndim != 1 or lv.size < 2 or np.any(np.diff(lv) <= 0) or lv[0] <= 0 or lv[-1] >= 1:
            raise ValueError("levels must increase inside (0, 1)")
        if q.shape != (n.size, lv.size) or np.any(np.diff(q, axis=1) < 0):
            raise ValueError("quantiles must be (len(gallery_sizes), len(levels)) and non-decreasing along levels")

    def score(self, d1: ArrayLike, d2: ArrayLike) -> NDArray[np.float64]:
        return facegate_score(d1, d2, beta=self.beta, cap=self.cap)

    def _row(self, gallery_size: int) -> NDArray[np.float64]:
        """Quantile row at N, linear in log N between grid sizes (N beyond the grid: the last row)."""
        if gallery_size < 1:
            raise ValueError("gallery_size must be >= 1")
        x = math.log(gallery_size)
        logn = np.log(self.gallery_sizes)
        if x >= logn[-1]:
            return np.asarray(self.quantiles[-1], dtype=np.float64)
        i = int(np.searchsorted(logn, x, side="right")) - 1
        w = (x - logn[i]) / (logn[i + 1] - logn[i])
        return np.asarray((1 - w) * self.quantiles[i] + w * self.quantiles[i + 1], dtype=np.float64)

    def threshold(self, gallery_size: int, fpir: float = DEFAULT_FPIR) -> float:
        """Score threshold keeping stranger FPIR at `fpir` for a gallery of `gallery_size` identities."""
        f = validate_rate(fpir, "fpir")
        if not self.levels[0] <= f <= self.levels[-1]:
            raise ValueError(f"fpir must be within [{self.levels[0]}, {self.levels[-1]}], got {fpir}")
        return float(np.interp(math.log(f), np.log(self.levels), self._row(gallery_size)))

    def strictest_size(self, identities: int, faces: int, fpir: float = DEFAULT_FPIR) -> int:
        """The gallery size in [identities, faces] whose threshold is the lowest (ties: the smallest size).

        A gallery of `identities` with `faces` faces in all acts like one of that many one-face identities for some
        size in that range (module docstring, "Several faces per identity"). The threshold is linear in log N
        between grid sizes, so the minimum over the range is at an end or at a grid size inside it."""
        if identities < 1 or faces < identities:
            raise ValueError("need 1 <= identities <= faces")
        inside = [int(n) for n in self.gallery_sizes if identities < n < faces]
        return min([identities, *inside, faces], key=lambda n: (self.threshold(n, fpir), n))

    def fpir_at(self, score: float, gallery_size: int) -> float:
        """Estimated probability that a stranger scores <= `score` at this gallery size (clamped to the levels)."""
        row = self._row(gallery_size)
        if score <= row[0]:
            return float(self.levels[0])
        if score >= row[-1]:
            return float(self.levels[-1])
        # rows may have flat stretches: interpolate on the strictly increasing part
        j = int(np.searchsorted(row, score, side="right"))
        lo, hi = row[j - 1], row[j]
        w = 0.0 if hi == lo else (score - lo) / (hi - lo)
        return float(math.exp((1 - w) * math.log(self.levels[j - 1]) + w * math.log(self.levels[j])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": "s = log(d1) - beta * log(min(d2, cap)); accept when s <= t(N, fpir)",
            "beta": self.beta,
            "cap": self.cap,
            "gallery_sizes": [int(n) for n in self.gallery_sizes],
            "levels": [float(v) for v in self.levels],
            "quantiles": [[round(float(v), 6) for v in row] for row in self.quantiles],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OpenSetModel:
        return cls(
            gallery_sizes=np.asarray(data["gallery_sizes"], dtype=np.float64),
            levels=np.asarray(data["levels"], dtype=np.float64),
            quantiles=np.asarray(data["quantiles"], dtype=np.float64),
            beta=float(data["beta"]),
            cap=float(data["cap"]),
            meta=dict(data.get("meta", {})),
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> OpenSetModel:
        return cls.from_dict(json.loads(Path(path).read_text()))


@lru_cache(maxsize=4)
def load_default_model(path: Path = DEFAULT_MODEL_PATH) -> OpenSetModel:
    """The calibration shipped with the package (read once)."""
    return OpenSetModel.load(path)


def _sorted_reference(reference_distances: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Rows sorted ascending with NaN/inf (the probe's own identity, or absent) pushed to the end; counts per row."""
    r = np.asarray(reference_distances, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError("reference_distances must be (probes, identities) with at least 2 identities")
    r = np.where(np.isfinite(r), r, np.inf)
    counts = np.isfinite(r).sum(axis=1)
    if np.any(counts < 2):
        raise ValueError("each reference probe needs finite distances to at least 2 identities")
    return np.sort(r, axis=1), counts.astype(np.int64)


def _quantile_fn(
    sorted_d: NDArray[np.float64], counts: NDArray[np.int64], u: NDArray[np.float64], tail: tuple[float, float]
) -> NDArray[np.float64]:
    """F_x^-1(u) for each row: Hazen positions (j - 0.5)/M, log-linear between them; below p1 = 0.5/M a tail whose
    local exponent d ln F / d ln d is k(u) = tail[0] + tail[1] * ln(1/u) (tail[1] = 0: a plain power law)."""
    m = counts[:, None].astype(np.float64)
    pos = u * m - 0.5  # fractional 0-based index
    lo = np.clip(np.floor(pos), 0, m - 1).astype(np.int64)
    hi = np.minimum(lo + 1, counts[:, None] - 1)
    w = np.clip(pos - lo, 0.0, 1.0)
    logd = np.log(np.maximum(sorted_d, 1e-12, where=np.isfinite(sorted_d), out=np.full_like(sorted_d, np.nan)))
    a = np.take_along_axis(logd, lo, axis=1)
    b = np.take_along_axis(logd, hi, axis=1)
    inner = a + w * (b - a)
    p1 = 0.5 / m
    depth = np.log(p1) - np.log(np.maximum(u, 1e-300))  # ln(p1 / u) > 0 inside the tail
    k1 = tail[0] + tail[1] * -np.log(p1)  # local exponent where the tail starts
    if tail[1] > 0:
        drop = np.log1p(tail[1] / k1 * np.maximum(depth, 0.0)) / tail[1]
    else:
        drop = np.maximum(depth, 0.0) / k1
    out: NDArray[np.float64] = np.exp(np.where(u < p1, logd[:, :1] - drop, inner))
    return out


def simulate_stranger_scores(
    reference_distances: ArrayLike,
    gallery_size: int,
    *,
    beta: float = DEFAULT_BETA,
    cap: float = DEFAULT_CAP,
    draws: int = 64,
    tail: tuple[float, float] = DEFAULT_TAIL,
    seed: int = 0,
) -> NDArray[np.float64]:
    """Scores of the reference strangers against `draws` random galleries of `gallery_size` identities each.

    `reference_distances` (P, M): squared distance of each stranger probe to each reference identity; NaN or inf
    where not applicable (its own identity). Returns (P * draws,) scores.
    """
    if gallery_size < 1:
        raise ValueError("gallery_size must be >= 1")
    sorted_d, counts = _sorted_reference(reference_distances)
    rng = np.random.default_rng(seed)
    p = sorted_d.shape[0]
    n = float(gallery_size)
    u1 = -np.expm1(np.log(rng.random((p, draws))) / n)
    d1 = _quantile_fn(sorted_d, counts, u1, tail)
    if gallery_size == 1:
        d2 = np.full_like(d1, np.inf)
    else:
        u2 = u1 + (1.0 - u1) * -np.expm1(np.log(rng.random((p, draws))) / (n - 1.0))
        d2 = _quantile_fn(sorted_d, counts, u2, tail)
    return facegate_score(d1, d2, beta=beta, cap=cap).ravel()


def build_model(
    reference_distances: ArrayLike,
    *,
    beta: float = DEFAULT_BETA,
    cap: float = DEFAULT_CAP,
    gallery_sizes: Sequence[int] = DEFAULT_GALLERY_SIZES,
    levels: Sequence[float] = DEFAULT_LEVELS,
    draws: int = 64,
    tail: tuple[float, float] = DEFAULT_TAIL,
    seed: int = 0,
    validated_factor: float = 3.0,
    meta: dict[str, Any] | None = None,
) -> OpenSetModel:
    """Stranger-score quantiles for each gallery size (see the module docstring).

    Beyond `validated_factor` x the number of reference identities (where the tail model was checked against
    held-out galleries), thresholds are not allowed to loosen as N grows (a cumulative minimum from there on).
    """
    lv = np.asarray(levels, dtype=np.float64)
    rows = []
    for i, n in enumerate(gallery_sizes):
        s = simulate_stranger_scores(
            reference_distances, int(n), beta=beta, cap=cap, draws=draws, tail=tail, seed=seed + i
        )
        rows.append(np.quantile(s, lv))
    q = np.asarray(rows)
    m_ref = int(np.min(_sorted_reference(reference_distances)[1]))
    edge = validated_factor * m_ref  # beyond this the tail model is extrapolating: thresholds may only tighten
    sizes = np.asarray(gallery_sizes, dtype=np.float64)
    beyond = np.flatnonzero(sizes > edge)
    if beyond.size and beyond[0] > 0:
        start = beyond[0] - 1
        q[start:] = np.minimum.accumulate(q[start:], axis=0)
    q = np.maximum.accumulate(q, axis=1)  # keep each row non-decreasing in the level
    info = {"tail": list(tail), "validated_up_to": edge, "draws": draws, "seed": seed, "reference_probes": int(np.shape(reference_distances)[0])}
    info.update(meta or {})
    return OpenSetModel(np.asarray(gallery_sizes, dtype=np.float64), lv, q, beta=beta, cap=cap, meta=info)


def leave_one_identity_out(
    embeddings: ArrayLike, identities: Sequence[Hashable], photo_keys: Sequence[Any]
) -> NDArray[np.float64]:
    """Reference distances for `build_model` from a labelled photo set, every person a stranger to the others.

    Rows: every photo with a face (NaN embedding rows are dropped), in input order. Columns: each identity's first
    photo with a face (smallest photo key, e.g. its file name), identities sorted. Entry: squared distance of the
    photo to that identity's first photo; NaN for the photo's own identity (a probe is never its own impostor).
    This is how the shipped `openset.json` is built from lfw-dev (`python -m models.calibration_tables`).
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    ids = list(identities)
    keys = list(photo_keys)
    if emb.ndim != 2 or len(ids) != emb.shape[0] or len(keys) != emb.shape[0]:
        raise ValueError("embeddings must be (n, d) with one identity and one photo key per row")
    rows = [i for i in range(emb.shape[0]) if not np.isnan(emb[i]).any()]
    by_id: dict[Hashable, list[int]] = {}
    for r in rows:
        by_id.setdefault(ids[r], []).append(r)
    names = sorted(by_id)  # type: ignore[type-var]
    if len(names) < 3:
        raise ValueError("need photos of at least 3 identities (2 impostor identities per photo)")
    first = [min(by_id[n], key=lambda r: keys[r]) for n in names]
    column = {n: j for j, n in enumerate(names)}
    out = squared_l2(emb[rows], emb[first]).astype(np.float64)
    out[np.arange(len(rows)), [column[ids[r]] for r in rows]] = np.nan
    return out


# ---------------------------------------------------------------------------- the decision


def nearest_identities(
    face_distances: ArrayLike, face_identity_ids: Sequence[Hashable] | NDArray[Any]
) -> tuple[list[Hashable], NDArray[np.float64]]:
    """Reduce per-face distances to per-identity distances (nearest face of each identity), sorted ascending.

    Returns (identity ids, distances). Ties keep the identity that appears first.
    """
    d = np.asarray(face_distances, dtype=np.float64).ravel()
    ids = list(face_identity_ids)
    if len(ids) != d.size:
        raise ValueError("face_distances and face_identity_ids must have the same length")
    best: dict[Hashable, float] = {}
    for ident, dist in zip(ids, d.tolist(), strict=True):
        if math.isnan(dist):
            continue
        if ident not in best or dist < best[ident]:
            best[ident] = dist
    order = sorted(best.items(), key=lambda kv: kv[1])  # stable: first-seen identity wins ties
    return [k for k, _ in order], np.array([v for _, v in order], dtype=np.float64)


_MAX_STEPS = 64  # ulps `_accept_distance` may step: the closed form is off by a few; a bound, not a limit met


def _accept_distance(m: OpenSetModel, t: float, d2: float) -> float:
    """The largest distance d with score(d, d2) <= t: exp(t) * min(d2, cap) ** beta, moved by float64 steps onto the
    boundary the score test draws (the closed form is off by a few ulps either way), so that a response never shows
    a distance at or below `accept_distance` that failed the score test, or one above it that passed."""
    a = float(math.exp(t) * max(min(d2, m.cap), SCORE_FLOOR) ** m.beta)  # d2 floored as the score floors it
    if not math.isfinite(a):
        return a  # no edge to step onto (an infinite score threshold); the loops below would never end
    # The score is flat below SCORE_FLOOR (a runner-up at distance 0, the same photo enrolled twice, puts the edge
    # there): step only above it, where it grows with d and the closed form is a few ulps off at most. Stepping
    # through the subnormals one ulp at a time would take for ever.
    a = max(a, SCORE_FLOOR)
    for _ in range(_MAX_STEPS):
        if a <= SCORE_FLOOR or float(m.score(a, d2)) <= t:
            break
        a = math.nextafter(a, -math.inf)
    if float(m.score(a, d2)) > t:
        return 0.0  # no distance passes (as for t = -inf)
    for _ in range(_MAX_STEPS):
        if float(m.score(math.nextafter(a, math.inf), d2)) > t:
            break
        a = math.nextafter(a, math.inf)
    return a


def _fpir_estimate(m: OpenSetModel, s: float, n: int, t: float, target: float) -> float:
    """`fpir_at(s, n)` kept on the side of the target the score test is on: at s = t the interpolation gives the
    target only to rounding (about half the time one ulp above it), which would show a face accepted with an
    estimate over the target, or refused with one at or under it."""
    f = m.fpir_at(s, n)
    return min(f, target) if s <= t else max(f, math.nextafter(target, math.inf))


@dataclass(frozen=True)
class IdentifyDecision:
    """The 1:N answer with its reasons: `match_identity` is set only when `reason` is "accepted"."""

    match_identity: Hashable | None
    reason: Reason
    candidate: Hashable | None  # nearest identity, whatever the decision
    features: dict[str, float | int | None]
    thresholds: dict[str, float]

    @property
    def ambiguous(self) -> bool:
        return self.reason is Reason.AMBIGUOUS

    def to_dict(self) -> dict[str, Any]:
        return {
            "match_identity": self.match_identity,
            "reason": str(self.reason),
            "candidate": self.candidate,
            "features": dict(self.features),
            "thresholds": dict(self.thresholds),
        }


def decide(
    identity_distances: ArrayLike,
    identity_ids: Sequence[Hashable] | NDArray[Any],
    *,
    target_fpir: float = DEFAULT_FPIR,
    max_distance: float = DEFAULT_THRESHOLD,
    ambiguity_margin: float = DEFAULT_AMBIGUITY_MARGIN,
    gallery_size: int | None = None,
    gallery_faces: int | None = None,
    model: OpenSetModel | None = None,
) -> IdentifyDecision:
    """Open-set decision for one probe (rules in the module docstring).

    identity_distances: (G,) squared distance to each enrolled identity (nearest face; see `nearest_identities`),
    any order; identity_ids: (G,) their ids. `gallery_size` defaults to G: pass the true number of enrolled
    identities when only the k nearest are given. `gallery_faces`: the faces those identities hold in all (default:
    one each); with more, the score threshold is the strictest over gallery sizes from `gallery_size` to it
    (`OpenSetModel.strictest_size`). `model` defaults to the shipped calibration.
    """
    m = model if model is not None else load_default_model()
    d = np.asarray(identity_distances, dtype=np.float64).ravel()
    ids = list(identity_ids)
    if len(ids) != d.size:
        raise ValueError("identity_distances and identity_ids must have the same length")
    if np.any(np.isnan(d)):
        raise ValueError("identity_distances contains NaN")
    if ambiguity_margin < 0:
        raise ValueError("ambiguity_margin must be >= 0")
    n = int(gallery_size) if gallery_size is not None else d.size
    if n < d.size:
        raise ValueError("gallery_size is smaller than the number of identities given")
    faces = int(gallery_faces) if gallery_faces is not None else n
    if faces < n:
        raise ValueError("gallery_faces is smaller than gallery_size (every identity has a face)")
    thresholds = {"target_fpir": float(target_fpir), "max_distance": float(max_distance), "ambiguity_margin": float(ambiguity_margin)}
    if d.size == 0:
        m.threshold(1, target_fpir)  # validates target_fpir
        return IdentifyDecision(None, Reason.UNKNOWN, None, {"gallery_size": 0}, thresholds)

    order = np.argsort(d, kind="stable")  # ties: the identity given first is the candidate (never named: rule 3)
    d1 = float(d[order[0]])
    d2 = float(d[order[1]]) if d.size >= 2 else math.inf
    candidate = ids[int(order[0])]
    rule_n = m.strictest_size(n, faces, target_fpir)  # the calibrated size the threshold is for (n with one face each)
    t = m.threshold(rule_n, target_fpir)
    s = float(m.score(d1, d2))
    second = d2 if math.isfinite(d2) else None
    features: dict[str, float | int | None] = {
        "distance": d1,
        "second_distance": second,
        "margin": None if second is None else d2 - d1,
        "ratio": None if second is None else (d1 / d2 if d2 > 0 else 1.0),
        "score": s,
        "fpir_estimate": _fpir_estimate(m, s, rule_n, t, float(target_fpir)),
        "gallery_size": n,
        "gallery_faces": faces,
        "rule_gallery_size": rule_n,
    }
    thresholds["score"] = t
    thresholds["accept_distance"] = _accept_distance(m, t, d2)

    if d1 > max_distance:
        reason = Reason.UNKNOWN
    elif second is not None and d2 - d1 <= ambiguity_margin:
        reason = Reason.AMBIGUOUS
    elif s <= t:
        reason = Reason.ACCEPTED
    elif second is not None and d2 <= max_distance:
        reason = Reason.AMBIGUOUS
    else:
        reason = Reason.UNKNOWN
    return IdentifyDecision(candidate if reason is Reason.ACCEPTED else None, reason, candidate, features, thresholds)
