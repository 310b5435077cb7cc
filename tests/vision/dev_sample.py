"""A deterministic sample of dev photos with dlib's detections, shared by the landmark, chip and quality tests.

Every `STEP`-th photo of the dev set (sorted paths), decoded by `vision.decode`, shrunk to at most `MAX_SIDE` px
(Pillow bilinear), with dlib's HOG face detections (fast, and any rectangle is a fine input for the landmark and
chip oracles). Computed once per test process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from app.vision.decode import load_image
from app.vision.types import Box

STEP = 8
MAX_SIDE = 1024
SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True)
class DevPhoto:
    name: str
    pixels: np.ndarray  # H x W x 3 uint8
    boxes: tuple[Box, ...]  # dlib HOG detections


def shrink(pixels: np.ndarray, max_side: int) -> np.ndarray:
    h, w = pixels.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return pixels
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.ascontiguousarray(np.asarray(PILImage.fromarray(pixels).resize(size, PILImage.Resampling.BILINEAR)))


@functools.cache
def dev_photos(root: Path, step: int = STEP, max_side: int = MAX_SIDE) -> tuple[DevPhoto, ...]:
    import dlib

    detector = dlib.get_frontal_face_detector()
    paths = sorted(p for p in root.glob("*/*") if p.suffix.lower() in SUFFIXES)[::step]
    photos = []
    for path in paths:
        pixels = shrink(np.asarray(load_image(path, max_pixels=100_000_000)), max_side)
        rects = detector(pixels, 0)
        boxes = tuple(Box(r.left(), r.top(), r.right(), r.bottom()) for r in rects)
        photos.append(DevPhoto(str(path.relative_to(root)), pixels, boxes))
    return tuple(photos)
