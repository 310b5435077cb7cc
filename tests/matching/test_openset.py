"""Open-set decision: each reason on tiny galleries, the calibrated model, and gallery-size recalibration."""

from __future__ import annotations

import itertools
import json
import math
import threading

import numpy as np
import pytest
from pydantic import ValidationError

from app.config import Settings
from app.matching.data_files import OPENSET_FILE, data_dir
from app.matching.openset import (
    DEFAULT_BETA,
    DEFAULT_CAP,
    OpenSetModel,
    Reason,
    _accept_distance,
    build_model,
    decide,
    facegate_score,
    leave_one_identity_out,
    load_default_model,
    nearest_identities,
    simulate_stranger_scores,
)

# A hand-made model: thresholds tighten from N = 1 to N = 100; levels 1 %, 10 %.
HAND = OpenSetModel(
    gallery_sizes=np.array([1.0, 10.0, 100.0]),
    levels=np.array([0.01, 0.1]),
    quantiles=np.array([[-0.4, -0.2], [-0.6, -0.4], [-0.8, -0.6]]),
)
# Every score passes: only the distance and margin tests decide.
LOOSE = OpenSetModel(np.array([1.0, 2.0]), np.array([0.01, 0.5]), np.array([[9.0, 9.5], [9.0, 9.5]]))


class TestScore:
    def test_formula_and_cap(self) -> None:
        assert facegate_score(0.1, 0.2) == pytest.approx(math.log(0.1) - DEFAULT_BETA * math.log(0.2))
        # a runner-up beyond the cap (or none at all) counts as the cap
        assert facegate_score(0.1, 0.9) == pytest.approx(math.log(0.1) - DEFAULT_BETA * math.log(DEFAULT_CAP))
        assert facegate_score(0.1, np.inf) == facegate_score(0.1, 0.9)


class TestModel:
    def test_threshold_interpolates_in_log_n_and_log_fpir(self) -> None:
        assert HAND.threshold(10, 0.01) == pytest.approx(-0.6)
        assert HAND.threshold(3, 0.01) == pytest.approx(-0.4 - 0.2 * math.log(3) / math.log(10))  # linear in log N
        assert HAND.threshold(10, math.sqrt(0.001)) == pytest.approx(-0.5)  # halfway in log FPIR
        assert HAND.threshold(10**6, 0.01) == pytest.approx(-0.8)  # beyond the grid: the last row

    def test_fpir_at_inverts_threshold(self) -> None:
        for n in (1, 5, 50):
            for f in (0.01, 0.03, 0.1):
                assert HAND.fpir_at(HAND.threshold(n, f), n) == pytest.approx(f, rel=1e-6)
        assert HAND.fpir_at(-5.0, 10) == 0.01  # clamped to the levels
        assert HAND.fpir_at(5.0, 10) == 0.1

    def test_refuses_out_of_range(self) -> None:
        with pytest.raises(ValueError):
            HAND.threshold(0, 0.01)
        with pytest.raises(ValueError):
            HAND.threshold(10, 0.5)
        with pytest.raises(ValueError):
            OpenSetModel(np.array([2.0, 3.0]), np.array([0.01, 0.1]), np.zeros((2, 2)))

    def test_json_round_trip(self, tmp_path) -> None:  # type: ignore[no-untyped-def]
        path = tmp_path / "m.json"
        HAND.save(path)
        again = OpenSetModel.load(path)
        np.testing.assert_allclose(again.quantiles, HAND.quantiles)
        assert again.beta == HAND.beta

    def test_shipped_model(self) -> None:
        m = load_default_model()
        assert m.gallery_sizes[0] == 1 and m.gallery_sizes[-1] >= 100_000
        # one enrolled identity: the rule is a distance threshold near dlib's 1:1 operating range
        accept_distance = math.exp(m.threshold(1, 0.01)) * m.cap**m.beta
        assert 0.3 < accept_distance < 0.45
        # a larger gallery needs a stricter threshold than a single identity at the same FPIR
        assert m.threshold(1000, 0.01) < m.threshold(1, 0.01)
        assert m.threshold(100_000, 0.01) <= m.threshold(3 * int(m.meta["validated_up_to"] // 3), 0.01) + 1e-9


    @pytest.mark.parametrize("flip", [False, True])
    def test_every_fpir_the_setting_takes_has_a_threshold(self, flip: bool) -> None:
        """FACEGATE_IDENTIFY_FPIR takes exactly the range the shipped open-set models cover: a value outside it made
        every /identify a 500 (ValueError from threshold()), while /readyz said ready; it is refused at start now."""
        model = OpenSetModel.load(data_dir(flip) / OPENSET_FILE)
        field = Settings.model_fields["identify_fpir"]
        bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in field.metadata}
        assert (bounds["Ge"], bounds["Le"]) == (model.levels[0], model.levels[-1])
        for fpir in (bounds["Ge"], 0.01, bounds["Le"]):
            for size in (1, 2, 1000, 10_000_000):
                assert math.isfinite(model.threshold(size, Settings(identify_fpir=fpir).identify_fpir))
        for outside in (bounds["Ge"] / 2, 0.6):
            with pytest.raises(ValidationError, match="identify_fpir"):
                Settings(identify_fpir=outside)


class TestDecide:
    def test_accepted(self) -> None:
        d = decide([0.6, 0.05, 0.7], ["bob", "ann", "cy"], model=HAND)
        assert d.reason is Reason.ACCEPTED
        assert d.match_identity == "ann"
        assert d.features["distance"] == pytest.approx(0.05)
        assert d.features["second_distance"] == pytest.approx(0.6)
        assert d.features["margin"] == pytest.approx(0.55)
        assert d.features["gallery_size"] == 3
        assert d.thresholds["score"] == pytest.approx(HAND.threshold(3, 0.01))
        assert json.loads(json.dumps(d.to_dict()))["reason"] == "accepted"

    def test_unknown_when_nobody_is_close(self) -> None:
        d = decide([0.5, 0.7], ["a", "b"], model=HAND)
        assert d.reason is Reason.UNKNOWN
        assert d.match_identity is None
        assert d.candidate == "a"

    def test_ambiguous_when_margin_is_small(self) -> None:
        # log 0.10 - 0.75 log 0.11 = -0.647 passes the score at N = 3 (-0.495): only the margin (0.01) stops it
        assert facegate_score(0.10, 0.11) <= HAND.threshold(3, 0.01)
        d = decide([0.10, 0.11, 0.8], ["a", "b", "c"], model=HAND, ambiguity_margin=0.02)
        assert d.reason is Reason.AMBIGUOUS
        assert d.ambiguous
        assert d.match_identity is None
        assert d.candidate == "a"
        assert decide([0.10, 0.11, 0.8], ["a", "b", "c"], model=HAND, ambiguity_margin=0.0).reason is Reason.ACCEPTED

    def test_a_tie_is_never_named_even_without_margin(self) -> None:
        # the README's rule: ambiguous when the runner-up is WITHIN the margin of the nearest, so also at a margin of
        # 0 when two identities are exactly as far; naming whichever came first would depend on input order
        for ids in (["b", "a", "c"], ["a", "b", "c"]):
            d = decide([0.10, 0.10, 0.8], ids, model=HAND, ambiguity_margin=0.0)
            assert d.reason is Reason.AMBIGUOUS and d.match_identity is None
            assert d.candidate == ids[0] and d.features["margin"] == 0.0
        # a margin of exactly the setting is within it (0.25 and 0.375: no rounding in d2 - d1)
        assert decide([0.25, 0.375], ["a", "b"], model=LOOSE, ambiguity_margin=0.125).reason is Reason.AMBIGUOUS
        assert decide([0.25, 0.375], ["a", "b"], model=LOOSE, ambiguity_margin=0.124).reason is Reason.ACCEPTED

    def test_accept_distance_of_an_unbounded_score_threshold_is_returned_not_stepped(self) -> None:
        # a model whose stranger scores reach +inf (a stranger with d2 = 0) gives t = inf: there is no boundary to
        # step onto, and stepping from inf would never end
        m = load_default_model()
        assert _accept_distance(m, math.inf, 0.5) == math.inf
        assert _accept_distance(m, -math.inf, 0.5) == 0.0

    def test_a_runner_up_at_distance_zero_is_decided_at_once(self) -> None:
        # The same photo enrolled as two people puts the runner-up at distance 0. accept_distance used to step up
        # from 0 one subnormal float at a time, for ever: /identify never answered and its thread spun. Run on a
        # daemon thread with a deadline, so that a regression fails instead of hanging the suite.
        m = load_default_model()
        results: list[tuple[float, float, float]] = []

        def run() -> None:
            for d2, t in itertools.product(
                (0.0, 5e-324, 1e-300, 1e-20, 1e-13, 1e-12, 2e-12, 1e-6), (-math.inf, -30.0, -7.0, -6.9, -3.0, 0.0, 3.0)
            ):
                results.append((d2, t, _accept_distance(m, t, d2)))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(10)
        assert len(results) == 56, "accept_distance did not return"
        for d2, t, a in results:
            above = float(m.score(math.nextafter(a, math.inf), d2))
            if a > 0.0:  # the edge: a passes the score test, the next float up fails it
                assert float(m.score(a, d2)) <= t < above, (d2, t, a)
            else:  # no distance passes
                assert above > t, (d2, t)
        decision = decide([0.0, 0.0, 0.5], ["a", "b", "c"], model=m)
        assert decision.reason is Reason.AMBIGUOUS and decision.thresholds["accept_distance"] > 0.0

    def test_reported_thresholds_agree_with_the_decision_to_the_last_bit(self) -> None:
        # accept_distance and fpir_estimate restate the score test: at its very boundary they must still say what
        # the decision did (distance <= accept_distance and fpir_estimate <= target exactly when accepted)
        m = load_default_model()
        rng = np.random.default_rng(3)
        for n, target in itertools.product((2, 27, 414, 5000), (0.001, 0.01, 0.05)):
            for d2 in rng.uniform(0.15, 0.6, 25).tolist():
                at = decide([0.1, d2], ["a", "b"], target_fpir=target, max_distance=4.0, ambiguity_margin=0.0,
                            gallery_size=n, model=m)  # fmt: skip
                boundary = at.thresholds["accept_distance"]
                if boundary >= d2:
                    continue  # d1 would become the runner-up
                for d1 in (boundary, math.nextafter(boundary, math.inf), math.nextafter(boundary, -math.inf)):
                    d = decide([d1, d2], ["a", "b"], target_fpir=target, max_distance=4.0, ambiguity_margin=0.0,
                               gallery_size=n, model=m)  # fmt: skip
                    accepted = d.reason is Reason.ACCEPTED
                    score, fpir = d.features["score"], d.features["fpir_estimate"]
                    assert isinstance(score, float) and isinstance(fpir, float)
                    assert d.thresholds["accept_distance"] == boundary
                    assert accepted == (d1 <= boundary) == (score <= d.thresholds["score"]) == (fpir <= target)

    def test_ambiguous_when_two_identities_match_and_none_stands_out(self) -> None:
        # N = 100: log 0.25 - 0.75 log 0.30 = -0.483 fails the score (-0.8); the runner-up 0.30 is itself a 1:1 match
        d = decide([0.25, 0.30], ["a", "b"], model=HAND, gallery_size=100)
        assert d.features["margin"] == pytest.approx(0.05)
        assert d.reason is Reason.AMBIGUOUS

    def test_runner_up_far_means_unknown_not_ambiguous(self) -> None:
        d = decide([0.33, 0.5], ["a", "b"], model=HAND, gallery_size=1000)
        assert d.reason is Reason.UNKNOWN

    def test_max_distance_caps_acceptance(self) -> None:
        loose = OpenSetModel(np.array([1.0, 2.0]), np.array([0.01, 0.1]), np.array([[0.5, 0.6], [0.5, 0.6]]))
        assert decide([0.4], ["a"], model=loose, max_distance=0.36).reason is Reason.UNKNOWN
        assert decide([0.4], ["a"], model=loose, max_distance=0.5).reason is Reason.ACCEPTED

    def test_single_identity_and_empty_gallery(self) -> None:
        one = decide([0.2], ["a"], model=HAND)
        assert one.reason is Reason.ACCEPTED  # log 0.2 - 0.75 log 0.45 = -1.01 <= -0.4
        assert one.features["second_distance"] is None
        # N = 1: accept distance exp(-0.4) * 0.45 ** 0.75 = 0.368, then the 1:1 cap 0.36
        assert decide([0.3], ["a"], model=HAND).reason is Reason.ACCEPTED
        assert decide([0.37], ["a"], model=HAND).reason is Reason.UNKNOWN
        empty = decide([], [], model=HAND)
        assert empty.reason is Reason.UNKNOWN
        assert empty.features == {"gallery_size": 0}

    def test_gallery_size_recalibration(self) -> None:
        # the same distances: accepted against a small gallery, refused once the gallery is large
        d1, d2 = 0.30, 0.45  # score -0.605: within t(2) = -0.460, beyond t(100) = -0.8
        s = facegate_score(d1, d2)
        assert HAND.threshold(2, 0.01) >= s > HAND.threshold(100, 0.01)
        assert decide([d1, d2], ["a", "b"], model=HAND).reason is Reason.ACCEPTED
        assert decide([d1, d2], ["a", "b"], model=HAND, gallery_size=100).reason is Reason.UNKNOWN

    def test_bad_inputs(self) -> None:
        with pytest.raises(ValueError):
            decide([0.1, 0.2], ["a"], model=HAND)
        with pytest.raises(ValueError):
            decide([0.1, np.nan], ["a", "b"], model=HAND)
        with pytest.raises(ValueError):
            decide([0.1, 0.2], ["a", "b"], model=HAND, gallery_size=1)
        with pytest.raises(ValueError):
            decide([0.1], ["a"], model=HAND, target_fpir=0.5)


class TestNearestIdentities:
    def test_nearest_face_per_identity_sorted(self) -> None:
        ids, d = nearest_identities([0.5, 0.2, 0.3, np.nan, 0.1], ["a", "b", "a", "c", "c"])
        assert ids == ["c", "b", "a"]
        np.testing.assert_allclose(d, [0.1, 0.2, 0.3])


def _synthetic_reference(n_probes: int, n_ids: int, rng: np.random.Generator) -> np.ndarray:
    """Per-probe impostor distances: log-normal with a probe-specific centre (some faces look like many people)."""
    centre = rng.normal(-0.45, 0.12, size=(n_probes, 1))
    return np.exp(centre + 0.22 * rng.normal(size=(n_probes, n_ids)))


class TestGallerySizeCalibration:
    def test_recalibrated_rule_keeps_fpir_while_a_fixed_one_grows(self) -> None:
        rng = np.random.default_rng(0)
        ref = _synthetic_reference(400, 400, rng)
        sizes = (1, 5, 50, 300)
        model = build_model(ref, gallery_sizes=sizes, levels=(0.01, 0.05, 0.2), draws=32, tail=(9.0, 1.1))
        fixed = model.threshold(1, 0.05)
        measured, measured_fixed = [], []
        for n in sizes:
            fresh = _synthetic_reference(3000, n, rng)  # new strangers against new galleries
            s = np.sort(fresh, axis=1)
            d2 = s[:, 1] if n > 1 else np.full(s.shape[0], np.inf)
            score = facegate_score(s[:, 0], d2)
            measured.append(float(np.mean(score <= model.threshold(n, 0.05))))
            measured_fixed.append(float(np.mean(score <= fixed)))
        assert all(0.03 <= f <= 0.07 for f in measured), measured  # target 0.05
        assert measured_fixed[-1] > 3 * measured_fixed[0]  # a fixed threshold lets more strangers in as N grows
        assert all(a <= b for a, b in itertools.pairwise(measured_fixed))

    def test_no_loosening_beyond_the_validated_range(self) -> None:
        rng = np.random.default_rng(1)
        ref = _synthetic_reference(200, 50, rng)
        model = build_model(ref, gallery_sizes=(1, 10, 100, 1000, 10_000), levels=(0.01, 0.1), draws=16)
        assert model.meta["validated_up_to"] == 3 * 50
        q = model.quantiles[:, 0]
        assert q[3] <= q[2] and q[4] <= q[3]  # 1000 and 10 000 are beyond 150

    def test_simulation_shapes_and_seed(self) -> None:
        ref = _synthetic_reference(20, 30, np.random.default_rng(2))
        ref[0, 0] = np.nan  # a probe's own identity
        a = simulate_stranger_scores(ref, 7, draws=5, seed=3)
        b = simulate_stranger_scores(ref, 7, draws=5, seed=3)
        assert a.shape == (100,)
        np.testing.assert_array_equal(a, b)
        with pytest.raises(ValueError):
            simulate_stranger_scores(ref[:, :1], 7)


class TestLeaveOneIdentityOut:
    def test_rows_columns_and_own_identity(self) -> None:
        e = np.zeros((6, 4), np.float32)
        e[:, 0] = [0.0, 1.0, 2.0, 3.0, 5.0, 9.0]
        e[5] = np.nan  # a photo without a face: no row
        ids = ["bob", "ann", "bob", "cy", "ann", "cy"]
        keys = ["b2", "a2", "b1", "c1", "a1", "c0"]  # c0 has no face: cy's first photo is c1
        r = leave_one_identity_out(e, ids, keys)
        # rows: photos 0..4 in input order; columns: ann (a1 = 5.0), bob (b1 = 2.0), cy (c1 = 3.0)
        expected = np.array(
            [[25.0, np.nan, 9.0], [np.nan, 1.0, 4.0], [9.0, np.nan, 1.0], [4.0, 1.0, np.nan], [np.nan, 9.0, 4.0]]
        )
        np.testing.assert_allclose(r, expected)

    def test_needs_three_identities(self) -> None:
        with pytest.raises(ValueError):
            leave_one_identity_out(np.eye(3, dtype=np.float32), ["a", "b", "a"], ["1", "2", "3"])


# Thresholds fall from N = 1 to 10, then rise again (the shipped model's shape: the runner-up loosens large galleries).
DIP = OpenSetModel(
    gallery_sizes=np.array([1.0, 10.0, 100.0]),
    levels=np.array([0.01, 0.1]),
    quantiles=np.array([[-0.4, -0.2], [-0.8, -0.6], [-0.5, -0.3]]),
)


class TestSeveralFacesPerIdentity:
    def test_strictest_size_over_identities_to_faces(self) -> None:
        assert DIP.strictest_size(2, 2) == 2  # one face each: the identities, exactly
        assert DIP.strictest_size(2, 6) == 6  # thresholds still falling at 6 faces
        assert DIP.strictest_size(3, 50) == 10  # the lowest threshold is at a grid size inside the range
        assert DIP.strictest_size(20, 80) == 20  # rising from 20 on: extra faces never loosen the rule
        with pytest.raises(ValueError):
            DIP.strictest_size(5, 4)

    def test_more_faces_tighten_a_small_gallery_and_one_each_changes_nothing(self) -> None:
        d1, d2 = 0.25, 0.45  # score -0.788: within t(2) = -0.520, beyond t(6) = -0.712 ... -0.8 at N = 10
        one = decide([d1, d2], ["a", "b"], model=DIP)
        same = decide([d1, d2], ["a", "b"], model=DIP, gallery_faces=2)
        assert one.reason is Reason.ACCEPTED and same.to_dict() == one.to_dict()
        assert one.features["gallery_faces"] == 2 and one.features["rule_gallery_size"] == 2
        many = decide([d1, d2], ["a", "b"], model=DIP, gallery_faces=10)
        assert many.reason is Reason.UNKNOWN  # the runner-up is beyond 0.36: nobody else looks like this face
        assert many.thresholds["score"] == DIP.threshold(10, 0.01)
        assert many.features["gallery_size"] == 2 and many.features["rule_gallery_size"] == 10
        assert float(many.features["fpir_estimate"] or 0) > 0.01  # the estimate agrees with the refusal
        with pytest.raises(ValueError):
            decide([d1, d2], ["a", "b"], model=DIP, gallery_faces=1)

    def test_reported_thresholds_agree_with_the_decision(self) -> None:
        rng = np.random.default_rng(5)
        for _ in range(300):
            d = rng.uniform(0.15, 0.45, size=2)
            faces = int(rng.integers(2, 60))
            r = decide(d, ["a", "b"], model=DIP, gallery_faces=faces, max_distance=1.0, ambiguity_margin=0.0)
            passed = float(r.features["score"] or 0) <= r.thresholds["score"]
            assert passed == (r.reason is Reason.ACCEPTED)
            assert passed == (min(d) <= r.thresholds["accept_distance"])
            assert passed == (float(r.features["fpir_estimate"] or 0) <= 0.01)

    def test_synthetic_galleries_of_several_faces_stay_near_the_target(self) -> None:
        # Strangers against galleries of N identities with k faces each, every face an independent draw from the
        # stranger's impostor distribution (the most chances k faces can give). Calibrated for N alone, the rule
        # lets far more strangers in than the target as k grows; calibrated for the faces too, it holds.
        rng = np.random.default_rng(3)
        ref = _synthetic_reference(400, 400, rng)
        model = build_model(ref, gallery_sizes=(1, 2, 5, 10, 20, 50), levels=(0.01, 0.05, 0.2), draws=32, tail=(9.0, 1.1))
        n, k, target = 2, 5, 0.05
        centre = rng.normal(-0.45, 0.12, size=(4000, 1, 1))
        per_face = np.exp(centre + 0.22 * rng.normal(size=(4000, n, k)))
        s = np.sort(per_face.min(axis=2), axis=1)  # each identity as near as its nearest face
        score = facegate_score(s[:, 0], s[:, 1])
        for_identities = float(np.mean(score <= model.threshold(n, target)))
        for_faces = float(np.mean(score <= model.threshold(model.strictest_size(n, n * k, target), target)))
        assert for_identities > 2 * target, for_identities
        assert 0.5 * target <= for_faces <= 1.5 * target, for_faces
        # faces all alike (k copies of one): the rule errs on the safe side, never above the target
        alike = np.sort(per_face[:, :, 0], axis=1)
        alike_score = facegate_score(alike[:, 0], alike[:, 1])
        assert float(np.mean(alike_score <= model.threshold(model.strictest_size(n, n * k, target), target))) <= target
