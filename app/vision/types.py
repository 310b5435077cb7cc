"""Plain result types of the vision steps.

Box convention (dlib's): integer pixel coordinates with *inclusive* corners, so width = right - left + 1.
Coordinates may lie outside the image (a face cut by the border). Landmarks are (x, y) integer pixels
in the 5-point model's order: 0/1 outer/inner corner of the eye on the image's right, 2/3 outer/inner
corner of the other eye, 4 below the nose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from app.vision.quality import FaceQuality

Image = npt.NDArray[np.uint8]  # H x W x 3, RGB, C-contiguous
Chips = npt.NDArray[np.uint8]  # N x 150 x 150 x 3, RGB
Embeddings = npt.NDArray[np.float32]  # N x 128

CHIP_SIZE = 150
CHIP_PADDING = 0.25
EMBEDDING_DIM = 128


@dataclass(frozen=True, slots=True)
class SizedImage:
    """A photo's pixels and the size of the photo itself, upright: the pixels may be smaller (a large JPEG decoded at
    1/2, 1/4 or 1/8 scale for a detector that shrinks it anyway)."""

    pixels: Image
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Box:
    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left + 1

    @property
    def height(self) -> int:
        return self.bottom - self.top + 1

    @property
    def area(self) -> int:
        return max(self.width, 0) * max(self.height, 0)

    def iou(self, other: Box) -> float:
        """Intersection over union (pixel-inclusive boxes, as dlib's)."""
        inner = Box(
            max(self.left, other.left), max(self.top, other.top), min(self.right, other.right), min(self.bottom, other.bottom)
        ).area
        union = self.area + other.area - inner
        return inner / union if union > 0 else 0.0

    def scaled(self, factor: float) -> Box:
        """The box in a photo `factor` times larger (rounded half away from zero)."""
        return Box(*(int(_round_half_away(v * factor)) for v in (self.left, self.top, self.right, self.bottom)))

    def as_dict(self) -> dict[str, int]:
        return {"left": self.left, "top": self.top, "right": self.right, "bottom": self.bottom}


@dataclass(frozen=True, slots=True)
class Detection:
    box: Box
    score: float  # raw MMOD score; dlib keeps detections with score > 0


Landmarks = npt.NDArray[np.int64]  # 5 x 2 integer (x, y)


@dataclass(frozen=True, slots=True)
class Face:
    """One face as the pipeline found it, in the coordinates of the photo that was passed in."""

    box: Box
    score: float
    landmarks: Landmarks
    embedding: npt.NDArray[np.float32]  # 128 float32, not normalised (dlib's scale)
    quality: FaceQuality | None = None  # measured on the chip the embedding came from (vision.quality)
    # The embedder's own output when a trained head is served (`embedding` is then the head's); stored so that
    # `facegate reindex` can recompute served embeddings without photos. None: same as `embedding`.
    base_embedding: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True)
class PhotoFaces:
    """The faces taken from one photo (at most `detector.max_faces`: the most confident) and how many were found."""

    faces: list[Face]
    detected: int
    # The side, in the photo's own pixels, of the smallest box the detector reports at the size it scanned this photo
    # (its window, 80 px, halved per upsampling, over the shrink to detector.max_side): faces much smaller are not
    # found. 0 when not known.
    min_face_px: int = 0

    @property
    def capped(self) -> bool:
        return self.detected > len(self.faces)


def _round_half_away(v: float) -> float:
    return float(np.sign(v) * np.floor(abs(v) + 0.5))
