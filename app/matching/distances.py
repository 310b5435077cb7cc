"""Distances between face embeddings: SQUARED Euclidean (L2) distance between raw 128-d embeddings.

facegate never normalises dlib's embeddings; two faces are the same person when their squared distance is at or
below the threshold (0.36 = dlib's 0.6 Euclidean, see `thresholds.py`).

- `squared_l2(a, b)`: all pairs, a (n, d) x b (m, d) -> (n, m) float32, computed as |a|^2 + |b|^2 - 2 a.b
  in blocks of rows (bounded memory for a large gallery), clipped at 0 (the expansion can go slightly negative).
  It only short-lists: it is off from the exact distance by float32 ulps of |a|^2 + |b|^2 (measured: under 3e-7
  of it), so a caller that decides re-measures the candidates within `EXPANSION_ERROR` x (|a|^2 + |b|^2) of its
  cut with `pairwise_squared_l2`.
- `pairwise_squared_l2(a, b)`: aligned pairs, a (n, d) and b (n, d) -> (n,) float32, computed from the
  difference (no cancellation) as `((a - b) ** 2).sum(axis=1, dtype=float32)` on C-ordered rows: the same
  expression, so the same float32 value to the last bit, as the gallery's reported distances
  (`app.gallery.index`), so that a pair at exactly the threshold gets one answer from verify, identify,
  calibration, clustering and the identification evaluation (an einsum or a column-major copy sums in another
  order and can differ by an ulp).

Both accept a single embedding (d,) as a one-row matrix. NaN rows (faces that could not be found) give NaN.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["EXPANSION_ERROR", "pairwise_squared_l2", "squared_l2"]

_BLOCK_ROWS = 4096
# A bound, far above float32 rounding, on |expansion - exact| / (|a|^2 + |b|^2): the slack of a short-list.
EXPANSION_ERROR = 1e-4


def _as_matrix(x: ArrayLike, name: str) -> NDArray[np.float32]:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (n, d) or (d,), got shape {arr.shape}")
    return arr


def squared_l2(a: ArrayLike, b: ArrayLike) -> NDArray[np.float32]:
    """Squared L2 distance between every row of `a` (n, d) and every row of `b` (m, d): (n, m) float32, >= 0."""
    a32 = _as_matrix(a, "a")
    b32 = _as_matrix(b, "b")
    if a32.shape[1] != b32.shape[1]:
        raise ValueError(f"dimension mismatch: a has {a32.shape[1]}, b has {b32.shape[1]}")
    out = np.empty((a32.shape[0], b32.shape[0]), dtype=np.float32)
    if out.size == 0:
        return out
    b_sq = np.einsum("ij,ij->i", b32, b32)
    for start in range(0, a32.shape[0], _BLOCK_ROWS):
        block = a32[start : start + _BLOCK_ROWS]
        a_sq = np.einsum("ij,ij->i", block, block)
        d = block @ b32.T
        d *= -2.0
        d += a_sq[:, None]
        d += b_sq[None, :]
        np.maximum(d, 0.0, out=d)  # NaN stays NaN
        out[start : start + block.shape[0]] = d
    return out


def pairwise_squared_l2(a: ArrayLike, b: ArrayLike) -> NDArray[np.float32]:
    """Squared L2 distance between row i of `a` and row i of `b` (both (n, d)): (n,) float32."""
    a32 = _as_matrix(a, "a")
    b32 = _as_matrix(b, "b")
    if a32.shape != b32.shape:
        raise ValueError(f"a and b must have the same shape, got {a32.shape} and {b32.shape}")
    diff = np.ascontiguousarray(a32 - b32)
    out: NDArray[np.float32] = (diff**2).sum(axis=1, dtype=np.float32)
    return out
