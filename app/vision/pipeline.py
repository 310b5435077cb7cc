"""The whole vision path for one photo: working copy -> detections -> landmarks -> chips -> embeddings.

Large photos are shrunk to `detector.max_side` before anything runs (MMOD's cost grows with pixels, and
faces in 20-36 MP photos are far larger than its 80 px window); small ones are upsampled per the detector
setting. Boxes and landmarks are reported in the pixels of the photo that was passed in.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage

from app.config import DetectorSettings, Settings
from app.errors import MultipleFaces, NoFace
from app.vision.align import face_chips
from app.vision.detect import FaceDetector
from app.vision.embed import FaceEmbedder
from app.vision.landmarks import LandmarkPredictor
from app.vision.models import Manifest, load_manifest
from app.vision.quality import FaceQuality, measure
from app.vision.types import Box, Detection, Face, Image, Landmarks


@dataclass(frozen=True)
class WorkingImage:
    """The photo the detector sees and how it relates to the original (original = working / scale)."""

    pixels: Image
    scale: float  # working size / original size (<= 1)
    upsample: int


def working_image(image: Image, settings: DetectorSettings) -> WorkingImage:
    """Shrink photos larger than `max_side` (Pillow's antialiased resize) and choose the upsample count."""
    height, width = image.shape[:2]
    scale = 1.0
    pixels = image
    longest = max(height, width)
    if longest > settings.max_side:
        scale = settings.max_side / longest
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        pixels = np.asarray(PILImage.fromarray(image).resize(size, PILImage.Resampling.LANCZOS, reducing_gap=3.0))
    if settings.upsample == "auto":
        upsample = 1 if max(pixels.shape[:2]) < settings.auto_upsample_below else 0
    else:
        upsample = settings.upsample
    return WorkingImage(np.ascontiguousarray(pixels), scale, upsample)


class Pipeline:
    """Detector, landmark model and embedder behind one object; each opens its model once (lazily or at load())."""

    def __init__(self, settings: Settings, manifest: Manifest) -> None:
        self.settings = settings
        self.manifest = manifest
        self.detector = FaceDetector(manifest.path("detector"), settings.runtime, require_gpu=settings.require_gpu)
        self.landmarks = LandmarkPredictor(manifest.path("landmarks"))
        self.embedder = FaceEmbedder(manifest.path("embedder"), settings.runtime, require_gpu=settings.require_gpu)
        self._load_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Pipeline:
        return cls(settings, load_manifest(settings.models_dir))

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    def load(self) -> None:
        with self._load_lock:
            self.detector.load()
            self.landmarks.load()
            self.embedder.load()

    @property
    def loaded(self) -> bool:
        return bool(self.detector.provider and self.embedder.provider)

    def providers(self) -> dict[str, str | None]:
        """The ONNX Runtime provider each network actually runs on (None until loaded)."""
        return {"detector": self.detector.provider, "embedder": self.embedder.provider}

    def detect(self, image: Image) -> tuple[WorkingImage, list[Detection]]:
        work = working_image(image, self.settings.detector)
        detections = self.detector.detect(
            work.pixels, upsample=work.upsample, score_threshold=self.settings.detector.score_threshold
        )
        return work, detections

    def find_faces(self, image: Image) -> list[Face]:
        """Every face in the photo with its embedding, highest detector score first."""
        work, detections = self.detect(image)
        return self._faces(work, detections)

    def embed_photo(self, image: Image, *, face: str = "single") -> Face:
        """The one face of a photo: `single` refuses photos with several faces, `largest` takes the biggest box.

        The choice is made on the detections, so only the chosen face gets landmarks, a chip and an embedding.
        """
        work, detections = self.detect(image)
        if not detections:
            raise NoFace("no face was found in the photo")
        if len(detections) > 1:
            boxes = [_original_box(d.box, work.scale) for d in detections]
            if face != "largest":
                raise MultipleFaces(
                    f"{len(detections)} faces were found; send a photo with one face or ask for face=largest",
                    boxes=[b.as_dict() for b in boxes],
                )
            chosen = max(range(len(detections)), key=lambda i: (boxes[i].area, detections[i].score))
            detections = [detections[chosen]]
        return self._faces(work, detections)[0]

    def _faces(self, work: WorkingImage, detections: list[Detection]) -> list[Face]:
        """Landmarks, chips, quality and embeddings of the given detections, in the original photo's pixels."""
        if not detections:
            return []
        points = [self.landmarks.predict(work.pixels, d.box) for d in detections]
        chips = face_chips(work.pixels, points)
        # Quality is measured where the embedding comes from: the working photo (pixels as the models see them).
        qualities = [
            measure(image_shape=work.pixels.shape, box=d.box, landmarks=p, chip=c, score=d.score)
            for d, p, c in zip(detections, points, chips, strict=True)
        ]
        embeddings = self.embedder.embed(chips)
        return [
            _to_original(d, p, e, work.scale, q)
            for d, p, e, q in zip(detections, points, embeddings, qualities, strict=True)
        ]


def _original_box(box: Box, scale: float) -> Box:
    return box if scale == 1.0 else box.scaled(1.0 / scale)


def _to_original(
    detection: Detection, points: Landmarks, embedding: np.ndarray, scale: float, quality: FaceQuality | None = None
) -> Face:
    if scale == 1.0:
        return Face(detection.box, detection.score, points, embedding, quality)
    original = np.floor(points.astype(np.float64) * (1.0 / scale) + 0.5).astype(np.int64)
    return Face(_original_box(detection.box, scale), detection.score, original, embedding, quality)
