"""End-to-end parity with dlib on every photo of the dev set, and identical verification decisions on its pairs.

Both sides get the same working image (decoded, EXIF-applied, shrunk to detector.max_side) and the same
upsample count, so the comparison is of the models and maths, not of resize policy (tests/dev_embeddings.py).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from tests.dev_embeddings import DevResults, PhotoResult
from tests.oracle import iou

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def parity(dev_results: DevResults) -> dict[str, PhotoResult]:
    """Shared with the issue-5 figure tests (tests/conftest.py `dev_results`, computed once per session)."""
    return dev_results.photos


def test_every_dev_photo_matches_dlib(parity: dict[str, PhotoResult]) -> None:
    assert len(parity) >= 470  # the whole set, not a sample
    faces = 0
    worst = {"iou": 1.0, "points": 0.0, "embedding": 0.0, "score": 0.0}
    for name, r in parity.items():
        assert len(r.ours_boxes) == len(r.dlib), f"{name}: {len(r.ours_boxes)} faces vs dlib's {len(r.dlib)}"
        for box, score, points, embedding in zip(r.ours_boxes, r.ours_scores, r.ours_points, r.ours_embeddings, strict=True):
            ref = max(r.dlib, key=lambda f: iou(box, f.box))
            worst["iou"] = min(worst["iou"], iou(box, ref.box))
            worst["score"] = max(worst["score"], abs(score - ref.score))
            worst["points"] = max(worst["points"], float(np.abs(points - ref.landmarks).max()))
            worst["embedding"] = max(worst["embedding"], float(np.abs(embedding - ref.embedding).max()))
            faces += 1
    print(f"\nparity over {len(parity)} photos, {faces} faces: {worst}")
    assert faces >= 300
    assert worst["iou"] >= 0.99
    assert worst["points"] <= 0.5
    assert worst["embedding"] <= 1e-4


def _largest(boxes: list[tuple[int, int, int, int]]) -> int:
    return max(range(len(boxes)), key=lambda i: (boxes[i][2] - boxes[i][0] + 1) * (boxes[i][3] - boxes[i][1] + 1))


def test_pair_decisions_match_dlib(parity: dict[str, PhotoResult], dev_faces: Path) -> None:
    """At the 0.36 squared-L2 threshold, our same/different decisions equal dlib's on >= 99.9 % of pairs."""
    ours: dict[str, np.ndarray] = {}
    theirs: dict[str, np.ndarray] = {}
    for name, r in parity.items():
        if r.ours_boxes:
            ours[name] = r.ours_embeddings[_largest(r.ours_boxes)].astype(np.float64)
        if r.dlib:
            theirs[name] = r.dlib[_largest([f.box for f in r.dlib])].embedding
    with (dev_faces / "pairs.csv").open() as f:
        pairs = [(row["img_a"], row["img_b"]) for row in csv.DictReader(f)]
    same = compared = missing = 0
    for a, b in pairs:
        if a not in theirs or b not in theirs:
            missing += 1
            assert a not in ours or b not in ours  # a face dlib misses is missed by us too
            continue
        d_ours = float(np.sum((ours[a] - ours[b]) ** 2))
        d_dlib = float(np.sum((theirs[a] - theirs[b]) ** 2))
        same += (d_ours <= 0.36) == (d_dlib <= 0.36)
        compared += 1
    print(f"\n{compared} pairs compared, {missing} with a photo where no face was found, agreement {same / compared:.5f}")
    assert compared >= 0.9 * len(pairs)
    assert same / compared >= 0.999
