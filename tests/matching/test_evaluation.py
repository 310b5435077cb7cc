"""ROC / AUC / EER / accuracy / k-fold / VAL@FAR on distances whose answers can be worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.matching.evaluation import (
    accuracy_at,
    auc,
    distance_histograms,
    equal_error_rate,
    evaluate_pairs,
    fold_ids,
    kfold_accuracy,
    roc_curve,
    val_at_far,
)

SAME = np.array([0.1, 0.2, 0.3, 0.4])
DIFF = np.array([0.35, 0.5, 0.6, 0.7])


class TestRoc:
    def test_points(self) -> None:
        roc = roc_curve(SAME, DIFF)
        np.testing.assert_allclose(roc.thresholds, [0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7])
        np.testing.assert_allclose(roc.tar, [0.25, 0.5, 0.75, 0.75, 1, 1, 1, 1])
        np.testing.assert_allclose(roc.far, [0, 0, 0, 0.25, 0.25, 0.5, 0.75, 1])

    def test_auc_is_the_mann_whitney_probability(self) -> None:
        # one of 16 (same, diff) pairs is out of order: 0.4 > 0.35 -> AUC = 15/16
        assert auc(roc_curve(SAME, DIFF)) == pytest.approx(15 / 16)
        assert auc(roc_curve([0.1, 0.2], [0.3, 0.4])) == pytest.approx(1.0)
        assert auc(roc_curve([0.5], [0.5])) == pytest.approx(0.5)  # a tie counts one half

    def test_eer_interpolates_between_the_points_around_the_crossing(self) -> None:
        # points (FAR, FRR): t=0.3 (0, 0.25), t=0.35 (0.25, 0.25) -> FAR = FRR = 0.25 exactly at t = 0.35
        e = equal_error_rate(roc_curve(SAME, DIFF))
        assert e.eer == pytest.approx(0.25)
        assert e.threshold == pytest.approx(0.35)
        # separable: FRR falls to 0 at t=0.2 while FAR is 0 -> crossing between (0, 0.5) at 0.1 and (0, 0) at 0.2
        e2 = equal_error_rate(roc_curve([0.1, 0.2], [0.3, 0.4]))
        assert e2.eer == pytest.approx(0.0)
        # crossing inside a segment (a tie at 0.3 moves FAR and FRR at once): (FAR, FRR) = (0, 0.5) at t=0.1,
        # (0.5, 0) at t=0.3 -> EER 0.25 halfway, at t=0.2
        e3 = equal_error_rate(roc_curve([0.1, 0.3], [0.3, 0.4]))
        assert e3.eer == pytest.approx(0.25)
        assert e3.threshold == pytest.approx(0.2)

    def test_accuracy_at(self) -> None:
        r = accuracy_at(SAME, DIFF, 0.36)
        assert (r.true_accepts, r.false_accepts) == (3, 1)
        assert r.accuracy == pytest.approx(6 / 8)
        assert r.tar == pytest.approx(0.75)
        assert r.far == pytest.approx(0.25)


class TestValAtFar:
    def test_largest_threshold_with_far_under_target(self) -> None:
        diff = np.arange(1, 1001) / 1000.0  # 0.001 .. 1.000
        same = np.array([0.0005, 0.0015, 0.0025, 0.5])
        v = val_at_far(same, diff, 1e-3)  # one false accept allowed: accept d <= 0.001, reject 0.002
        assert v.false_accepts == 1
        assert v.far == pytest.approx(1e-3)
        assert 0.001 <= v.threshold < 0.002
        assert v.val == pytest.approx(2 / 4)
        v2 = val_at_far(same, diff, 1e-2)  # ten allowed
        assert v2.false_accepts == 10
        assert v2.val == pytest.approx(3 / 4)


class TestKFold:
    def test_folds_are_stratified_round_robin(self) -> None:
        same = np.array([True, False, True, True, False, False, True])
        np.testing.assert_array_equal(fold_ids(same, 3), [0, 0, 1, 2, 1, 2, 0])

    def test_separable_pairs_give_full_accuracy(self) -> None:
        rng = np.random.default_rng(0)
        d = np.concatenate([rng.uniform(0.0, 0.3, 300), rng.uniform(0.5, 1.0, 300)])
        same = np.arange(600) < 300
        r = kfold_accuracy(d, same)
        assert r.n_folds == 10
        assert r.mean == 1.0
        assert all(0.3 <= t <= 0.5 for t in r.thresholds)

    def test_threshold_is_chosen_on_the_other_folds(self) -> None:
        # Fold 0 holds a same pair at 0.45, everything else is separable around 0.4 (same <= 0.3, diff >= 0.5).
        # Fold 0 also holds the different pair at 0.5, so trained without it the largest same distance is 0.296
        # and the smallest different one 0.502: threshold = their midpoint 0.399 -> 0.45 is rejected in fold 0.
        same_d = [0.45] + [0.1 + 0.002 * i for i in range(99)]
        diff_d = [0.5 + 0.002 * i for i in range(100)]
        d = np.array(same_d + diff_d)
        same = np.array([True] * 100 + [False] * 100)
        r = kfold_accuracy(d, same)
        assert r.thresholds[0] == pytest.approx((0.296 + 0.502) / 2)
        assert r.accuracies[0] == pytest.approx(19 / 20)
        assert all(a == 1.0 for a in r.accuracies[1:])
        assert r.mean == pytest.approx(1 - 0.05 / 10)


class TestReport:
    def test_missing_pairs_are_counted_not_used(self) -> None:
        d = np.array([0.1, 0.2, np.nan, 0.6, 0.7, np.nan, np.nan] + [0.15] * 20 + [0.8] * 20)
        same = np.array([True, True, True, False, False, False, False] + [True] * 20 + [False] * 20)
        rep = evaluate_pairs(d, same, threshold=0.36)
        assert rep.n_pairs == 47
        assert (rep.n_missing, rep.n_missing_same, rep.n_missing_different) == (3, 1, 2)
        assert (rep.n_same, rep.n_different) == (23, 24)
        assert rep.at_threshold.accuracy == 1.0
        assert rep.accuracy_missing_as_errors == pytest.approx(44 / 47)
        assert rep.auc == 1.0
        payload = json.loads(json.dumps(rep.to_dict()))
        assert payload["n_missing"] == 3
        assert payload["kfold"]["mean"] == 1.0
        assert [v["target_far"] for v in payload["val_at_far"]] == [1e-3, 1e-2]
        assert sum(payload["histograms"]["same_counts"]) == 22

    def test_histograms_share_bins(self) -> None:
        h = distance_histograms([0.01, 0.03], [0.05], bin_width=0.02)
        np.testing.assert_allclose(h.bin_edges, [0.0, 0.02, 0.04, 0.06])
        np.testing.assert_array_equal(h.same_counts, [1, 1, 0])
        np.testing.assert_array_equal(h.different_counts, [0, 0, 1])

    def test_needs_both_labels(self) -> None:
        with pytest.raises(ValueError):
            evaluate_pairs([0.1, 0.2], [True, True])
