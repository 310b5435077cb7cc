"""Face-like synthetic embeddings for benchmarks and tests of large galleries (no photos, no model).

dlib's embeddings are not spread over the whole sphere: they sit around a common mean (norms ~1.3-1.5), people
differ mostly along a few directions, and photos of one person scatter around that person. The generator follows
that shape so that nearest-neighbour search meets the same difficulty as on real faces: identity centres = one
mean + an anisotropic deviation (squared distance between two centres ~0.7), each face = its centre + noise whose
size varies per photo, so two faces of one person are ~0.1-0.25 apart (squared L2) and of two people ~0.6-1.2,
as on the dev pairs (README, "Choosing a threshold").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from app.vision.types import EMBEDDING_DIM

_SHAPE_SEED = 20_260_727  # the mean and the principal directions are fixed, so all galleries share one "population"
CENTRE_SPREAD = 0.36  # summed per-coordinate variance of the centres: centre-to-centre squared distance ~0.72
FACE_NOISE = 0.075  # summed per-coordinate variance of one face around its centre (scaled by 0.6-1.6 per face)
MEAN_NORM = 1.2
# `gallery()` holds ~2.3 kB a face while it draws them (measured: 1M faces 2.3 GB, 2M 4.6 GB; numpy temporaries of
# 128 float32 each), and a served gallery takes ~0.7-1.3 kB a face in every worker. 5M faces (~11 GB to draw) is
# five times the largest gallery measured in the README; 10**12 was a MemoryError traceback from numpy.
MAX_FACES = 5_000_000


@dataclass(frozen=True)
class SyntheticGallery:
    embeddings: npt.NDArray[np.float32]  # (faces, 128)
    owners: npt.NDArray[np.int64]  # (faces,) identity number of each face, 0..identities-1
    centres: npt.NDArray[np.float32]  # (identities, 128)


def _shape() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    rng = np.random.default_rng(_SHAPE_SEED)
    spectrum = 1.0 / (np.arange(EMBEDDING_DIM) + 8.0)
    spectrum *= CENTRE_SPREAD / spectrum.sum()
    basis, _ = np.linalg.qr(rng.standard_normal((EMBEDDING_DIM, EMBEDDING_DIM)))
    mean = rng.standard_normal(EMBEDDING_DIM)
    mean *= MEAN_NORM / np.linalg.norm(mean)
    return mean.astype(np.float32), np.sqrt(spectrum).astype(np.float32), basis.astype(np.float32)


def identity_centres(rng: np.random.Generator, count: int) -> npt.NDArray[np.float32]:
    mean, scale, basis = _shape()
    deviation = (rng.standard_normal((count, EMBEDDING_DIM)).astype(np.float32) * scale) @ basis.T
    return (deviation + mean).astype(np.float32)


def faces_of(rng: np.random.Generator, centres: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """One fresh face (a new photo) per row of `centres`."""
    count = len(centres)
    size = rng.uniform(0.6, 1.6, size=(count, 1)).astype(np.float32)
    noise = rng.standard_normal((count, EMBEDDING_DIM)).astype(np.float32) * np.float32(np.sqrt(FACE_NOISE / EMBEDDING_DIM))
    return (centres + noise * size).astype(np.float32)


def gallery(faces: int, *, faces_per_identity: int = 3, seed: int = 0) -> SyntheticGallery:
    """`faces` faces of about faces / 2 identities (1 to `faces_per_identity` faces each, shuffled)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, faces_per_identity + 1, size=max(1, faces))
    counts = counts[: int(np.searchsorted(np.cumsum(counts), faces)) + 1]  # just enough identities for `faces`
    owners = np.repeat(np.arange(len(counts)), counts)[:faces]
    rng.shuffle(owners)
    owners = np.unique(owners, return_inverse=True)[1].astype(np.int64)  # identities numbered 0..k-1 without holes
    centres = identity_centres(rng, int(owners.max()) + 1 if faces else 0)
    return SyntheticGallery(faces_of(rng, centres[owners]), owners, centres)


def probes(
    synthetic: SyntheticGallery, *, enrolled: int, strangers: int, seed: int = 1
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Queries: fresh faces of `enrolled` random enrolled identities, then faces of `strangers` new people.
    Returns (queries, identity number or -1 for a stranger)."""
    rng = np.random.default_rng(seed)
    who = rng.choice(len(synthetic.centres), size=enrolled, replace=enrolled > len(synthetic.centres))
    known = faces_of(rng, synthetic.centres[who])
    unknown = faces_of(rng, identity_centres(rng, strangers))
    return np.concatenate([known, unknown]), np.concatenate([who, np.full(strangers, -1)]).astype(np.int64)
