"""Chinese whispers and connected components on synthetic Gaussian clusters."""

from __future__ import annotations

import numpy as np
import pytest

from app.matching.clustering import TooManyLinks, chinese_whispers, connected_components, neighbour_lists
from app.matching.distances import pairwise_squared_l2
from app.matching.thresholds import is_match


def _blobs(n_people: int, per_person: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_people, 128)).astype(np.float32) * 0.12  # centres ~ 2.8 apart (squared)
    truth = np.repeat(np.arange(n_people), per_person)
    emb = centres[truth] + rng.normal(size=(truth.size, 128)).astype(np.float32) * spread
    return emb, truth


def _purity(labels: np.ndarray, truth: np.ndarray) -> float:
    kept = labels >= 0
    total = 0
    for c in np.unique(labels[kept]):
        total += np.bincount(truth[labels == c]).max()
    return total / kept.sum()


class TestChineseWhispers:
    def test_recovers_gaussian_clusters(self) -> None:
        emb, truth = _blobs(12, 10, spread=0.03, seed=0)  # within-person squared distance ~ 0.23 < 0.36
        outliers = np.random.default_rng(9).normal(size=(5, 128)).astype(np.float32) * 0.12
        c = chinese_whispers(np.vstack([emb, outliers]), 0.36)
        assert c.n_clusters == 12
        assert c.n_unclustered == 5
        np.testing.assert_array_equal(c.labels[-5:], -1)
        assert _purity(c.labels[:-5], truth) == 1.0
        np.testing.assert_array_equal(c.sizes, [10] * 12)

    def test_deterministic_for_a_seed_and_numbered_by_size(self) -> None:
        emb, _ = _blobs(3, 4, spread=0.03, seed=1)
        emb = np.vstack([emb[:4], emb[4:8][:2], emb[8:]])  # sizes 4, 2, 4
        a = chinese_whispers(emb, 0.36, seed=5)
        b = chinese_whispers(emb, 0.36, seed=5)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.sizes, [4, 4, 2])
        np.testing.assert_array_equal(a.labels, [0] * 4 + [2] * 2 + [1] * 4)

    def test_min_cluster_size(self) -> None:
        emb, _ = _blobs(2, 3, spread=0.03, seed=2)
        c = chinese_whispers(emb, 0.36, min_cluster_size=4)
        assert c.n_clusters == 0
        assert c.n_unclustered == 6

    def test_chain_is_cut_by_whispers_but_not_by_components(self) -> None:
        # two dense groups of 6 linked through one bridge face: components merge them, whispers keeps two
        rng = np.random.default_rng(4)
        a = np.zeros(128, np.float32)
        b = np.zeros(128, np.float32)
        b[0] = 1.0  # squared distance 1.0 between centres
        group_a = a + rng.normal(size=(6, 128)).astype(np.float32) * 0.005
        group_b = b + rng.normal(size=(6, 128)).astype(np.float32) * 0.005
        bridge = ((a + b) / 2)[None, :]  # 0.25 from each centre
        emb = np.vstack([group_a, bridge, group_b])
        cw = chinese_whispers(emb, 0.3)
        cc = connected_components(emb, 0.3)
        assert cc.n_clusters == 1
        assert cw.n_clusters == 2
        assert set(cw.labels[:6]) != set(cw.labels[7:])


class TestConnectedComponents:
    def test_components(self) -> None:
        emb, truth = _blobs(5, 4, spread=0.03, seed=3)
        c = connected_components(emb, 0.36)
        assert c.n_clusters == 5
        assert _purity(c.labels, truth) == 1.0
        assert c.to_dict()["n_unclustered"] == 0

    def test_empty(self) -> None:
        c = connected_components(np.zeros((0, 128), np.float32), 0.36)
        assert c.n_clusters == 0


class TestNeighbourLists:
    def test_a_link_is_the_1to1_decision_even_at_the_threshold(self) -> None:
        # Thresholds set to pairs' exact distances: the pair must link (distance <= threshold), both ways, and
        # every link must be what /verify decides on that pair (not the expansion's ulp-different, asymmetric value).
        rng = np.random.default_rng(5)
        emb = (rng.normal(size=(150, 128)) * 0.09).astype(np.float32)
        n = emb.shape[0]
        i, j = np.triu_indices(n, k=1)
        exact = np.zeros((n, n), np.float32)
        exact[i, j] = exact[j, i] = pairwise_squared_l2(emb[i], emb[j])
        for threshold in np.sort(exact[i, j])[:40].tolist():
            nbrs = neighbour_lists(emb, threshold)
            for a in range(n):
                expected = np.flatnonzero(is_match(exact[a], threshold) | (np.arange(n) == a))
                np.testing.assert_array_equal(nbrs[a], expected)

    def test_identical_embeddings_and_one_face(self) -> None:
        same = np.tile(np.linspace(-0.1, 0.1, 128, dtype=np.float32), (4, 1))
        assert [x.tolist() for x in neighbour_lists(same, 1e-6)] == [[0, 1, 2, 3]] * 4
        assert chinese_whispers(same, 1e-6).labels.tolist() == [0, 0, 0, 0]
        assert chinese_whispers(same[:1], 0.25).labels.tolist() == [-1]


def test_neighbour_lists_stop_past_max_links() -> None:
    rng = np.random.default_rng(4)
    base = rng.normal(size=128).astype(np.float32)
    base /= np.linalg.norm(base)
    same = np.repeat(base[None], 50, axis=0)  # 50 identical faces: 2,500 links, self-links included
    assert sum(len(n) for n in neighbour_lists(same, 0.25, max_links=2_500)) == 2_500
    with pytest.raises(TooManyLinks) as refused:
        neighbour_lists(same, 0.25, max_links=2_499)
    assert (refused.value.faces, refused.value.max_links) == (50, 2_499)
