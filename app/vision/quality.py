"""Face quality measurements and the gate over them: pure functions, no model.

`measure` takes what the pipeline already has for one face (the photo's size, the detection box and score, the 5
landmarks and the 150x150 chip) and returns a `FaceQuality` of plain numbers; `assess` compares them with
`QualityThresholds` and lists every failing measurement with its value and limit. The measurement is kept apart
from the decision (like `face_distance` and `compare_faces`), so callers can log or report the numbers and choose
their own limits.

Measurements (units):

* inter_ocular_px: distance between the eye centres (means of landmarks 0,1 and 2,3), in the pixels of the
  landmarks given (the pipeline passes the working copy's: the photo shrunk to detector.max_side). Small faces
  carry little identity detail.
* sharpness: variance of the 4-neighbour Laplacian of the chip's grey levels (ITU-R 601 luma, 0..255), over the
  chip's central region (the face, without the padding's background and the black fill of faces cut by the
  border). Low for blurred or upscaled faces.
* brightness: mean grey level (0..255) of the same central region.
* outside_fraction: share of the detection box's area that lies outside the photo (0 = whole box inside).
* roll_deg: angle of the eye line from horizontal, degrees (positive when the eye on the image's right is lower).
* yaw: horizontal offset of the nose point from the eyes' midpoint, measured along the eye line and divided by the
  inter-ocular distance (0 = frontal; about +-0.3 or beyond for strongly turned heads). Signed: positive when the
  nose is towards the image's right.
* score: the detector's score (MMOD; dlib keeps > 0).
* distinctiveness: squared L2 distance of the face's embedding (the embedder's own output) from the mean embedding
  of faces that carry no identity: photos turned sideways with no EXIF orientation, which the detector still finds
  and the shape predictor fits with upright-looking landmarks (models/indistinct.py, app/vision/data/). Those
  embeddings gather there (median 0.15 from it), upright faces lie far off (1st percentile 0.27-0.28 on lfw-dev
  and dev), and two of them match each other whoever they show. Measured after embedding (`with_distinctiveness`);
  None when no mean is shipped for the embeddings served.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt

from app.vision.types import Box

# The chip's central region used for sharpness and brightness: with padding 0.25, the mean face spans
# 150 * (0.25 + [0.12, 0.86]) / 1.5 = about [30, 118] horizontally; this square keeps the face.
CENTRE = slice(30, 120)
DATA_DIR = Path(__file__).resolve().parent / "data"
INDISTINCT_FILE = "indistinct.json"  # models/indistinct.py


class QualityIssue(StrEnum):
    SMALL_FACE = "small_face"
    BLURRY = "blurry"
    TOO_DARK = "too_dark"
    TOO_BRIGHT = "too_bright"
    CUT_OFF = "cut_off"
    TURNED = "turned"
    TILTED = "tilted"
    LOW_SCORE = "low_score"
    INDISTINCT = "indistinct"


@dataclass(frozen=True, slots=True)
class FaceQuality:
    inter_ocular_px: float
    sharpness: float
    brightness: float
    outside_fraction: float
    yaw: float
    roll_deg: float
    score: float
    distinctiveness: float | None = None  # set once the face is embedded (`with_distinctiveness`)

    def as_dict(self) -> dict[str, float | None]:
        return {
            name: None if getattr(self, name) is None else float(getattr(self, name)) for name in self.__slots__
        }


@dataclass(frozen=True, slots=True)
class QualityThresholds:
    """Limits for `assess`; None disables a check.

    Defaults measured on the dev set (476 photos shrunk to 1024 px, 484 faces found by the MMOD detector): they
    reject 10 faces (2.1 %: 6 blurry, 3 small, 2 cut off) and catch, among the degraded copies the detector still
    finds, 33/35 shrunk 4x, 152/155 blurred (Gaussian radius 3), 129/129 darkened to 15 % and 78/79 cut in half
    by the border. Dev percentiles (1 % / 5 % / 50 %): inter-ocular 23 / 29 / 37 px, sharpness 8.3 / 17 / 83,
    brightness 71 / 87 / 134 (max 199), outside fraction 99th percentile 0.15; degraded: shrunk inter-ocular
    median 14 px, blurred sharpness max 12.8 (median 1.6), darkened brightness max 30.5, cut outside fraction
    min 0.24. Pose and score are not gated by default (dev 99th percentiles: |yaw| 0.42, |roll| 16.5 deg; score
    1st percentile 0.60): set max_abs_yaw / max_abs_roll_deg / min_score to gate them.
    """

    min_inter_ocular_px: float | None = 20.0
    min_sharpness: float | None = 10.0
    min_brightness: float | None = 40.0
    max_brightness: float | None = 235.0
    max_outside_fraction: float | None = 0.25
    max_abs_yaw: float | None = None
    max_abs_roll_deg: float | None = None
    min_score: float | None = None
    min_distinctiveness: float | None = 0.22


@dataclass(frozen=True, slots=True)
class QualityFailure:
    issue: QualityIssue
    measured: float
    limit: float

    def as_dict(self) -> dict[str, str | float]:
        return {"issue": self.issue.value, "measured": self.measured, "limit": self.limit}


def eye_centres(landmarks: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(eye on the image's left, eye on the image's right) centres from the 5 landmarks, as float (x, y)."""
    pts = _points(landmarks)
    return (pts[2] + pts[3]) / 2.0, (pts[0] + pts[1]) / 2.0


def inter_ocular_distance(landmarks: npt.ArrayLike) -> float:
    left, right = eye_centres(landmarks)
    return float(np.hypot(*(right - left)))


def pose(landmarks: npt.ArrayLike) -> tuple[float, float]:
    """(yaw, roll_deg) estimated from the 5 landmarks; see the module docstring for their definitions."""
    pts = _points(landmarks)
    left, right = eye_centres(pts)
    axis = right - left
    distance = float(np.hypot(*axis))
    if distance == 0:
        return 0.0, 0.0
    roll = math.degrees(math.atan2(axis[1], axis[0]))
    offset = pts[4] - (left + right) / 2.0
    yaw = float(offset @ axis) / (distance * distance)
    return yaw, roll


def grey(chip: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """ITU-R 601 luma of an RGB image, 0..255 float."""
    rgb = chip.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def sharpness(chip: npt.NDArray[np.uint8]) -> float:
    """Variance of the 4-neighbour Laplacian over the chip's central region (grey levels^2)."""
    g = grey(chip)[CENTRE, CENTRE]
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def brightness(chip: npt.NDArray[np.uint8]) -> float:
    """Mean grey level (0..255) over the chip's central region."""
    return float(grey(chip)[CENTRE, CENTRE].mean())


def outside_fraction(box: Box, height: int, width: int) -> float:
    """Share of the box's area outside a height x width photo (0..1)."""
    if box.area == 0:
        return 1.0
    inside_w = max(0, min(box.right, width - 1) - max(box.left, 0) + 1)
    inside_h = max(0, min(box.bottom, height - 1) - max(box.top, 0) + 1)
    return 1.0 - inside_w * inside_h / box.area


def measure(
    *, image_shape: tuple[int, ...], box: Box, landmarks: npt.ArrayLike, chip: npt.NDArray[np.uint8], score: float
) -> FaceQuality:
    """Every measurement for one face. box and landmarks in the same photo's pixels; chip = its 150x150 chip."""
    if chip.ndim != 3 or chip.shape[2] != 3 or min(chip.shape[:2]) < CENTRE.stop:
        raise ValueError(f"expected a 150 x 150 x 3 chip, got shape {chip.shape}")
    yaw, roll = pose(landmarks)
    return FaceQuality(
        inter_ocular_px=inter_ocular_distance(landmarks),
        sharpness=sharpness(chip),
        brightness=brightness(chip),
        outside_fraction=outside_fraction(box, image_shape[0], image_shape[1]),
        yaw=yaw,
        roll_deg=roll,
        score=float(score),
    )


def assess(quality: FaceQuality, thresholds: QualityThresholds) -> list[QualityFailure]:
    """Every measurement outside its limit (an empty list means the face passes)."""
    checks: list[tuple[QualityIssue, float, float | None, bool]] = [
        # (issue, measured, limit, fails when measured is below the limit)
        (QualityIssue.SMALL_FACE, quality.inter_ocular_px, thresholds.min_inter_ocular_px, True),
        (QualityIssue.BLURRY, quality.sharpness, thresholds.min_sharpness, True),
        (QualityIssue.TOO_DARK, quality.brightness, thresholds.min_brightness, True),
        (QualityIssue.TOO_BRIGHT, quality.brightness, thresholds.max_brightness, False),
        (QualityIssue.CUT_OFF, quality.outside_fraction, thresholds.max_outside_fraction, False),
        (QualityIssue.TURNED, abs(quality.yaw), thresholds.max_abs_yaw, False),
        (QualityIssue.TILTED, abs(quality.roll_deg), thresholds.max_abs_roll_deg, False),
        (QualityIssue.LOW_SCORE, quality.score, thresholds.min_score, True),
    ]
    if quality.distinctiveness is not None:
        checks.append(
            (QualityIssue.INDISTINCT, quality.distinctiveness, thresholds.min_distinctiveness, True)
        )
    failures = []
    for issue, measured, limit, is_minimum in checks:
        if limit is None:
            continue
        if (measured < limit) if is_minimum else (measured > limit):
            failures.append(QualityFailure(issue, float(measured), float(limit)))
    return failures


def _points(landmarks: npt.ArrayLike) -> npt.NDArray[np.float64]:
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2):
        raise ValueError(f"expected 5 landmarks as a (5, 2) array, got shape {pts.shape}")
    return pts


def load_indistinct_mean(model_name: str, path: Path | None = None) -> npt.NDArray[np.float32] | None:
    """The shipped mean of identity-less embeddings (`INDISTINCT_FILE`) if it was made for `model_name` (the
    embedder's output, applied as the service applies it), else None: distinctiveness is then not measured."""
    file = path if path is not None else DATA_DIR / INDISTINCT_FILE
    try:
        document = json.loads(file.read_text())
    except FileNotFoundError:
        return None
    if document.get("model_name") != model_name:
        return None
    return np.asarray(document["centroid"], dtype=np.float32)


def with_distinctiveness(
    quality: FaceQuality, embedding: npt.NDArray[np.float32], mean: npt.NDArray[np.float32]
) -> FaceQuality:
    """`quality` with the embedding's squared L2 distance from the identity-less mean."""
    difference = embedding.astype(np.float64) - mean
    return replace(quality, distinctiveness=float(difference @ difference))
