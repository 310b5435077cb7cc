"""PK batches (Hermans et al. 2017, FaceNet's batches of several faces per person): P identities x K faces.

Triplet and contrastive losses need several faces of one person AND several people in every batch; drawing photos
at random gives batches with no positive pair. An epoch visits every identity with >= 2 faces once (shuffled,
in groups of P; a last group of fewer than 2 identities is dropped); each identity gives K faces, drawn without
replacement when it has K or more, with replacement otherwise. Seeded: the same seed gives the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_BATCH_FACES", "PKSampler", "batch_problem"]

# Batch-all mining weighs every (anchor, positive, negative) of a batch: memory grows with the cube of its size.
# Measured on CPU (loss and backward): 256 faces 0.6 GB, 512 faces 2 GB and 7 s a step, 1024 faces 13 GB and 44 s;
# the other losses hold a batch x batch x 128 difference tensor (1024 faces: 2 GB). The default batch is 16 x 4.
MAX_BATCH_FACES = 512


def batch_problem(p: int, k: int) -> str | None:
    """Why P identities x K faces cannot make the batches (None: they can)."""
    if p < 2 or k < 2:
        return f"PK sampling needs P >= 2 identities and K >= 2 faces each, got P={p}, K={k}"
    if p * k > MAX_BATCH_FACES:
        return (
            f"a batch of P x K = {p} x {k} = {p * k} faces is over {MAX_BATCH_FACES}: batch-all mining weighs every "
            "triplet of a batch, and its memory grows with the cube of the batch (1024 faces: 13 GB). Lower P or K; a "
            "P above the number of training identities adds nothing (a batch then holds all of them)"
        )
    return None


class PKSampler:
    def __init__(self, labels: npt.ArrayLike, *, p: int, k: int, seed: int = 0) -> None:
        problem = batch_problem(p, k)
        if problem is not None:
            raise ValueError(problem)
        self.labels = np.asarray(labels, np.int64)
        self.p = p
        self.k = k
        self._rng = np.random.default_rng(seed)
        by_label: dict[int, list[int]] = {}
        for index, label in enumerate(self.labels.tolist()):
            by_label.setdefault(label, []).append(index)
        self.groups = {label: np.array(rows) for label, rows in by_label.items() if len(rows) >= 2}
        if len(self.groups) < 2:
            raise ValueError("PK sampling needs at least 2 identities with 2 or more faces")

    def __len__(self) -> int:
        full, rest = divmod(len(self.groups), self.p)
        return full + (1 if rest >= 2 else 0)

    def __iter__(self) -> Iterator[npt.NDArray[np.int64]]:
        """One epoch of batches of indices into `labels` (P*K of them; fewer identities in the last)."""
        order = self._rng.permutation(np.array(sorted(self.groups)))
        for start in range(0, len(order), self.p):
            chosen = order[start : start + self.p]
            if len(chosen) < 2:
                break
            parts = []
            for label in chosen.tolist():
                rows = self.groups[label]
                parts.append(self._rng.choice(rows, size=self.k, replace=len(rows) < self.k))
            yield np.concatenate(parts).astype(np.int64)
