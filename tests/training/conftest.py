"""Training fixtures: the dev faces' base embeddings (from the shared `dev_results`, so no photo is embedded
again here) and synthetic labelled embeddings for tests that need no model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.training import EmbeddingSet
from tests.dev_embeddings import DevResults


@pytest.fixture(scope="session")
def dev_embeddings(dev_results: DevResults) -> EmbeddingSet:
    """Base embeddings of the dev photos' largest faces (as `facegate train --images dev` computes them)."""
    return EmbeddingSet.from_mapping(dev_results.largest("ours"), identity_of=lambda p: Path(p).parts[0])


def synthetic_set(n_identities: int = 12, per_identity: int = 6, *, seed: int = 0, noise: float = 0.08) -> EmbeddingSet:
    """Clusters around random centres at dlib's scale (norm ~1.4), labelled by cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_identities, 128))
    centres *= 1.4 / np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_identities), per_identity)
    x = centres[labels] + rng.normal(scale=noise, size=(len(labels), 128))
    return EmbeddingSet(x.astype(np.float32), labels.astype(np.int64), tuple(f"p{i:02d}" for i in range(n_identities)))
