"""eval-identify building blocks: the enrolment protocol, top-two identities, DIR at FPIR, the report."""

from __future__ import annotations

import json
import tracemalloc
from collections import Counter

import numpy as np
import pytest

from app.gallery import synthetic as synthetic_faces
from app.gallery.index import GalleryIndex
from app.matching.distances import squared_l2
from app.matching.openset import OpenSetModel, decide, facegate_score, load_default_model
from app.matching.openset_eval import (
    dir_at_fpir,
    enrolment_split,
    evaluate_identification,
    top_two,
)


class TestProtocol:
    def test_even_identities_enrolled_with_their_first_photo(self) -> None:
        ids = ["bob", "ann", "ann", "cy", "bob", "dee", "ann"]
        keys = ["b2", "a3", "a1", "c1", "b1", "d1", "a2"]
        sp = enrolment_split(ids, keys)
        # sorted names: ann (0, enrolled), bob (1, stranger), cy (2, enrolled), dee (3, stranger)
        assert sp.gallery_ids == ["ann", "cy"]
        assert sp.gallery_rows.tolist() == [2, 3]  # a1, c1
        assert sp.probe_rows.tolist() == [6, 1]  # a2, a3
        assert sp.probe_ids == ["ann", "ann"]
        assert sorted(sp.stranger_rows.tolist()) == [0, 4, 5]


class TestTopTwo:
    def test_identity_level_with_several_faces(self) -> None:
        gallery = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
        ids = ["a", "b", "a"]
        t = top_two(np.array([[0.0, 1.9], [0.9, 0.0]]), gallery, ids)
        assert t.identities == ["a", "b"]
        assert t.top.tolist() == [0, 1]
        np.testing.assert_allclose(t.d1, [0.01, 0.01], atol=1e-6)
        np.testing.assert_allclose(t.d2, [1.0 + 1.9**2, 0.81], atol=1e-5)

    def test_single_identity(self) -> None:
        t = top_two(np.zeros((1, 2)), np.ones((2, 2)), ["a", "a"])
        assert np.isinf(t.d2[0])

    def test_exact_distances_as_identify_reports_them(self) -> None:
        # d1, d2 are the float32 distances the gallery index reports, not the expansion (which differs by ulps on
        # about half of the pairs), and the nearest face of an identity is chosen on them
        gallery, ids, probes = _faces(seed=1)
        t = top_two(probes, gallery, ids)
        index = _index(gallery, ids)
        for i, found in enumerate(index.search(probes, top_k=3)):
            assert found[0].identity_id == t.identities[t.top[i]]
            assert (t.d1[i], t.d2[i]) == (found[0].distance, found[1].distance)
        assert np.any(squared_l2(probes, gallery).min(axis=1) != t.d1)  # the case the test is about occurs

    def test_ties_go_to_the_identity_met_first(self) -> None:
        gallery = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
        t = top_two(np.zeros((1, 2)), gallery, ["b", "a", "c"])
        assert t.identities[t.top[0]] == "b" and t.d1[0] == t.d2[0] == 1.0
        t = top_two(np.zeros((1, 2)), gallery[::-1], ["c", "a", "b"])
        assert t.identities[t.top[0]] == "c"

    def test_memory_does_not_grow_with_probes_times_gallery(self) -> None:
        # 6,000 probes against 6,000 faces: the whole distance matrix is 144 MB (and was copied twice over); probes
        # go a block at a time, each probe answered exactly as alone.
        synthetic = synthetic_faces.gallery(12_000, seed=6)
        faces, probes = synthetic.embeddings[::2], synthetic.embeddings[1::2]
        ids = synthetic.owners[::2].tolist()
        tracemalloc.start()
        try:
            t = top_two(probes, faces, ids)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 80 * 2**20, f"peak {peak / 2**20:.0f} MiB"
        some = np.r_[0:3, 2_000:2_003, 5_997:6_000]
        alone = top_two(probes[some], faces, ids)
        np.testing.assert_array_equal(t.top[some], alone.top)
        np.testing.assert_array_equal(t.d1[some], alone.d1)
        np.testing.assert_array_equal(t.d2[some], alone.d2)


def _faces(seed: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A gallery of 12 identities (two faces for some) at dlib's scale and probes near them."""
    rng = np.random.default_rng(seed)
    centres = (rng.normal(size=(12, 128)) * 0.09).astype(np.float32)
    gallery = np.concatenate([centres, centres[:4] + (rng.normal(size=(4, 128)) * 0.02).astype(np.float32)])
    ids = [f"id{i:02d}" for i in range(12)] + [f"id{i:02d}" for i in range(4)]
    probes = np.repeat(centres, 8, axis=0) + (rng.normal(size=(96, 128)) * 0.03).astype(np.float32)
    return gallery, ids, probes


def _index(gallery: np.ndarray, ids: list[str]) -> GalleryIndex:
    index = GalleryIndex("test")
    index.replace_all([f"f{i}" for i in range(len(ids))], ids, gallery, last_change_id=0)
    return index


class TestDecidesAsIdentify:
    """The evaluation's default point decides every probe as live /identify does on the same embeddings, also when
    a threshold lies exactly on a probe's distance (or score) and the expansion puts it on the other side."""

    @staticmethod
    def _live(index: GalleryIndex, probes: np.ndarray, n: int, model: OpenSetModel, max_distance: float) -> Counter[str]:
        reasons = Counter[str]()
        for found in index.search(probes, top_k=5):
            decision = decide(
                [c.distance for c in found],
                [c.identity_id for c in found],
                max_distance=max_distance,
                ambiguity_margin=0.0,
                gallery_size=n,
                model=model,
            )
            reasons[str(decision.reason)] += 1
        return reasons

    def test_thresholds_on_a_probe_distance_or_score(self) -> None:
        gallery, ids, probes = _faces(seed=2)
        probe_ids = list(np.repeat([f"id{i:02d}" for i in range(12)], 8))
        index = _index(gallery, ids)
        found = index.search(probes, top_k=2)
        fast = np.sort(squared_l2(probes, gallery), axis=1)  # one face per identity among the nearest two here
        flips = [i for i in range(len(probes)) if fast[i, 0] != found[i][0].distance]
        assert len(flips) >= 10
        loose = OpenSetModel(np.array([1.0, 2.0]), np.array([0.01, 0.5]), np.array([[9.0, 9.5], [9.0, 9.5]]))
        for i in flips[:10]:
            d1, d2 = found[i][0].distance, found[i][1].distance
            # the 1:1 threshold exactly at the probe's distance (score test always passes)
            cases = [(loose, d1)]
            # the score threshold exactly at the probe's score (no distance limit)
            s = float(facegate_score(d1, d2))
            cases.append((OpenSetModel(np.array([1.0, 2.0]), np.array([0.01, 0.5]), np.array([[s, s + 1]] * 2)), 4.0))
            for model, max_distance in cases:
                report = evaluate_identification(
                    gallery, ids, probes, probe_ids, probes[:5], model=model, max_distance=max_distance, ambiguity_margin=0.0
                )
                assert report.default_point["probe_reasons"] == self._live(index, probes, 12, model, max_distance)


class TestDirAtFpir:
    def test_hand_example(self) -> None:
        strangers = np.arange(1, 101) / 100.0  # 0.01 .. 1.00
        genuine = np.array([0.005, 0.025, 0.5, 0.001])
        correct = np.array([True, True, True, False])
        dir1, t1 = dir_at_fpir(genuine, correct, strangers, 0.01)  # one stranger allowed: 0.01 in, 0.02 out
        assert 0.01 <= t1 < 0.02
        assert dir1 == pytest.approx(1 / 4)  # 0.005; 0.001 is the wrong identity
        dir5, _ = dir_at_fpir(genuine, correct, strangers, 0.05)
        assert dir5 == pytest.approx(2 / 4)  # five allowed: 0.025 in too


    def test_a_rate_just_under_k_over_n_lets_one_fewer_in(self) -> None:
        strangers = np.array([0.5, 0.6, 0.7])
        _, t = dir_at_fpir(np.array([0.1]), np.array([True]), strangers, 0.3333333333)
        assert t < 0.5  # 1 of 3 strangers would be an FPIR over the rate asked for
        _, t = dir_at_fpir(np.array([0.1]), np.array([True]), strangers, 1 / 3)
        assert 0.5 <= t < 0.6


class TestEvaluate:
    def test_a_stranger_at_distance_zero_from_two_identities_has_ratio_one(self) -> None:
        """The same photo enrolled under two names, and met again as a stranger: d1 = d2 = 0. Its ratio was 0 / 0 =
        NaN, so a threshold letting it in came out NaN and the ratio rule named no probe at all (DIR 0 %)."""
        twin = np.zeros(128, np.float32)
        twin[0] = 0.5
        other = np.zeros(128, np.float32)
        other[1] = 0.5
        gallery = np.stack([twin, twin, other])
        probe = other.copy()
        probe[2] = 0.05  # near `other`, far from the twins: a clear ratio
        stranger = np.zeros(128, np.float32)
        stranger[3] = 0.5
        with np.errstate(divide="raise", invalid="raise"):  # no 0 / 0 on the way
            rep = evaluate_identification(
                gallery, ["a", "b", "c"], probe[None, :], ["c"], np.stack([twin, stranger]), model=load_default_model()
            )
        ratio = rep.curves["ratio"]
        # letting one of the two strangers in (the far one; the twin's ratio 1 is the worst there is) names the probe
        half = next(i for i, f in enumerate(ratio["fpir"]) if 0.5 <= f < 1.0)
        assert ratio["dir"][half] == 1.0

    def test_separable_synthetic_gallery(self) -> None:
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(60, 128)).astype(np.float32) * 0.1
        noise = lambda n: rng.normal(size=(n, 128)).astype(np.float32) * 0.01
        gallery = centres[:30] + noise(30)
        probes = np.repeat(centres[:30], 2, axis=0) + noise(60)
        strangers = centres[30:] + noise(30)
        rep = evaluate_identification(gallery, list(range(30)), probes, list(np.repeat(np.arange(30), 2)), strangers, model=load_default_model())
        assert rep.rank1 == 1.0
        assert rep.dir_at_fpir["facegate"]["0.1"] == 1.0
        assert rep.default_point["fpir"] == 0.0
        assert rep.default_point["dir"] == 1.0
        assert rep.default_point["probe_reasons"] == {"accepted": 60}
        assert set(rep.curves) == {"raw", "ratio", "facegate"}
        payload = json.loads(json.dumps(rep.to_dict()))
        assert payload["n_enrolled"] == 30
        assert payload["n_strangers"] == 30

    def test_default_point_calibrates_for_every_face_as_identify_does(self) -> None:
        # 3 identities with 4 faces each: the default point's threshold is /identify's, the strictest from 3 to 12
        rng = np.random.default_rng(4)
        centres = rng.normal(size=(6, 128)).astype(np.float32) * 0.1
        gallery = np.repeat(centres[:3], 4, axis=0) + rng.normal(size=(12, 128)).astype(np.float32) * 0.01
        m = load_default_model()
        rep = evaluate_identification(gallery, list(np.repeat(["a", "b", "c"], 4)), centres[:3], ["a", "b", "c"], centres[3:], model=m)
        p = rep.default_point
        assert (p["gallery_size"], p["gallery_faces"]) == (3, 12)
        assert p["score_threshold"] == m.threshold(m.strictest_size(3, 12, 0.01), 0.01) < m.threshold(3, 0.01)
        one = evaluate_identification(gallery[::4], ["a", "b", "c"], centres[:3], ["a", "b", "c"], centres[3:], model=m)
        assert one.default_point["gallery_faces"] == 3 and one.default_point["score_threshold"] == m.threshold(3, 0.01)
