"""Threshold for a target FAR, binomial intervals, calibration tables, pairs from a gallery."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from app.gallery.index import GalleryIndex
from app.gallery.store import Change, ChangeOp
from app.gallery.synthetic import gallery
from app.matching.calibration import (
    CalibrationTable,
    IntervalMethod,
    binomial_interval,
    calibrate_far,
    compute_default_table,
    load_default_table,
    most_allowed,
    pairs_from_gallery,
    threshold_for_far,
)
from app.matching.distances import pairwise_squared_l2
from app.matching.thresholds import is_match


class TestThresholdForFar:
    def test_largest_threshold_under_target(self) -> None:
        diff = np.array([0.5, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])  # n = 10
        t = threshold_for_far(diff, 0.1)  # one false accept allowed: 0.2 in, 0.3 out
        assert 0.2 <= t < 0.3
        assert np.nextafter(t, np.inf) == 0.3  # nothing larger would still keep FAR <= 0.1
        assert threshold_for_far(diff, 0.05) < 0.2  # none allowed
        assert 0.3 <= threshold_for_far(diff, 0.25) < 0.4  # floor(2.5) = 2

    def test_a_target_just_under_1_keeps_the_last_pair_out(self) -> None:
        # target * n + 1e-9 was rounded up to n: an index past the last pair (IndexError, a 500 from /calibrate).
        assert threshold_for_far([0.5], 0.9999999999999999) < 0.5
        assert 0.6 <= threshold_for_far([0.5, 0.6, 0.7], 1 - 1e-10) < 0.7

    def test_a_target_just_under_k_over_n_allows_one_fewer(self) -> None:
        """A fixed slack of 1e-9 on target * n let 1 of 3 pairs in for a target of 0.3333333333 (FAR 1/3 reported
        over the target it was asked to keep)."""
        assert threshold_for_far([0.5, 0.6, 0.7], 0.3333333333) < 0.5
        result = calibrate_far([0.1], [0.5, 0.6, 0.7], 0.3333333333)
        assert result.far == 0.0 <= result.target_far and result.false_accepts == 0
        assert 0.5 <= threshold_for_far([0.5, 0.6, 0.7], 1 / 3) < 0.6  # exactly 1/3 still lets one in

    def test_most_allowed_is_the_largest_count_within_the_rate(self) -> None:
        rng = np.random.default_rng(7)
        for _ in range(5_000):
            n = int(rng.integers(1, 400))
            k = int(rng.integers(0, n + 1))
            # rates at, just under and just over k / n, and rates whose product with n is off in float
            for rate in (k / n, np.nextafter(k / n, 0), np.nextafter(k / n, 1), k / n - 1e-10, round(k / n, 2)):
                if 0 < rate < 1:
                    expected = max(j for j in range(n + 1) if j / n <= rate)
                    assert most_allowed(float(rate), n) == expected, (rate, n)
        assert most_allowed(0.29, 100) == 29  # 0.29 * 100 is 28.999999999999996

    def test_nan_ignored(self) -> None:
        assert threshold_for_far([np.nan, 0.2, 0.4], 0.5) == threshold_for_far([0.2, 0.4], 0.5)

    def test_refuses_bad_targets(self) -> None:
        for bad in (0.0, 1.0, 2.0):
            with pytest.raises(ValueError):
                threshold_for_far([0.1, 0.2], bad)


class TestIntervals:
    def test_clopper_pearson_known_values(self) -> None:
        lo, hi = binomial_interval(5, 10)
        assert lo == pytest.approx(0.187086, abs=1e-6)
        assert hi == pytest.approx(0.812914, abs=1e-6)
        # k = 0 has the closed form upper bound 1 - (alpha/2)^(1/n)
        lo0, hi0 = binomial_interval(0, 100)
        assert lo0 == 0.0
        assert hi0 == pytest.approx(1 - 0.025 ** (1 / 100), rel=1e-9)
        lon, hin = binomial_interval(100, 100)
        assert hin == 1.0
        assert lon == pytest.approx(0.025 ** (1 / 100), rel=1e-9)

    def test_wilson_known_values(self) -> None:
        lo, hi = binomial_interval(5, 10, method=IntervalMethod.WILSON)
        assert lo == pytest.approx(0.236593, abs=1e-5)
        assert hi == pytest.approx(0.763407, abs=1e-5)

    @pytest.mark.parametrize("method", list(IntervalMethod))
    def test_interval_shrinks_with_more_pairs(self, method: IntervalMethod) -> None:
        widths = []
        for n in (1_000, 10_000, 100_000):
            lo, hi = binomial_interval(n // 100, n, method=method)  # FAR 1 % observed
            assert lo < 0.01 < hi
            widths.append(hi - lo)
        assert widths[0] > widths[1] > widths[2]
        assert widths[0] / widths[2] == pytest.approx(10, rel=0.2)  # ~ 1/sqrt(n)

    def test_calibrate_far_reports_counts_and_intervals(self) -> None:
        rng = np.random.default_rng(3)
        same = rng.normal(0.2, 0.05, 2_000)
        diff = rng.normal(0.6, 0.08, 20_000)
        c = calibrate_far(same, diff, 1e-3)
        assert c.false_accepts == 20
        assert c.far == pytest.approx(1e-3)
        assert c.far_interval[0] < 1e-3 < c.far_interval[1]
        assert c.val_interval[0] <= c.val <= c.val_interval[1]
        assert c.val > 0.99  # the two normals are ~4 sigma apart at FAR 1e-3
        assert json.loads(json.dumps(c.to_dict()))["n_different"] == 20_000


class TestTable:
    def test_table_round_trip_and_interpolation(self, tmp_path: Path) -> None:
        d = np.array([0.1, 0.2, 0.3, np.nan, 0.3, 0.5, 0.7, 0.9])
        same = np.array([True, True, True, True, False, False, False, False])
        table = compute_default_table(d, same, model_version="m1", source="unit", grid=[0.0, 0.4, 0.8])
        np.testing.assert_allclose(table.far, [0.0, 0.25, 0.75])
        np.testing.assert_allclose(table.val, [0.0, 1.0, 1.0])
        assert table.n_missing == 1
        assert table.far_at(0.6) == pytest.approx(0.5)
        assert table.far_at(5.0) == pytest.approx(0.75)  # clamped
        assert all(u >= f for u, f in zip(table.far_upper, table.far, strict=True))
        path = tmp_path / "t.json"
        table.save(path)
        again = CalibrationTable.load(path)
        np.testing.assert_allclose(again.far, table.far)
        assert again.model_version == "m1"

    def test_shipped_table_is_sane(self) -> None:
        table = load_default_table()
        assert table.n_different > 1000
        assert np.all(np.diff(table.far) >= 0)
        assert np.all(np.diff(table.val) >= 0)
        assert 0.0 < table.far_at(0.36) < 0.05
        assert table.val_at(0.36) > 0.5
        assert table.source


class TestGalleryPairs:
    def test_pairs_only_from_identities_with_two_faces(self) -> None:
        ids = np.array(["a", "a", "b", "c", "c", "c"])
        emb = np.arange(6, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
        pairs = pairs_from_gallery(ids, emb)
        assert pairs.n_identities == 2
        assert int(pairs.same.sum()) == 1 + 3  # a: 1 pair, c: 3 pairs
        assert int((~pairs.same).sum()) == 2 * 3  # a x c
        assert 2 not in set(pairs.index_a) | set(pairs.index_b)  # b has one face
        i = int(np.flatnonzero(~pairs.same)[0])
        assert pairs.distances[i] == pytest.approx(4 * (pairs.index_a[i] - pairs.index_b[i]) ** 2)

    def test_different_pairs_are_capped_deterministically(self) -> None:
        ids = np.repeat(np.arange(50), 2)
        emb = np.random.default_rng(0).normal(size=(100, 8))
        a = pairs_from_gallery(ids, emb, max_different=100, seed=1)
        b = pairs_from_gallery(ids, emb, max_different=100, seed=1)
        assert int((~a.same).sum()) == 100
        np.testing.assert_array_equal(a.index_a, b.index_a)

    def test_needs_two_faces(self) -> None:
        with pytest.raises(ValueError):
            pairs_from_gallery(np.array([1, 2]), np.zeros((2, 3)))

    def test_calibrated_far_holds_for_the_gallerys_own_decisions(self) -> None:
        # The pairs' distances are the ones verify/identify compute (the gallery index's), to the last bit: the
        # threshold sits one float below the first rejected impostor distance, so an ulp lower there (another
        # summation order) would be a false accept the calibration never counted.
        rng = np.random.default_rng(3)
        n_ids, per_id = 40, 3
        centres = rng.normal(size=(n_ids, 128)) * 0.09
        emb = (np.repeat(centres, per_id, axis=0) + rng.normal(size=(n_ids * per_id, 128)) * 0.04).astype(np.float32)
        owners = [f"{i:032x}" for i in range(n_ids) for _ in range(per_id)]
        faces = [f"{i:032x}" for i in range(10_000, 10_000 + len(owners))]
        index = GalleryIndex("m")
        index.apply(Change(i + 1, ChangeOp.ADD, f, o, v, "m") for i, (f, o, v) in enumerate(zip(faces, owners, emb)))
        pairs = pairs_from_gallery(np.array(owners), emb)
        served = np.empty(pairs.distances.size, np.float32)
        for k, (a, b) in enumerate(zip(pairs.index_a.tolist(), pairs.index_b.tolist(), strict=True)):
            ids, dist = index.identity_distances(emb[a], owners[b])
            served[k] = dist[ids.index(faces[b])]
        np.testing.assert_array_equal(pairs.distances, served)
        for target in (0.001, 0.01, 0.05):
            c = calibrate_far(pairs.distances[pairs.same], pairs.distances[~pairs.same], target)
            false_accepts = int(np.count_nonzero(is_match(served[~pairs.same], c.threshold)))
            assert false_accepts == c.false_accepts <= target * c.n_different


class TestGalleryPairsBounds:
    """A large gallery's pairs are drawn, not listed: memory and time follow the caps, not the gallery's square."""

    @staticmethod
    def _gallery(faces: int) -> tuple[np.ndarray, np.ndarray]:
        synthetic = gallery(faces, faces_per_identity=3, seed=4)
        return synthetic.owners, synthetic.embeddings

    def test_large_gallery_memory_follows_the_caps(self) -> None:
        # 8,000 faces (~5,300 in identities with 2+ faces) have 14 million pairs: listing them held ~450 MB.
        ids, emb = self._gallery(8_000)
        tracemalloc.start()
        try:
            pairs = pairs_from_gallery(ids, emb, max_different=20_000, max_same=20_000)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert int((~pairs.same).sum()) == 20_000
        counts = np.bincount(ids)
        assert int(pairs.same.sum()) == int((counts * (counts - 1) // 2).sum())  # fewer than the cap: all of them
        assert peak < 40 * 2**20, f"peak {peak / 2**20:.0f} MiB"

    def test_drawn_pairs_are_distinct_labelled_and_match_the_distances(self) -> None:
        ids, emb = self._gallery(8_000)
        pairs = pairs_from_gallery(ids, emb, max_different=5_000, max_same=1_000, seed=2)
        a, b = pairs.index_a, pairs.index_b
        assert np.all(a < b)
        assert len(set(zip(a.tolist(), b.tolist(), strict=True))) == a.size
        np.testing.assert_array_equal(ids[a] == ids[b], pairs.same)
        np.testing.assert_array_equal(pairs.distances, pairwise_squared_l2(emb[a], emb[b]))
        again = pairs_from_gallery(ids, emb, max_different=5_000, max_same=1_000, seed=2)
        np.testing.assert_array_equal(again.index_a, a)
        np.testing.assert_array_equal(again.index_b, b)

    def test_drawn_different_pairs_are_uniform(self) -> None:
        # Every face of a 2-face identity is in as many different pairs: each should be drawn about equally often.
        ids = np.repeat(np.arange(1_500), 2)  # 4.5 million pairs: drawn
        emb = np.zeros((ids.size, 2), np.float32)
        hits = np.zeros(ids.size)
        for seed in range(10):
            pairs = pairs_from_gallery(ids, emb, max_different=30_000, max_same=10, seed=seed)
            np.add.at(hits, pairs.index_a[~pairs.same], 1)
            np.add.at(hits, pairs.index_b[~pairs.same], 1)
        per_tenth = hits.reshape(10, -1).sum(axis=1)  # 600,000 endpoints over 10 equal slices of the faces
        assert np.all(np.abs(per_tenth / per_tenth.mean() - 1) < 0.02)

    def test_one_huge_identity(self) -> None:
        # 6,000 faces of one person and 20 people with 2 faces: same pairs are sampled, the few different ones listed.
        ids = np.r_[np.zeros(6_000, np.int64), np.repeat(np.arange(1, 21), 2)]
        emb = np.random.default_rng(0).normal(size=(ids.size, 4)).astype(np.float32)
        pairs = pairs_from_gallery(ids, emb, max_different=300_000, max_same=1_000)
        assert int(pairs.same.sum()) == 1_000
        assert int((~pairs.same).sum()) == 6_000 * 40 + 40 * 39 // 2 - 20
        assert np.all(ids[pairs.index_a[~pairs.same]] != ids[pairs.index_b[~pairs.same]])
