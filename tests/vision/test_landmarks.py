"""vision.landmarks: dlib's 5-point shape predictor in numpy.

Unit tests use tiny cascades written in code; the `model` tests compare with dlib.shape_predictor (the oracle)
on rectangles from dev photos: dlib's detections, shifted and resized ones, and ones partly or wholly outside the
image. Expected difference: 0 px on every point (the arithmetic is dlib's, float32 included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.errors import ModelUnavailable
from app.vision.landmarks import LandmarkPredictor
from app.vision.types import Box
from tests.vision.dev_sample import dev_photos

NPZ = "shape_predictor_5.npz"
SQUARE = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.5]


def _write_model(
    path: Path,
    *,
    initial: list[float],
    cascades: int = 1,
    trees: int = 2,
    depth: int = 1,
    features: int = 4,
    leaves: np.ndarray | None = None,
    deltas: np.ndarray | None = None,
    thresh: float = 0.0,
) -> Path:
    splits = (1 << depth) - 1
    np.savez(
        path,
        initial_shape=np.array(initial, dtype=np.float32),
        split_idx1=np.zeros((cascades, trees, splits), dtype=np.uint16),
        split_idx2=np.ones((cascades, trees, splits), dtype=np.uint16),
        split_thresh=np.full((cascades, trees, splits), thresh, dtype=np.float32),
        leaves=np.zeros((cascades, trees, splits + 1, 10), dtype=np.float32) if leaves is None else leaves,
        anchor_idx=np.zeros((cascades, features), dtype=np.int32),
        deltas=np.zeros((cascades, features, 2), dtype=np.float32) if deltas is None else deltas,
    )
    return path


class TestUnit:
    def test_missing_file_is_model_unavailable(self, tmp_path: Path) -> None:
        predictor = LandmarkPredictor(tmp_path / NPZ)  # constructing does no I/O
        with pytest.raises(ModelUnavailable):
            predictor.load()

    def test_malformed_file_is_model_unavailable(self, tmp_path: Path) -> None:
        bad = tmp_path / NPZ
        bad.write_bytes(b"not an npz")
        with pytest.raises(ModelUnavailable):
            LandmarkPredictor(bad).load()
        np.savez(bad, initial_shape=np.zeros(10, np.float32))  # arrays missing
        with pytest.raises(ModelUnavailable):
            LandmarkPredictor(bad).load()
        _write_model(bad, initial=[0.5] * 10)  # degenerate initial shape: no similarity fit
        with pytest.raises(ModelUnavailable):
            LandmarkPredictor(bad).load()

    def test_shape_maps_to_box_with_round_half_up(self, tmp_path: Path) -> None:
        # No leaf moves the shape: the result is the initial shape mapped into the box, rounded half up.
        initial = [0.5, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25, 0.75, 0.125, 0.375]
        predictor = LandmarkPredictor(_write_model(tmp_path / NPZ, initial=initial))
        image = np.zeros((10, 10, 3), np.uint8)
        got = predictor.predict(image, Box(1, 2, 4, 6))  # width 3, height 4 between corners
        expected = [[3, 4], [1, 2], [4, 6], [2, 5], [1, 4]]  # x = 1 + 3u, y = 2 + 4v; 2.5 -> 3, 1.375 -> 1
        assert got.dtype == np.int64
        assert got.tolist() == expected

    def test_feature_pixels_and_tree_walk(self, tmp_path: Path) -> None:
        # One tree of depth 1 comparing feature 0 (half a box width right of point 0) with feature 1 (at point 0):
        # the left leaf moves every point right by half a box width, the right leaf moves them left.
        initial = SQUARE
        leaves = np.zeros((1, 1, 2, 10), np.float32)
        leaves[0, 0, 0, 0::2] = 0.5
        leaves[0, 0, 1, 0::2] = -0.5
        deltas = np.zeros((1, 2, 2), np.float32)
        deltas[0, 0] = (0.5, 0.0)
        path = _write_model(tmp_path / NPZ, initial=initial, trees=1, features=2, leaves=leaves, deltas=deltas)
        predictor = LandmarkPredictor(path)
        image = np.zeros((20, 20, 3), np.uint8)
        box = Box(4, 4, 12, 12)  # point 0 at (4, 4), feature 0 at (8, 4)
        image[4, 8] = (10, 10, 11)  # grey (10 + 10 + 11) // 3 = 10 > 0 at (4, 4): goes left
        assert predictor.predict(image, box)[0].tolist() == [8, 4]
        image[4, 4] = (30, 30, 30)  # now 10 - 30 <= 0: goes right
        assert predictor.predict(image, box)[0].tolist() == [0, 4]
        # Feature 0 outside the image reads 0 (not the nearest pixel, which is bright): 0 - 30 goes right.
        image[4, 16] = (30, 30, 30)
        image[4, 19] = (255, 255, 255)
        assert predictor.predict(image, Box(16, 4, 24, 12))[0].tolist() == [12, 4]
        image[4, 16] = (0, 0, 0)  # 0 - 0 is not > 0 either
        assert predictor.predict(image, Box(16, 4, 24, 12))[0].tolist() == [12, 4]

    def test_predict_many_and_empty(self, tmp_path: Path) -> None:
        predictor = LandmarkPredictor(_write_model(tmp_path / NPZ, initial=SQUARE))
        image = np.zeros((8, 8, 3), np.uint8)
        assert predictor.predict_many(image, []).shape == (0, 5, 2)
        boxes = [Box(0, 0, 4, 4), Box(2, 2, 6, 6)]
        many = predictor.predict_many(image, boxes)
        assert many.shape == (2, 5, 2)
        assert [m.tolist() for m in many] == [predictor.predict(image, b).tolist() for b in boxes]

    def test_rejects_non_rgb_uint8(self, tmp_path: Path) -> None:
        predictor = LandmarkPredictor(_write_model(tmp_path / NPZ, initial=SQUARE))
        with pytest.raises(ValueError):
            predictor.predict(np.zeros((8, 8, 3), np.float32), Box(0, 0, 4, 4))
        with pytest.raises(ValueError):
            predictor.predict(np.zeros((8, 8, 4), np.uint8), Box(0, 0, 4, 4))


def _rectangles(photo_shape: tuple[int, ...], box: Box, rng: np.random.Generator) -> list[Box]:
    """dlib's detection plus shifted/resized variants and ones partly or wholly outside the image."""
    h, w = photo_shape[:2]
    size = box.width
    out = [box]
    for _ in range(3):
        dx, dy = rng.integers(-size // 3, size // 3 + 1, 2)
        half = size * rng.uniform(0.6, 1.5) / 2
        cx, cy = (box.left + box.right) / 2 + dx, (box.top + box.bottom) / 2 + dy
        out.append(Box(int(cx - half), int(cy - half), int(cx + half), int(cy + half)))
    out.append(Box(-size // 2, box.top, size // 2, box.bottom))  # cut by the left border
    out.append(Box(box.left, h - size // 3, box.right, h - size // 3 + size))  # cut by the bottom border
    out.append(Box(w + 5, box.top, w + 5 + size, box.bottom))  # wholly outside: every feature reads 0
    return out


@pytest.mark.model
def test_matches_dlib_on_dev_photos(dev_faces: Path, models_dir: Path) -> None:
    import dlib

    from models.build import source_dir

    oracle = dlib.shape_predictor(str(source_dir() / "shape_predictor_5_face_landmarks.dat"))
    predictor = LandmarkPredictor(models_dir / NPZ)
    rng = np.random.default_rng(5)
    compared = 0
    worst = 0
    for photo in dev_photos(dev_faces):
        boxes = [r for box in photo.boxes for r in _rectangles(photo.pixels.shape, box, rng)]
        if not boxes:
            continue
        ours = predictor.predict_many(photo.pixels, boxes)
        for box, got in zip(boxes, ours, strict=True):
            shape = oracle(photo.pixels, dlib.rectangle(box.left, box.top, box.right, box.bottom))
            expected = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)])
            worst = max(worst, int(np.abs(got - expected).max()))
            compared += 1
        # one face alone gives the same as in a batch
        assert predictor.predict(photo.pixels, boxes[0]).tolist() == ours[0].tolist()
    assert compared >= 300
    assert worst == 0, f"max landmark difference {worst} px over {compared} rectangles"


@pytest.mark.model
def test_matches_dlib_on_grey_images(dev_faces: Path, models_dir: Path) -> None:
    import dlib

    from models.build import source_dir

    oracle = dlib.shape_predictor(str(source_dir() / "shape_predictor_5_face_landmarks.dat"))
    predictor = LandmarkPredictor(models_dir / NPZ)
    compared = 0
    for photo in dev_photos(dev_faces)[:20]:
        grey = np.ascontiguousarray(photo.pixels.mean(axis=2).astype(np.uint8))
        for box in photo.boxes:
            shape = oracle(grey, dlib.rectangle(box.left, box.top, box.right, box.bottom))
            expected = [[shape.part(i).x, shape.part(i).y] for i in range(5)]
            assert predictor.predict(grey, box).tolist() == expected
            compared += 1
    assert compared >= 10
