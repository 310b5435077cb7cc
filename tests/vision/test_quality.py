"""vision.quality: measurements on synthetic faces, and the default gate on dev faces and degraded copies of them.

The defaults were chosen from the distribution over the dev set (every photo shrunk to 1024 px, faces from the
MMOD detector): see QualityThresholds. The `model` test checks, on the dev sample with dlib's HOG boxes, that the
defaults keep almost every face and reject the degraded copies (shrunk 4x, Gaussian blur radius 3, darkened to
15 %, cut in half by the border).
"""

from __future__ import annotations

import json
import math
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageFilter

from app.vision.align import MEAN_FACE_5, face_chip
from app.vision.landmarks import LandmarkPredictor
from app.vision.quality import (
    DATA_DIR,
    INDISTINCT_FILE,
    FaceQuality,
    QualityIssue,
    QualityThresholds,
    assess,
    brightness,
    inter_ocular_distance,
    load_indistinct_mean,
    measure,
    outside_fraction,
    pose,
    sharpness,
    with_distinctiveness,
)
from app.vision.types import Box
from tests.vision.dev_sample import dev_photos


def _face(eye_distance: float = 100.0, angle_deg: float = 0.0, nose_shift: float = 0.0) -> np.ndarray:
    template = np.array(MEAN_FACE_5, dtype=np.float64) - 0.5
    template[4, 0] += nose_shift
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    scale = eye_distance / (((template[0] + template[1]) / 2 - (template[2] + template[3]) / 2)[0])
    return template @ rot.T * scale + (500.0, 400.0)


class TestMeasurements:
    def test_inter_ocular_distance(self) -> None:
        assert inter_ocular_distance(_face(100.0)) == pytest.approx(100.0)
        assert inter_ocular_distance(_face(40.0, angle_deg=30)) == pytest.approx(40.0)

    def test_pose_of_a_frontal_face(self) -> None:
        yaw, roll = pose(_face())
        assert abs(yaw) < 0.02 and roll == pytest.approx(0.0, abs=0.05)  # the mean face is level to 0.02 deg

    @pytest.mark.parametrize("angle", [-25.0, 10.0, 40.0])
    def test_roll_follows_the_eye_line(self, angle: float) -> None:
        yaw, roll = pose(_face(angle_deg=angle))
        assert roll == pytest.approx(angle, abs=0.05)
        assert abs(yaw) < 0.02  # rotation alone is no yaw

    def test_yaw_sign_and_size(self) -> None:
        yaw_right, _ = pose(_face(nose_shift=0.1))
        yaw_left, _ = pose(_face(nose_shift=-0.1, angle_deg=20))
        assert yaw_right > 0.1 and yaw_left < -0.1

    def test_sharpness_and_brightness(self) -> None:
        rng = np.random.default_rng(0)
        flat = np.full((150, 150, 3), 100, np.uint8)
        noisy = rng.integers(0, 256, (150, 150, 3), dtype=np.uint8)
        blurred = np.asarray(PILImage.fromarray(noisy).filter(ImageFilter.GaussianBlur(3)))
        assert sharpness(flat) == 0.0
        assert sharpness(noisy) > 100 * sharpness(blurred) > 0
        assert brightness(flat) == pytest.approx(100.0)
        assert brightness(np.zeros((150, 150, 3), np.uint8)) == 0.0

    def test_outside_fraction(self) -> None:
        assert outside_fraction(Box(10, 10, 19, 19), 100, 100) == 0.0
        assert outside_fraction(Box(-5, 10, 4, 19), 100, 100) == pytest.approx(0.5)
        assert outside_fraction(Box(95, 95, 104, 104), 100, 100) == pytest.approx(0.75)
        assert outside_fraction(Box(200, 200, 209, 209), 100, 100) == 1.0

    def test_measure_collects_everything(self) -> None:
        chip = np.full((150, 150, 3), 80, np.uint8)
        q = measure(image_shape=(800, 1000, 3), box=Box(400, 300, 600, 500), landmarks=_face(), chip=chip, score=1.25)
        assert q.inter_ocular_px == pytest.approx(100.0)
        assert q.brightness == pytest.approx(80.0) and q.sharpness == 0.0
        assert q.outside_fraction == 0.0 and q.score == 1.25
        with pytest.raises(ValueError):
            measure(image_shape=(8, 8, 3), box=Box(0, 0, 4, 4), landmarks=_face(), chip=chip[:50], score=1.0)


class TestAssess:
    GOOD = FaceQuality(
        inter_ocular_px=60, sharpness=200, brightness=120, outside_fraction=0, yaw=0.05, roll_deg=3, score=1.0
    )

    def test_a_good_face_passes(self) -> None:
        assert assess(self.GOOD, QualityThresholds()) == []

    def test_every_failure_is_reported_with_value_and_limit(self) -> None:
        bad = FaceQuality(
            inter_ocular_px=5, sharpness=1, brightness=10, outside_fraction=0.6, yaw=-0.5, roll_deg=50, score=0.1
        )
        limits = QualityThresholds(max_abs_yaw=0.3, max_abs_roll_deg=30, min_score=0.5)
        failures = {f.issue: f for f in assess(bad, limits)}
        assert set(failures) == {
            QualityIssue.SMALL_FACE,
            QualityIssue.BLURRY,
            QualityIssue.TOO_DARK,
            QualityIssue.CUT_OFF,
            QualityIssue.TURNED,
            QualityIssue.TILTED,
            QualityIssue.LOW_SCORE,
        }
        assert failures[QualityIssue.TURNED].measured == 0.5 and failures[QualityIssue.TURNED].limit == 0.3
        assert failures[QualityIssue.SMALL_FACE].as_dict() == {"issue": "small_face", "measured": 5.0, "limit": 20.0}

    def test_an_indistinct_face_fails_once_its_distinctiveness_is_measured(self) -> None:
        assert self.GOOD.distinctiveness is None  # before embedding: not judged
        mean = np.zeros(128, np.float32)
        near = with_distinctiveness(self.GOOD, np.full(128, 0.03, np.float32), mean)  # 128 * 0.03^2 = 0.1152
        assert near.distinctiveness == pytest.approx(0.1152)
        failures = assess(near, QualityThresholds())
        assert [(f.issue, f.limit) for f in failures] == [(QualityIssue.INDISTINCT, 0.22)]
        far = with_distinctiveness(self.GOOD, np.full(128, 0.05, np.float32), mean)  # 0.32
        assert assess(far, QualityThresholds()) == []
        assert assess(near, QualityThresholds(min_distinctiveness=None)) == []
        assert far.as_dict()["distinctiveness"] == pytest.approx(0.32)
        assert self.GOOD.as_dict()["distinctiveness"] is None

    def test_the_shipped_mean_serves_only_the_embeddings_it_was_made_for(self, tmp_path: Path) -> None:
        shipped = json.loads((DATA_DIR / INDISTINCT_FILE).read_text())
        mean = load_indistinct_mean(shipped["model_name"])
        assert mean is not None and mean.shape == (128,) and shipped["faces"] > 500
        assert load_indistinct_mean(shipped["model_name"] + "+flip") is None  # mirror averaging: another scale
        assert load_indistinct_mean(shipped["model_name"], tmp_path / "missing.json") is None

    def test_too_bright_and_disabled_checks(self) -> None:
        glare = FaceQuality(
            inter_ocular_px=60, sharpness=200, brightness=250, outside_fraction=0, yaw=0, roll_deg=0, score=1
        )
        assert [f.issue for f in assess(glare, QualityThresholds())] == [QualityIssue.TOO_BRIGHT]
        assert assess(glare, QualityThresholds(max_brightness=None)) == []


def _quality(predictor: LandmarkPredictor, pixels: np.ndarray, box: Box) -> FaceQuality:
    landmarks = predictor.predict(pixels, box)
    return measure(image_shape=pixels.shape, box=box, landmarks=landmarks, chip=face_chip(pixels, landmarks), score=1.0)


@pytest.mark.model
def test_defaults_keep_dev_faces_and_reject_degraded_ones(dev_faces: Path, models_dir: Path) -> None:
    predictor = LandmarkPredictor(models_dir / "shape_predictor_5.npz")
    limits = QualityThresholds()
    kept = total = 0
    caught = {"shrunk": [0, 0], "blurred": [0, 0], "dark": [0, 0], "cut": [0, 0]}
    for photo in dev_photos(dev_faces):
        for box in photo.boxes:
            total += 1
            kept += not assess(_quality(predictor, photo.pixels, box), limits)
        if not photo.boxes:
            continue
        box = photo.boxes[0]
        image = PILImage.fromarray(photo.pixels)
        small = np.asarray(image.resize((round(image.width / 4), round(image.height / 4)), PILImage.Resampling.LANCZOS))
        variants = {
            "shrunk": (np.ascontiguousarray(small), Box(*(round(v / 4) for v in astuple(box)))),
            "blurred": (np.asarray(image.filter(ImageFilter.GaussianBlur(3))), box),
            "dark": ((photo.pixels * 0.15).round().astype(np.uint8), box),
        }
        cut_at = (box.left + box.right) // 2
        if cut_at > 0:
            variants["cut"] = (
                np.ascontiguousarray(photo.pixels[:, cut_at:]),
                Box(box.left - cut_at, box.top, box.right - cut_at, box.bottom),
            )
        for kind, (pixels, degraded_box) in variants.items():
            caught[kind][1] += 1
            caught[kind][0] += bool(assess(_quality(predictor, pixels, degraded_box), limits))
    assert total >= 50
    assert kept / total >= 0.95, f"the defaults reject {total - kept} of {total} dev faces"
    for kind, (hits, count) in caught.items():
        assert count >= 30 and hits / count >= 0.9, f"{kind}: caught {hits} of {count}"
