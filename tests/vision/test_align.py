"""vision.align: face chips bit-identical to dlib.get_face_chip(img, shape, size=150, padding=0.25).

dlib.get_face_chip needs no model file, so the unit tests compare with it directly on synthetic images and
landmarks (every similarity: small, large enough for 3 pyramid levels, rotated, cut by the border, wholly outside).
The `model` test does the same with dlib's own landmarks on dev photos at 1x, cut by the border, and upscaled
3x and 6x so that pyramid levels are used. Expected difference: 0 grey levels.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from app.vision.align import MEAN_FACE_5, _plan, chip_transform, face_chip, face_chips, pyramid_down
from tests.vision.dev_sample import dev_photos


def _dlib_chip(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    import dlib

    # the rectangle is not used by get_face_chip; only the parts are
    rect = dlib.rectangle(0, 0, 1, 1)
    shape = dlib.full_object_detection(rect, [dlib.point(int(x), int(y)) for x, y in landmarks])
    return np.asarray(dlib.get_face_chip(image, shape, size=150, padding=0.25))


def _landmarks(cx: float, cy: float, eye_distance: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """The mean face placed with a similarity (plus a little noise), rounded to integers as the predictor gives."""
    template = np.array(MEAN_FACE_5) - 0.5
    scale = eye_distance / (template[0, 0] - template[2, 0])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = template @ rot.T * scale + (cx, cy) + rng.normal(0, eye_distance * 0.03, (5, 2))
    return np.floor(pts + 0.5).astype(np.int64)


def _synthetic_image(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth gradients plus noise and flat patches: exercises interpolation and the truncation to uint8."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256], axis=2)
    img = (base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
    img[h // 3 : h // 2, w // 3 : w // 2] = (200, 100, 50)
    return np.ascontiguousarray(img)


class TestPyramidDown:
    @staticmethod
    def _reference(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        k = np.array([1, 4, 6, 4, 1])
        v = img.astype(np.int64)
        out = np.zeros(((h - 3) // 2, (w - 3) // 2, img.shape[2]), np.int64)
        for r in range(out.shape[0]):
            for c in range(out.shape[1]):
                block = v[2 * r : 2 * r + 5, 2 * c : 2 * c + 5]
                out[r, c] = np.einsum("i,j,ijk->k", k, k, block) // 256
        return out.astype(np.uint8)

    @pytest.mark.parametrize("shape", [(9, 9), (10, 13), (17, 12), (31, 30)])
    def test_matches_the_5x5_integer_filter(self, shape: tuple[int, int]) -> None:
        img = np.random.default_rng(sum(shape)).integers(0, 256, shape + (3,), dtype=np.uint8)
        assert np.array_equal(pyramid_down(img), self._reference(img))

    def test_saturated_input_does_not_overflow(self) -> None:
        img = np.full((20, 20, 3), 255, np.uint8)
        assert (pyramid_down(img) == 255).all()

    @pytest.mark.parametrize("shape", [(8, 20), (20, 8), (3, 3)])
    def test_small_images_give_empty(self, shape: tuple[int, int]) -> None:
        assert pyramid_down(np.zeros(shape + (3,), np.uint8)).size == 0


class TestChipTransform:
    def test_recovers_the_similarity(self) -> None:
        template = (np.array(MEAN_FACE_5) + 0.25) / 1.5 * 150  # the padded mean face in chip pixels
        angle, scale = 0.3, 2.0
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        pts = template @ rot.T * scale + (100.0, 50.0)
        t = chip_transform(pts)
        assert t.angle == pytest.approx(angle, abs=1e-12)
        assert t.scale == pytest.approx(scale, abs=1e-12)
        # the rectangle is 150 * scale - 1 wide between inclusive corners
        assert t.rect[2] - t.rect[0] == pytest.approx(150 * scale - 1)
        # chip pixels map back onto the landmarks (chip pixel i spans the rectangle in 149 steps, hence 149/150)
        assert np.allclose(t.to_image(template * (149 / 150)), pts, atol=2.5)

    def test_rejects_wrong_shapes(self) -> None:
        with pytest.raises(ValueError):
            chip_transform(np.zeros((68, 2)))


def test_chip_geometry_is_bit_identical_to_dlib() -> None:
    """Angle and rectangle equal dlib.get_face_chip_details to the last bit (dlib's SVD, dlib's operation order)."""
    import dlib

    rng = np.random.default_rng(7)
    for _ in range(300):
        centre = rng.uniform(-100, 1100, 2)
        lm = _landmarks(centre[0], centre[1], rng.uniform(5, 600), rng.uniform(-1.5, 1.5), rng)
        shape = dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1), [dlib.point(int(x), int(y)) for x, y in lm])
        expected = dlib.get_face_chip_details(shape, 150, 0.25)
        got = chip_transform(lm)
        r = expected.rect
        assert got.angle == expected.angle
        assert got.rect == (r.left(), r.top(), r.right(), r.bottom())


class TestAgainstDlib:
    """Synthetic images and landmarks; dlib.get_face_chip is the oracle (it needs no model file)."""

    def test_many_similarities(self) -> None:
        rng = np.random.default_rng(42)
        img = _synthetic_image(1000, 1200, rng)
        levels: Counter[int] = Counter()
        for _ in range(60):
            eye = float(rng.choice([20, 45, 70, 110, 180, 300, 450, 700]) * rng.uniform(0.8, 1.2))
            cx, cy = rng.uniform(-50, 1250), rng.uniform(-50, 1050)  # sometimes cut by the border
            lm = _landmarks(cx, cy, eye, rng.uniform(-0.7, 0.7), rng)
            ours = face_chip(img, lm)
            assert ours.shape == (150, 150, 3) and ours.dtype == np.uint8
            diff = np.abs(ours.astype(int) - _dlib_chip(img, lm).astype(int)).max()
            assert diff == 0, f"landmarks {lm.tolist()}: max difference {diff}"
            levels[_plan(img.shape[0], img.shape[1], chip_transform(lm)).level] += 1
        assert {-1, 0, 1, 2} <= set(levels), levels

    def test_face_outside_the_image_is_black(self) -> None:
        rng = np.random.default_rng(3)
        img = _synthetic_image(100, 100, rng)
        lm = _landmarks(600, 600, 40, 0.0, rng)
        ours = face_chip(img, lm)
        assert not ours.any()
        assert np.array_equal(ours, _dlib_chip(img, lm))

    def test_upright_axis_aligned_face(self) -> None:
        # landmarks exactly on the template at scale 1: angle 0, sampling on integer positions
        template = (np.array(MEAN_FACE_5) + 0.25) / 1.5 * 150
        img = _synthetic_image(300, 300, np.random.default_rng(9))
        lm = np.floor(template + 60 + 0.5).astype(np.int64)
        assert np.array_equal(face_chip(img, lm), _dlib_chip(img, lm))

    def test_face_chips_extracts_each_face_alone(self) -> None:
        rng = np.random.default_rng(11)
        img = _synthetic_image(600, 800, rng)
        faces = [_landmarks(200, 200, 60, 0.1, rng), _landmarks(550, 350, 250, -0.2, rng)]
        chips = face_chips(img, faces)
        assert chips.shape == (2, 150, 150, 3) and chips.dtype == np.uint8
        for chip, lm in zip(chips, faces, strict=True):
            assert np.array_equal(chip, face_chip(img, lm))
            assert np.array_equal(chip, _dlib_chip(img, lm))
        assert face_chips(img, []).shape == (0, 150, 150, 3)

    def test_rejects_non_rgb(self) -> None:
        lm = _landmarks(50, 50, 20, 0.0, np.random.default_rng(0))
        with pytest.raises(ValueError):
            face_chip(np.zeros((100, 100), np.uint8), lm)


def _upscaled(pixels: np.ndarray, box: tuple[int, int, int, int], factor: int) -> np.ndarray:
    """The neighbourhood of a face (one face width around it, clipped), upscaled by an integer factor."""
    from PIL import Image as PILImage

    left, top, right, bottom = box
    w = right - left + 1
    h, wi = pixels.shape[:2]
    x0, y0 = max(0, left - w), max(0, top - w)
    x1, y1 = min(wi, right + w + 1), min(h, bottom + w + 1)
    crop = PILImage.fromarray(pixels[y0:y1, x0:x1])
    big = crop.resize((crop.width * factor, crop.height * factor), PILImage.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(big))


@pytest.mark.model
def test_matches_dlib_on_dev_photos(dev_faces: Path) -> None:
    import dlib

    from models.build import source_dir

    predictor = dlib.shape_predictor(str(source_dir() / "shape_predictor_5_face_landmarks.dat"))

    def landmarks_of(pixels: np.ndarray, rect: dlib.rectangle) -> np.ndarray:
        shape = predictor(pixels, rect)
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.int64)

    compared: Counter[str] = Counter()
    levels: Counter[int] = Counter()
    for photo in dev_photos(dev_faces):
        cases: list[tuple[str, np.ndarray, np.ndarray]] = []
        for box in photo.boxes:
            rect = dlib.rectangle(box.left, box.top, box.right, box.bottom)
            cases.append(("1x", photo.pixels, landmarks_of(photo.pixels, rect)))
            cut_at = (box.left + box.right) // 2  # the photo cut through the middle of the face
            if cut_at > 0:
                cut = np.ascontiguousarray(photo.pixels[:, cut_at:])
                cut_rect = dlib.rectangle(box.left - cut_at, box.top, box.right - cut_at, box.bottom)
                cases.append(("cut", cut, landmarks_of(cut, cut_rect)))
        if photo.boxes and compared["6x"] < 25:
            box = photo.boxes[0]
            x0, y0 = max(0, box.left - box.width), max(0, box.top - box.width)  # where _upscaled crops
            for factor in (3, 6):
                big = _upscaled(photo.pixels, (box.left, box.top, box.right, box.bottom), factor)
                rect = dlib.rectangle(
                    (box.left - x0) * factor,
                    (box.top - y0) * factor,
                    (box.right - x0) * factor + factor - 1,
                    (box.bottom - y0) * factor + factor - 1,
                )
                cases.append((f"{factor}x", big, landmarks_of(big, rect)))
        for kind, pixels, lm in cases:
            ours = face_chip(pixels, lm)
            diff = int(np.abs(ours.astype(int) - _dlib_chip(pixels, lm).astype(int)).max())
            assert diff == 0, f"{photo.name} ({kind}): max difference {diff} grey levels"
            compared[kind] += 1
            levels[_plan(pixels.shape[0], pixels.shape[1], chip_transform(lm)).level] += 1
    assert compared["1x"] >= 40 and compared["cut"] >= 30 and compared["3x"] >= 20 and compared["6x"] >= 20, compared
    assert {-1, 0, 1} <= set(levels), levels
