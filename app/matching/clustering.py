"""Grouping faces by person: dlib's chinese whispers, and connected components, over the threshold graph.

Graph: one node per embedding; an edge joins i and j (i != j) when their squared L2 distance is <= threshold
(the same rule as `thresholds.is_match`, on the same float32 distance as `distances.pairwise_squared_l2`, so the
graph is symmetric and a link agrees with /verify on the pair: the fast |a|^2 + |b|^2 - 2 a.b only short-lists). As in dlib's `chinese_whispers_clustering`, every node also has a
self-edge, and all edges weigh 1.

- `chinese_whispers(embeddings, threshold, *, iterations=100, seed=0)`: dlib's algorithm
  (dlib/clustering/chinese_whispers.h): every node starts with its own label; `iterations * n` times, a node
  picked uniformly at random (numpy Generator seeded with `seed`, so results are reproducible but not identical
  to dlib's own random stream) takes the label most common among its neighbours (itself included), the smallest
  label among ties.
- `connected_components(embeddings, threshold)`: single-linkage groups (transitive closure of the edges).

Both return `Clustering`: `labels` (n,) int64 with clusters numbered 0, 1, ... by decreasing size (ties: the
cluster holding the smallest face index first) and -1 for UNCLUSTERED faces (clusters smaller than
`min_cluster_size`, default 2: a face that matches nobody else), `sizes` (sizes of clusters 0, 1, ...),
`n_unclustered`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from app.matching.distances import EXPANSION_ERROR, pairwise_squared_l2, squared_l2
from app.matching.thresholds import is_match

__all__ = ["Clustering", "TooManyLinks", "chinese_whispers", "connected_components", "neighbour_lists"]

_BLOCK = 2048


@dataclass(frozen=True)
class Clustering:
    labels: NDArray[np.int64]  # (n,), -1 = unclustered
    sizes: NDArray[np.int64]  # size of cluster c at index c, decreasing
    n_unclustered: int

    @property
    def n_clusters(self) -> int:
        return int(self.sizes.size)

    def to_dict(self) -> dict[str, object]:
        return {
            "labels": self.labels.tolist(),
            "sizes": self.sizes.tolist(),
            "n_clusters": self.n_clusters,
            "n_unclustered": self.n_unclustered,
        }


class TooManyLinks(ValueError):
    """The threshold graph has more links than the caller allows (`max_links`); it was not built."""

    def __init__(self, faces: int, max_links: int) -> None:
        super().__init__(f"{faces} faces with more than {max_links} links within the threshold")
        self.faces, self.max_links = faces, max_links


def neighbour_lists(
    embeddings: ArrayLike, threshold: float, *, max_links: int | None = None
) -> list[NDArray[np.int64]]:
    """For each face, the indices of faces within `threshold` (itself included), computed in row blocks.

    `max_links`: raise TooManyLinks as soon as the lists hold more entries (self-edges included) than this. Faces
    that all match each other make n^2 of them: 10,000 (100 photos of 100 faces) would take 800 MB and minutes of
    chinese whispers."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be (n, d), got shape {emb.shape}")
    if np.isnan(emb).any():
        raise ValueError("embeddings contain NaN")
    norms = np.einsum("ij,ij->i", emb, emb)
    out: list[NDArray[np.int64]] = []
    links = 0
    for start in range(0, emb.shape[0], _BLOCK):
        d = squared_l2(emb[start : start + _BLOCK], emb)
        # The expansion is off by a few float32 ulps of |a|^2 + |b|^2 (and not symmetric): short-list with a slack
        # far above that, then decide on the exact distance.
        slack = EXPANSION_ERROR * (norms[start : start + d.shape[0], None] + norms[None, :])
        near = d <= threshold + slack
        for r in range(d.shape[0]):
            i = start + r
            cand = np.flatnonzero(near[r])
            keep = is_match(pairwise_squared_l2(emb[cand], np.broadcast_to(emb[i], (cand.size, emb.shape[1]))), threshold)
            keep[cand == i] = True  # self-edge
            out.append(cand[keep].astype(np.int64))
            links += out[-1].size
            if max_links is not None and links > max_links:
                raise TooManyLinks(emb.shape[0], max_links)
    return out


def _finish(raw: NDArray[np.int64], min_cluster_size: int) -> Clustering:
    """Renumber raw labels by decreasing size (ties: smallest member first); small clusters -> -1."""
    n = raw.size
    if n == 0:
        return Clustering(np.empty(0, np.int64), np.empty(0, np.int64), 0)
    uniq, first, inverse, counts = np.unique(raw, return_index=True, return_inverse=True, return_counts=True)
    order = np.lexsort((first, -counts))  # by size desc, then first member asc
    rank = np.empty(uniq.size, np.int64)
    rank[order] = np.arange(uniq.size)
    labels = rank[inverse.ravel()]
    sizes = counts[order]
    big = sizes >= min_cluster_size
    n_big = int(big.sum())  # sizes are sorted, so the kept clusters are 0 .. n_big-1
    labels = np.where(labels < n_big, labels, -1).astype(np.int64)
    return Clustering(labels, sizes[:n_big].astype(np.int64), int((labels == -1).sum()))


def chinese_whispers(
    embeddings: ArrayLike,
    threshold: float,
    *,
    iterations: int = 100,
    seed: int = 0,
    min_cluster_size: int = 2,
    max_links: int | None = None,
) -> Clustering:
    """dlib's chinese whispers over the threshold graph (see the module docstring); `max_links` as in
    `neighbour_lists`."""
    if iterations < 0:
        raise ValueError("iterations must be >= 0")
    nbrs = neighbour_lists(embeddings, threshold, max_links=max_links)
    n = len(nbrs)
    labels = np.arange(n, dtype=np.int64)
    if n:
        picks = np.random.default_rng(seed).integers(0, n, size=n * iterations)
        lab = labels  # local alias; updated in place
        for idx in picks.tolist():
            nb = nbrs[idx]
            if nb.size == 1:
                continue  # only itself: keeps its label
            values, counts = np.unique(lab[nb], return_counts=True)
            lab[idx] = values[int(np.argmax(counts))]  # argmax -> first max -> smallest label among ties
    return _finish(labels, min_cluster_size)


def connected_components(embeddings: ArrayLike, threshold: float, *, min_cluster_size: int = 2) -> Clustering:
    """Single-linkage clusters: faces joined by any chain of matches."""
    nbrs = neighbour_lists(embeddings, threshold)
    n = len(nbrs)
    labels = np.full(n, -1, dtype=np.int64)
    for root in range(n):
        if labels[root] != -1:
            continue
        labels[root] = root
        stack = [root]
        while stack:
            node = stack.pop()
            for nb in nbrs[node].tolist():
                if labels[nb] == -1:
                    labels[nb] = root
                    stack.append(nb)
    return _finish(labels, min_cluster_size)
