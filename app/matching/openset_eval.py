"""Measuring 1:N open-set identification (issue 9's `facegate eval-identify`), in NIST's terms.

- FPIR (false positive identification rate): share of STRANGERS (people never enrolled) that are matched to someone.
- DIR (detection and identification rate): share of ENROLLED people's probes matched to the RIGHT identity;
  FNIR = 1 - DIR (missed, or matched to someone else).
- "DIR at FPIR x": the score threshold is set on the strangers of the evaluation itself so that at most a share x
  of them is accepted (the usual curve); "at default settings" uses the calibrated rule as `decide` applies it.

Protocol (`enrolment_split`): identities sorted by name; those at even positions (0, 2, 4, ...) are enrolled with
their first photo (photo keys sorted, e.g. file names); their other photos are the probes; every photo of the
identities at odd positions is a stranger. On lfw-dev (828 people, 2,107 photos) that gives 414 enrolled,
647 probes, 1,046 strangers: the numbers of issue 9.

Rules compared (all accept the nearest identity; lower score = more confident):
raw = d1; ratio = d1 / d2 (1 where d2 = 0, as `decide` reports it); facegate = `openset.facegate_score`
(log d1 - 0.75 log min(d2, 0.45)).
d1 and d2 are the float32 distances /identify reports for the two nearest identities (`top_two`), so the default
point decides each probe exactly as /identify would on the same embeddings, also at a threshold's very value.

Public surface: `enrolment_split` -> `Split`, `top_two` -> `TopTwo`, `dir_at_fpir`, `evaluate_identification`
-> `IdentificationReport` (frozen, `to_dict()` JSON-ready).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from app.matching.calibration import most_allowed
from app.matching.distances import EXPANSION_ERROR, pairwise_squared_l2, squared_l2
from app.matching.openset import (
    DEFAULT_AMBIGUITY_MARGIN,
    DEFAULT_FPIR,
    OpenSetModel,
    decide,
    load_default_model,
)
from app.matching.thresholds import DEFAULT_THRESHOLD

__all__ = ["IdentificationReport", "Split", "TopTwo", "dir_at_fpir", "enrolment_split", "evaluate_identification", "top_two"]

DEFAULT_FPIR_POINTS = (0.01, 0.05, 0.1)


@dataclass(frozen=True)
class Split:
    """Row indices into the photo list: gallery (one per enrolled identity), probes of enrolled people, strangers."""

    gallery_rows: NDArray[np.int64]
    gallery_ids: list[Hashable]
    probe_rows: NDArray[np.int64]
    probe_ids: list[Hashable]
    stranger_rows: NDArray[np.int64]


def enrolment_split(identities: Sequence[Any], photo_keys: Sequence[Any]) -> Split:
    """Issue 9's protocol (module docstring). `identities[i]` and `photo_keys[i]` describe photo i."""
    if len(identities) != len(photo_keys):
        raise ValueError("identities and photo_keys must have the same length")
    by_id: dict[Any, list[int]] = {}
    for row, ident in enumerate(identities):
        by_id.setdefault(ident, []).append(row)
    g_rows, g_ids, p_rows, p_ids, s_rows = [], [], [], [], []
    for pos, ident in enumerate(sorted(by_id)):
        rows = sorted(by_id[ident], key=lambda r: photo_keys[r])
        if pos % 2 == 0:
            g_rows.append(rows[0])
            g_ids.append(ident)
            p_rows.extend(rows[1:])
            p_ids.extend([ident] * (len(rows) - 1))
        else:
            s_rows.extend(rows)
    return Split(_as_index(g_rows), g_ids, _as_index(p_rows), p_ids, _as_index(s_rows))


def _as_index(rows: list[int]) -> NDArray[np.int64]:
    return np.asarray(rows, dtype=np.int64)


@dataclass(frozen=True)
class TopTwo:
    """Per probe: index (into the distinct gallery identities) of the nearest identity, d1 and d2 (inf if none)."""

    identities: list[Hashable]  # distinct gallery identities, in first-seen order
    top: NDArray[np.int64]
    d1: NDArray[np.float64]
    d2: NDArray[np.float64]


def top_two(probes: ArrayLike, gallery: ArrayLike, gallery_ids: Sequence[Hashable]) -> TopTwo:
    """Nearest and second-nearest IDENTITY (a gallery may hold several faces per identity: nearest face counts).

    d1 and d2 are the exact float32 distances /identify reports (`pairwise_squared_l2`, the gallery index's sum of
    (g - q)^2), so a probe is decided here as /identify decides it. The expansion (`squared_l2`) only short-lists:
    it is within `EXPANSION_ERROR` x (|q|^2 + |g|^2) of the exact distance, so every face whose exact distance can be
    at or below the runner-up identity's is kept and measured exactly. Ties (equal exact distances): the identity
    met first in `gallery_ids`.
    """
    p = np.asarray(probes, dtype=np.float32)
    g = np.asarray(gallery, dtype=np.float32)
    if p.ndim == 1:
        p = p[None, :]
    if g.ndim != 2 or p.ndim != 2 or len(gallery_ids) != g.shape[0]:
        raise ValueError("probes (n, d) and gallery (m, d) with one id per gallery row are needed")
    if np.isnan(p).any() or np.isnan(g).any():
        raise ValueError("embeddings contain NaN (a photo without a face must be left out)")
    uniq: list[Hashable] = []
    col_of: dict[Hashable, int] = {}
    for ident in gallery_ids:
        if ident not in col_of:
            col_of[ident] = len(uniq)
            uniq.append(ident)
    cols = np.array([col_of[i] for i in gallery_ids], dtype=np.int64)
    n_probes = p.shape[0]
    if n_probes == 0 or not uniq:
        nothing = np.full(n_probes, np.inf)
        return TopTwo(uniq, np.zeros(n_probes, np.int64), nothing, nothing.copy())
    g_sq_max = float(np.einsum("ij,ij->i", g, g).max())
    # Probes a block at a time: the probes x gallery distance matrix (and its copies) of a whole evaluation would
    # grow with the square of the gallery (25k probes x 25k faces: 2.5 GB a copy). Each probe's answer is its own.
    block = max(1, _BLOCK_CELLS // g.shape[0])
    parts = [_top_two_block(p[i : i + block], g, cols, len(uniq), g_sq_max) for i in range(0, n_probes, block)]
    return TopTwo(uniq, *(np.concatenate(column) for column in zip(*parts, strict=True)))


_BLOCK_CELLS = 4_000_000  # probe x gallery distances computed at once (16 MB of float32)


def _top_two_block(
    p: NDArray[np.float32], g: NDArray[np.float32], cols: NDArray[np.int64], n_ids: int, g_sq_max: float
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """`top_two` for a block of probes: (top, d1, d2)."""
    n_probes = p.shape[0]
    fast = squared_l2(p, g)
    # the runner-up identity's expansion distance, per probe (each identity's nearest face)
    by_col = np.argsort(cols, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(cols[by_col]) != 0])
    per_id = np.minimum.reduceat(fast[:, by_col], starts, axis=1)
    runner_up = np.partition(per_id, 1, axis=1)[:, 1] if n_ids >= 2 else np.full(n_probes, np.inf, np.float32)
    p_sq = np.einsum("ij,ij->i", p, p)
    slack = 2.0 * EXPANSION_ERROR * (p_sq + g_sq_max)
    rows, faces = np.nonzero(fast <= (runner_up.astype(np.float64) + slack)[:, None])
    exact = pairwise_squared_l2(p[rows], g[faces]).astype(np.float64)
    code = cols[faces]
    # each (probe, identity)'s nearest face, then each probe's identities nearest first (ties: first-seen identity)
    order = np.lexsort((exact, code, rows))
    rows, code, exact = rows[order], code[order], exact[order]
    first = np.r_[True, (np.diff(rows) != 0) | (np.diff(code) != 0)]
    rows, code, exact = rows[first], code[first], exact[first]
    order = np.lexsort((code, exact, rows))
    rows, code, exact = rows[order], code[order], exact[order]
    rank = np.arange(rows.size) - np.searchsorted(rows, rows)  # 0 for a probe's nearest identity, 1 for its runner-up
    top = np.zeros(n_probes, np.int64)
    d1 = np.full(n_probes, np.inf)
    d2 = np.full(n_probes, np.inf)
    top[rows[rank == 0]] = code[rank == 0]
    d1[rows[rank == 0]] = exact[rank == 0]
    d2[rows[rank == 1]] = exact[rank == 1]
    return top, d1, d2


def dir_at_fpir(
    genuine_scores: ArrayLike, genuine_correct: ArrayLike, stranger_scores: ArrayLike, fpir: float
) -> tuple[float, float]:
    """(DIR, threshold) when accepting score <= threshold, the threshold letting at most `fpir` of strangers in."""
    g = np.asarray(genuine_scores, dtype=np.float64)
    ok = np.asarray(genuine_correct, dtype=bool)
    s = np.sort(np.asarray(stranger_scores, dtype=np.float64))
    k = most_allowed(fpir, s.size)  # strangers allowed in
    t = float(np.nextafter(s[k], -np.inf)) if k < s.size else math.inf
    return float(np.mean(ok & (g <= t))), t


@dataclass(frozen=True)
class IdentificationReport:
    n_enrolled: int
    n_probes: int
    n_strangers: int
    rank1: float  # share of probes whose nearest identity is right (the ceiling of DIR)
    dir_at_fpir: dict[str, dict[str, float]]  # rule -> {"0.01": DIR, ...}
    curves: dict[str, dict[str, list[float]]]  # rule -> {"fpir": [...], "dir": [...]}
    raw_threshold_point: dict[str, float]  # raw rule at the 1:1 threshold
    default_point: dict[str, Any]  # facegate rule with the calibrated thresholds

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


def _ratio(d1: NDArray[np.float64], d2: NDArray[np.float64]) -> NDArray[np.float64]:
    """d1 / d2, and 1.0 where d2 is 0 as `decide` reports it: a face at distance 0 from two identities (the same
    photo enrolled under two names) gave 0 / 0 = NaN, which sorts after every score, so a threshold letting that
    stranger in came out NaN and no probe passed it (DIR 0 % for the ratio rule)."""
    out = np.ones_like(d1)
    np.divide(d1, d2, out=out, where=d2 > 0)
    return out


def _curve(g: NDArray[np.float64], ok: NDArray[np.bool_], s: NDArray[np.float64]) -> dict[str, list[float]]:
    grid = np.unique(np.concatenate([np.geomspace(1e-3, 1.0, 61), [0.01, 0.05, 0.1]]))
    dirs = [dir_at_fpir(g, ok, s, f)[0] for f in grid]
    return {"fpir": [float(f) for f in grid], "dir": dirs}


def evaluate_identification(
    gallery: ArrayLike,
    gallery_ids: Sequence[Hashable],
    probes: ArrayLike,
    probe_ids: Sequence[Hashable],
    strangers: ArrayLike,
    *,
    model: OpenSetModel | None = None,
    target_fpir: float = DEFAULT_FPIR,
    max_distance: float = DEFAULT_THRESHOLD,
    ambiguity_margin: float = DEFAULT_AMBIGUITY_MARGIN,
    fpir_points: Sequence[float] = DEFAULT_FPIR_POINTS,
) -> IdentificationReport:
    """DIR at FPIR for raw / ratio / facegate rules, and the facegate decision at the given settings."""
    m = model if model is not None else load_default_model()
    gp = top_two(probes, gallery, gallery_ids)
    gs = top_two(strangers, gallery, gallery_ids)
    n = len(gp.identities)
    faces = len(gallery_ids)  # several per identity: the rule is calibrated as /identify calibrates it
    rule_n = m.strictest_size(n, faces, target_fpir) if n else n
    truth = {ident: i for i, ident in enumerate(gp.identities)}
    correct = np.array([truth.get(t, -1) for t in probe_ids]) == gp.top
    scores = {
        "raw": (gp.d1, gs.d1),
        "ratio": (_ratio(gp.d1, gp.d2), _ratio(gs.d1, gs.d2)),
        "facegate": (m.score(gp.d1, gp.d2), m.score(gs.d1, gs.d2)),
    }
    table = {
        rule: {str(f): dir_at_fpir(g, correct, s, f)[0] for f in fpir_points} for rule, (g, s) in scores.items()
    }
    curves = {rule: _curve(g, correct, s) for rule, (g, s) in scores.items()}
    raw_point = {
        "threshold": max_distance,
        "fpir": float(np.mean(gs.d1 <= max_distance)),
        "dir": float(np.mean(correct & (gp.d1 <= max_distance))),
    }

    def run(top: TopTwo, i: int) -> str:
        d = np.array([top.d1[i], top.d2[i]]) if n >= 2 else np.array([top.d1[i]])
        ids = [0, 1] if n >= 2 else [0]
        return str(
            decide(d, ids, target_fpir=target_fpir, max_distance=max_distance, ambiguity_margin=ambiguity_margin, gallery_size=n, gallery_faces=faces, model=m).reason
        )

    p_reasons = [run(gp, i) for i in range(gp.d1.size)]
    s_reasons = [run(gs, i) for i in range(gs.d1.size)]
    accepted_p = np.array([r == "accepted" for r in p_reasons])
    default = {
        "target_fpir": target_fpir,
        "gallery_size": n,
        "gallery_faces": faces,
        "score_threshold": m.threshold(rule_n, target_fpir),
        "max_distance": max_distance,
        "ambiguity_margin": ambiguity_margin,
        "fpir": float(np.mean([r == "accepted" for r in s_reasons])),
        "dir": float(np.mean(accepted_p & correct)),
        "fnir": float(1.0 - np.mean(accepted_p & correct)),
        "probe_reasons": dict(Counter(p_reasons)),
        "stranger_reasons": dict(Counter(s_reasons)),
    }
    return IdentificationReport(
        n_enrolled=n,
        n_probes=int(gp.d1.size),
        n_strangers=int(gs.d1.size),
        rank1=float(np.mean(correct)),
        dir_at_fpir=table,
        curves=curves,
        raw_threshold_point=raw_point,
        default_point=default,
    )
