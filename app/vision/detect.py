"""Face detection: dlib's CNN face detector (`cnn_face_detection_model_v1`, MMOD) with the network in ONNX Runtime.

    photo --upsample (2x, 0..n times)--> tiled pyramid (pyramid.py) --ONNX--> score map
          --decode (cells > threshold)--> windows --NMS--> boxes --map back--> boxes in the photo's pixels

Every step reproduces dlib 20.0.1's arithmetic (docs/dlib-models.md, section 9), so the boxes are dlib's
and the scores agree with dlib's to ~1e-6. The steps are plain functions so that they can be tested and
timed one by one; `FaceDetector` strings them together around the lazily opened ONNX session.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from app.config import RuntimeSettings
from app.errors import ImageTooSmall
from app.vision.pyramid import PYRAMID_RATE, PyramidLayout, tiled_layout, tiled_pyramid, upsample, warm_up
from app.vision.runtime import LazySession
from app.vision.types import Box, Detection, Image

# Constants of mmod_human_face_detector.dat (input layer and loss_mmod_ options; checked against the file by tests).
MEANS = np.array([122.782, 117.001, 104.298], dtype=np.float32)  # R, G, B, stored as float
WINDOW = 80  # detector window, width = height, in pyramid pixels
NMS_IOU = 0.3382761351109955  # overlaps_nms: intersection / bounding box of the two boxes
NMS_COVERED = 1.0  # overlaps_nms percent-covered threshold: with 1.0 it never fires
# Smallest photo (after upsampling) the network can take: narrower breaks the pyramid layout, shorter
# leaves nothing after three 5x5 stride-2 convolutions (section 9.4). dlib throws for these.
MIN_COLS = 10
MIN_ROWS = 7


@dataclass(frozen=True, slots=True)
class Candidate:
    """A window above the threshold, before NMS: score and rectangle in the (upsampled) photo."""

    score: float
    box: Box


def upsampled_size(height: int, width: int, times: int) -> tuple[int, int]:
    """Size after `times` 2x steps: each maps H x W to (2H + 1) x (2W + 2)."""
    for _ in range(times):
        height, width = 2 * height + 1, 2 * width + 2
    return height, width


def check_size(height: int, width: int, times: int) -> None:
    """Raise ImageTooSmall for photos the detector cannot take after `times` doublings (dlib would throw)."""
    rows, cols = upsampled_size(height, width, times)
    if rows < MIN_ROWS or cols < MIN_COLS:
        doubled = f" (upsampled {times}x: {cols}x{rows} px)" if times else ""
        raise ImageTooSmall(
            f"image of {width}x{height} px is too small for the face detector{doubled}: "
            f"it needs at least {MIN_COLS}x{MIN_ROWS} px",
            width=width,
            height=height,
            upsample=times,
        )


def upsample_times(image: Image, times: int) -> Image:
    """dlib's pyramid_up(image, pyramid_down<2>) applied `times` times."""
    for _ in range(times):
        image = upsample(image)
    return image


def round_half_away(values: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """std::lround, exactly (no floor(v + 0.5) off-by-one near .5)."""
    whole = np.trunc(values)
    rounded: npt.NDArray[np.int64] = (whole + np.sign(values) * (np.abs(values - whole) >= 0.5)).astype(np.int64)
    return rounded


def assign_levels(x: npt.NDArray[np.int64], y: npt.NDArray[np.int64], layout: PyramidLayout) -> npt.NDArray[np.intp]:
    """dlib's nearest_rect: the first level containing each point, else the nearest level (first on ties)."""
    rects = np.array([(r.left, r.top, r.right, r.bottom) for r in layout.levels], dtype=np.int64)
    px, py = x[:, None], y[:, None]
    dx = np.clip(px, rects[:, 0], rects[:, 2]) - px
    dy = np.clip(py, rects[:, 1], rects[:, 3]) - py
    distance = dx * dx + dy * dy  # 0 inside; comparing squares keeps dlib's order
    nearest: npt.NDArray[np.intp] = np.argmin(distance, axis=1)
    return nearest


def decode(scores: npt.NDArray[np.float32], layout: PyramidLayout, threshold: float = 0.0) -> list[Candidate]:
    """Cells with score > threshold as windows in the photo, in descending score order (dlib's tensor_to_dets).

    Cell (r, c) is centred on tensor point (8c + 14, 8r + 14); the 80x80 window around it is mapped into the
    pyramid level holding its centre and up to the photo (p -> p * 6/5 + 0.3 per level), then rounded.
    """
    rows, cols = np.nonzero(scores > threshold)
    if rows.size == 0:
        return []
    values = scores[rows, cols]
    order = np.argsort(-values.astype(np.float64), kind="stable")  # descending, raster order on ties
    rows, cols, values = rows[order], cols[order], values[order]
    cx, cy = 8 * cols.astype(np.int64) + 14, 8 * rows.astype(np.int64) + 14
    level = assign_levels(cx, cy, layout)
    origin = np.array([(r.left, r.top) for r in layout.levels], dtype=np.float64)[level]
    half = (WINDOW - 1) / 2
    corners = np.stack([cx - half, cy - half, cx + half, cy + half], axis=1) - np.tile(origin, 2)
    ratio = PYRAMID_RATE / (PYRAMID_RATE - 1.0)
    for step in range(int(level.max())):
        up = (level > step)[:, None]
        corners = np.where(up, corners * ratio + 0.3, corners)
    boxes = round_half_away(corners)
    return [Candidate(float(s), Box(*map(int, b))) for s, b in zip(values, boxes, strict=True)]


def overlaps(a: Box, b: Box, iou: float = NMS_IOU, covered: float = NMS_COVERED) -> bool:
    """dlib's test_box_overlap: the 'IoU' divides by the area of the bounding box of both, not the union."""
    inner = Box(max(a.left, b.left), max(a.top, b.top), min(a.right, b.right), min(a.bottom, b.bottom)).area
    if inner == 0:
        return False
    outer = Box(min(a.left, b.left), min(a.top, b.top), max(a.right, b.right), max(a.bottom, b.bottom)).area
    return inner / outer > iou or inner / a.area > covered or inner / b.area > covered


def nms(candidates: list[Candidate]) -> list[Candidate]:
    """Greedy non-maximum suppression over candidates sorted by descending score."""
    kept: list[Candidate] = []
    for candidate in candidates:
        if not any(overlaps(k.box, candidate.box) for k in kept):
            kept.append(candidate)
    return kept


def map_back(box: Box, times: int) -> Box:
    """From the upsampled photo to the original: p -> p/2 - (1.25, 0.75) per 2x step, then rounded."""
    if times == 0:
        return box
    corners = np.array([box.left, box.top, box.right, box.bottom], dtype=np.float64)
    for _ in range(times):
        corners = corners / 2.0 - np.array([1.25, 0.75, 1.25, 0.75])
    return Box(*map(int, round_half_away(corners)))


class FaceDetector:
    """dlib's CNN face detector with the network in ONNX Runtime; the model opens on first use or `load()`."""

    def __init__(self, path: Path, runtime: RuntimeSettings, *, require_gpu: bool = False) -> None:
        self.path = path
        self._session = LazySession(path, runtime, require_gpu=require_gpu)

    def load(self) -> None:
        """Open the model and compile the pyramid's kernels now, not inside the first request."""
        self._session.load()
        warm_up()

    @property
    def load_failed(self) -> bool:
        """Whether the last attempt to open the model failed (it is tried again on the next use)."""
        return self._session.failed

    @property
    def provider(self) -> str | None:
        """The ONNX Runtime provider in use (None until loaded)."""
        return self._session.provider

    def scores(self, tensor: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The network alone: (1, 3, H, W) normalised tiled pyramid -> (h, w) score map."""
        (out,) = self._session.load().run(["scores"], {"image": tensor})
        return np.asarray(out[0, 0], dtype=np.float32)

    def detect(self, image: Image, *, upsample: int = 0, score_threshold: float = 0.0) -> list[Detection]:
        """Faces in an H x W x 3 uint8 RGB photo, as dlib's `cnn_face_detection_model_v1(image, upsample)`.

        upsample: how many times the photo is doubled first; each doubling finds faces half as large
            (the window is 80 px) at about 4x the cost.
        score_threshold: keep windows scoring above this (dlib: 0). Raising it drops doubtful faces.
        Returns detections sorted by descending score; boxes have inclusive corners in the photo's pixels
        and may extend past its edges. Raises ImageTooSmall when the photo is too small to scan.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {image.dtype} {image.shape}")
        if upsample < 0:
            raise ValueError(f"upsample must be >= 0, got {upsample}")
        check_size(image.shape[0], image.shape[1], upsample)
        pixels = upsample_times(np.ascontiguousarray(image), upsample)
        layout = tiled_layout(pixels.shape[0], pixels.shape[1])
        scores = self.scores(tiled_pyramid(pixels, layout, MEANS))
        kept = nms(decode(scores, layout, score_threshold))
        return [Detection(map_back(c.box, upsample), c.score) for c in kept]
