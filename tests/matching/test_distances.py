"""squared_l2 / pairwise_squared_l2 / is_match on hand-checkable vectors."""

from __future__ import annotations

import numpy as np
import pytest

from app.matching.distances import pairwise_squared_l2, squared_l2
from app.matching.thresholds import (
    DEFAULT_THRESHOLD,
    is_match,
    validate_rate,
    validate_threshold,
)


class TestSquaredL2:
    def test_hand_values(self) -> None:
        a = np.array([[0.0, 0.0], [1.0, 0.0]])
        b = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
        d = squared_l2(a, b)
        assert d.dtype == np.float32
        assert d.shape == (2, 3)
        np.testing.assert_allclose(d, [[25.0, 1.0, 0.0], [20.0, 0.0, 1.0]], atol=1e-5)

    def test_never_negative_for_identical_rows(self) -> None:
        rng = np.random.default_rng(1)
        x = rng.normal(size=(50, 128)).astype(np.float32) * 0.1 + 0.05
        d = squared_l2(x, x)
        assert d.min() >= 0.0
        assert np.abs(np.diag(d)).max() < 1e-5

    def test_matches_direct_difference_and_blocks(self) -> None:
        rng = np.random.default_rng(2)
        a = rng.normal(size=(5000, 16)).astype(np.float32)  # > one block of rows
        b = rng.normal(size=(7, 16)).astype(np.float32)
        direct = ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)
        np.testing.assert_allclose(squared_l2(a, b), direct, rtol=1e-4, atol=1e-4)

    def test_single_vector_and_nan(self) -> None:
        b = np.array([[1.0, 1.0], [np.nan, 0.0]])
        d = squared_l2(np.array([0.0, 0.0]), b)
        assert d.shape == (1, 2)
        assert d[0, 0] == pytest.approx(2.0)
        assert np.isnan(d[0, 1])

    def test_dimension_mismatch(self) -> None:
        with pytest.raises(ValueError):
            squared_l2(np.zeros((2, 3)), np.zeros((2, 4)))

    def test_pairwise_is_the_gallerys_distance_to_the_last_bit(self) -> None:
        # verify (photo vs photo), verify (photo vs identity) and identify must give one answer for a pair at
        # exactly the threshold: the same float32 distance, whatever the memory order of the inputs.
        rng = np.random.default_rng(4)
        a = (rng.normal(size=(300, 128)) * 0.09).astype(np.float32)
        b = (rng.normal(size=(300, 128)) * 0.09).astype(np.float32)
        gallery = ((a - b) ** 2).sum(axis=1, dtype=np.float32)  # app.gallery.index's exact distance
        np.testing.assert_array_equal(pairwise_squared_l2(a, b), gallery)
        np.testing.assert_array_equal(pairwise_squared_l2(np.asfortranarray(a), np.asfortranarray(b)), gallery)
        one = np.array([pairwise_squared_l2(a[i], b[i])[0] for i in range(a.shape[0])])
        np.testing.assert_array_equal(one, gallery)
        for i in range(a.shape[0]):  # the threshold set to the distance itself: a match for every path
            assert is_match(float(pairwise_squared_l2(a[i], b[i])[0]), float(gallery[i]))

    def test_pairwise(self) -> None:
        a = np.array([[0.0, 0.0], [1.0, 2.0]])
        b = np.array([[3.0, 4.0], [1.0, 0.0]])
        np.testing.assert_allclose(pairwise_squared_l2(a, b), [25.0, 4.0])
        with pytest.raises(ValueError):
            pairwise_squared_l2(a, b[:1])


class TestThresholds:
    def test_at_threshold_is_a_match(self) -> None:
        assert DEFAULT_THRESHOLD == 0.36
        assert is_match(0.36, 0.36) is True
        assert is_match(0.3600001, 0.36) is False
        np.testing.assert_array_equal(is_match(np.array([0.1, 0.36, 0.5, np.nan]), 0.36), [True, True, False, False])

    def test_float32_distances_are_compared_exactly(self) -> None:
        # A calibrated threshold lies one float64 step below the first rejected distance, a float32: compared in
        # float32 (numpy's rule for a float32 array or scalar against a Python float) it would round up and match.
        d = np.array([0.3, 0.2], dtype=np.float32)
        below = float(np.nextafter(float(d[0]), -np.inf))
        np.testing.assert_array_equal(is_match(d, below), [False, True])
        assert is_match(d[0], below) is False
        assert is_match(float(d[0]), below) is False
        np.testing.assert_array_equal(is_match(d, float(d[0])), [True, True])

    @pytest.mark.parametrize("bad", [0.0, -0.1, 4.5, float("nan"), float("inf")])
    def test_validate_threshold_refuses(self, bad: float) -> None:
        with pytest.raises(ValueError):
            validate_threshold(bad)

    def test_validate(self) -> None:
        assert validate_threshold(4.0) == 4.0
        assert validate_rate(0.01) == 0.01
        for bad in (0.0, 1.0, -1.0, float("nan")):
            with pytest.raises(ValueError):
                validate_rate(bad)
