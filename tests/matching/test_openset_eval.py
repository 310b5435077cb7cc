"""eval-identify building blocks: the enrolment protocol, top-two identities, DIR at FPIR, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.matching.openset import load_default_model
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


class TestEvaluate:
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
