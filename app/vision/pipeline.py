"""The whole vision path for one photo: working copy -> detections -> landmarks -> chips -> embeddings.

Large photos are shrunk to `detector.max_side` before anything runs (MMOD's cost grows with pixels, and
faces in 20-36 MP photos are far larger than its 80 px window); small ones are upsampled per the detector
setting. Boxes and landmarks are reported in the pixels of the photo that was passed in.

With `settings.batching.enabled` (the default) the two networks are run by micro-batchers (app/vision/batcher.py):
the calling threads (the API's request threads) do the numpy work — pyramid, landmarks, alignment, quality — and
queue only the network calls; inference threads run them (a call alone on every core, under load one call per core
side by side, see `Pipeline`), and the chips of concurrent requests are embedded in one ONNX Runtime call. Results
are the unbatched ones (the embedder's output does not depend on the batch beyond ~1e-7). `close()` stops the
inference threads.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage

from app.config import DetectorSettings, RuntimeSettings, Settings
from app.errors import FacegateError, ImageTooSmall, ModelUnavailable, MultipleFaces, NoFace, RequestTooLarge
from app.vision.align import face_chips
from app.vision.batcher import BatchInfo, InferenceGate, MicroBatcher
from app.vision.decode import decode_to_fit, load_to_fit
from app.vision.detect import MIN_COLS, MIN_ROWS, WINDOW, FaceDetector, check_size
from app.vision.embed import FaceEmbedder
from app.vision.head import EmbeddingHead, load_head
from app.vision.landmarks import LandmarkPredictor
from app.vision.models import Manifest, load_manifest
from app.vision.quality import FaceQuality, load_indistinct_mean, measure, with_distinctiveness
from app.vision.runtime import usable_cores
from app.vision.types import (
    CHIP_SIZE,
    EMBEDDING_DIM,
    Box,
    Chips,
    Detection,
    Embeddings,
    Face,
    Image,
    Landmarks,
    PhotoFaces,
    SizedImage,
)

# A photo loaded on demand (e.g. decoded from upload bytes, perhaps at a reduced scale): see Pipeline.working.
Loader = Callable[[], Image | SizedImage]
PhotoSource = Image | SizedImage | Loader  # what the pipeline's methods take as a photo


@dataclass(frozen=True)
class WorkingImage:
    """The photo the detector sees and how it relates to the original (original = working / scale)."""

    pixels: Image
    scale: float  # working size / original size (<= 1)
    upsample: int

    @property
    def min_face_px(self) -> int:
        """The side, in the original photo's pixels, of the smallest box the detector reports on this copy: its
        window (80 px) in the upsampled copy. A 640 x 480 photo (not upsampled) has faces from about 80 px found, a
        500 x 375 one (upsampled once) from about 40 px, a 4000 x 3000 one (shrunk to 1024 px) only from about
        310 px."""
        return max(1, round(WINDOW / float(2**self.upsample) / self.scale))


def no_face(min_face_px: int) -> NoFace:
    """The error for a photo without a face the detector found, saying how small a face it could have found: a face
    below that (a group photo's faces in a 12-megapixel photo shrunk to detector.max_side) is simply not seen."""
    message = "no face was found in the photo"
    if min_face_px <= 0:
        return NoFace(message)
    return NoFace(
        f"{message} (faces smaller than about {min_face_px} px across are too small for the detector at this photo's "
        "size)",
        min_face_px=min_face_px,
    )


def working_image(image: Image | SizedImage, settings: DetectorSettings) -> WorkingImage:
    """Shrink photos larger than `max_side` (Pillow's antialiased resize) and choose the upsample count.

    A SizedImage is shrunk from its pixels (perhaps decoded smaller already) to the size its photo's own size gives,
    and `scale` relates the working copy to the photo's own size."""
    if isinstance(image, SizedImage):
        pixels, width, height = image.pixels, image.width, image.height
    else:
        pixels = image
        height, width = image.shape[:2]
    scale, size, upsample = _working_size(width, height, settings)
    if scale != 1.0:
        pixels = np.asarray(PILImage.fromarray(pixels).resize(size, PILImage.Resampling.LANCZOS, reducing_gap=3.0))
        check_working_size(width, height, settings)
    return WorkingImage(np.ascontiguousarray(pixels), scale, upsample)


def _working_size(width: int, height: int, settings: DetectorSettings) -> tuple[float, tuple[int, int], int]:
    """The detector's copy of a width x height photo: its scale, its (width, height) and the upsample count."""
    scale, size = 1.0, (width, height)
    if max(width, height) > settings.max_side:
        scale = settings.max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if settings.upsample == "auto":
        return scale, size, 1 if max(size) < settings.auto_upsample_below else 0
    return scale, size, settings.upsample


def check_working_size(width: int, height: int, settings: DetectorSettings) -> None:
    """ImageTooSmall for a width x height photo whose working copy the detector could not take."""
    scale, (cols, rows), upsample = _working_size(width, height, settings)
    try:
        check_size(rows, cols, upsample)
    except ImageTooSmall:
        if scale == 1.0:
            raise
        # name the photo's own size, not only the shrunk one the detector saw
        raise ImageTooSmall(
            f"image of {width}x{height} px, shrunk to {cols}x{rows} px (longer side "
            f"FACEGATE_DETECTOR__MAX_SIDE = {settings.max_side}), is too small for the face detector: it needs "
            f"at least {MIN_COLS}x{MIN_ROWS} px",
            width=width,
            height=height,
            upsample=upsample,
            shrunk_to={"width": cols, "height": rows},
        ) from None


def refuse_undetectable(width: int, height: int, settings: DetectorSettings) -> None:
    """`check_working_size` from a photo's header, before it is decoded, for a photo too small for the detector
    whichever way up (its EXIF orientation is read later): a 1 x 40,000,000 px PNG (155 kB) took 2.9 s and 830 MB
    to decode before the detector refused it."""
    try:
        check_working_size(width, height, settings)
    except ImageTooSmall as error:
        try:
            check_working_size(height, width, settings)
        except ImageTooSmall:
            raise error from None


class QueuedFaceDetector(FaceDetector):
    """dlib's detector whose network step (`scores`, which `FaceDetector.detect` calls between building the pyramid
    and decoding the score map) goes through a micro-batcher when one is attached; the rest of `detect` stays on the
    calling thread."""

    def __init__(self, path: Path, runtime: RuntimeSettings, *, require_gpu: bool = False) -> None:
        super().__init__(path, runtime, require_gpu=require_gpu)
        self.queue: MicroBatcher[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None = None

    def scores(self, tensor: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self.queue is None:
            return super().scores(tensor)
        return self.queue(tensor)

    def scores_many(self, tensors: list[npt.NDArray[np.float32]]) -> list[npt.NDArray[np.float32]]:
        """The network on several (1, 3, H, W) pyramids of one shape: stacked into one call when there are several."""
        if len(tensors) == 1:
            return [super().scores(tensors[0])]
        (out,) = self._session.load().run(["scores"], {"image": np.concatenate(tensors)})
        return [np.asarray(o[0], dtype=np.float32) for o in out]


class Pipeline:
    """Detector, landmark model and embedder behind one object; each opens its model once (lazily or at load()).

    With batching, each network is opened twice: as configured ("wide": by default every core's intra-op thread),
    for a call made while nothing else runs, and with one intra-op thread ("narrow"), for the calls that run side by
    side under load (one per core, `batching.workers`): on 2 cores a network on 2 threads is only ~1.2-1.5x faster
    than on 1, so two narrow calls do more work than one wide call after the other.

    `on_batch`, if set, is called on the inference threads with every batch's BatchInfo (name "detector" or
    "embedder", callers served, photos or chips, wide or narrow) just before its network call: a hook for metrics
    and tests.
    """

    def __init__(self, settings: Settings, manifest: Manifest) -> None:
        self.settings = settings
        self.manifest = manifest
        gpu = settings.require_gpu
        self.detector = QueuedFaceDetector(manifest.path("detector"), settings.runtime, require_gpu=gpu)
        self.landmarks = LandmarkPredictor(manifest.path("landmarks"))
        self.embedder = FaceEmbedder(manifest.path("embedder"), settings.runtime, require_gpu=gpu)
        # A trained head (FACEGATE_HEAD__NAME) maps the embedder's output to the served embeddings; None: base.
        self.flip = settings.embedding.flip
        self._variant = "+flip" if self.flip else ""  # how the embedder is applied, in versions and names
        self.head: EmbeddingHead | None = load_head(settings.head, manifest.directory, self.base_model_version)
        # Where identity-less embeddings gather (app.vision.quality distinctiveness), if shipped for this embedder
        # applied this way (none for mirror averaging): measured on the base embedding, whatever head is served.
        self.indistinct_mean = load_indistinct_mean(self.embedding_name)
        self.on_batch: Callable[[BatchInfo], None] | None = None
        self._load_lock = threading.Lock()
        # Photos given as loaders are decoded and shrunk under this: a worker holds at most this many at full size.
        self._full_size = threading.BoundedSemaphore(settings.image.max_concurrent_decodes)
        self._preparing = _Counter()  # photos between the start of detection and their chips' embedding call
        self._embed_queue: MicroBatcher[Chips, Embeddings] | None = None
        batching = settings.batching
        self._narrow_detector = self.detector
        self._narrow_embedder = self.embedder
        if not batching.enabled:
            return
        slots = batching.workers or usable_cores()
        if slots > 1 and settings.runtime.intra_op_threads != 1:
            narrow = settings.runtime.model_copy(update={"intra_op_threads": 1, "inter_op_threads": 1})
            self._narrow_detector = QueuedFaceDetector(manifest.path("detector"), narrow, require_gpu=gpu)
            self._narrow_embedder = FaceEmbedder(manifest.path("embedder"), narrow, require_gpu=gpu)
        gate = InferenceGate(slots)
        self._embed_queue = MicroBatcher(
            self._embed_batch,
            # Chips only come from photos being detected and aligned: with none under way, waiting for company
            # would only add max_wait_ms to a lone request.
            companions=self._preparing.count,
            name="embedder",
            max_batch=batching.max_batch,
            max_wait_ms=batching.max_wait_ms,
            workers=slots,
            size=len,
            gate=gate,
            on_batch=self._notify,
        )
        self.detector.queue = MicroBatcher(
            self._detect_batch,
            name="detector",
            max_batch=batching.detector_max_batch,
            # Never held back: under load the next photos queue while the detector runs, and photos of one shape
            # are stacked into the following call.
            max_wait_ms=0.0,
            workers=slots,
            key=lambda tensor: tensor.shape,
            gate=gate,
            on_batch=self._notify,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Pipeline:
        return cls(settings, load_manifest(settings.models_dir))

    @property
    def base_model_version(self) -> str:
        """The version of the embeddings before any head: the models', plus "+flip" with mirror averaging."""
        return self.manifest.model_version + self._variant

    @property
    def embedding_name(self) -> str:
        """The network and how it is applied, whatever the ONNX build: what the shipped calibrations are made for."""
        return self.manifest.model_name + self._variant

    @property
    def model_version(self) -> str:
        """The served embeddings' version: the base's, plus the head's when one is applied."""
        if self.head is None:
            return self.base_model_version
        return f"{self.base_model_version}+{self.head.version}"

    def load(self) -> None:
        with self._load_lock:
            self.detector.load()
            self.landmarks.load()
            self.embedder.load()
            # The narrow sessions (batching) open on their first use, under load: most processes (the CLI, tests,
            # a quiet service) never need them.
            if self.head is not None:
                self.head.load()

    def close(self, *, discard: bool = False) -> None:
        """Run what the inference threads have queued, then stop them (a no-op without batching): the detector's
        first, so that a caller between its detection and its embedding still gets its embedding. With `discard`
        (its callers are gone) what is queued fails instead, and both queues are closed before either is waited
        for, so that no caller queues more work meanwhile."""
        queues = [q for q in (self.detector.queue, self._embed_queue) if q is not None]
        if discard:
            for queue in queues:
                queue.close(timeout=0.0, discard=True)
        for queue in queues:
            queue.close(timeout=60.0, discard=discard)

    @property
    def batching(self) -> bool:
        return self._embed_queue is not None

    def _notify(self, info: BatchInfo) -> None:
        hook = self.on_batch
        if hook is not None:
            hook(info)

    def embed(self, chips: Chips) -> Embeddings:
        """Embeddings of N chips: through the embedder's micro-batcher (with other requests' chips) or directly.
        With `embedding.flip`, each chip's and its mirror image's embeddings averaged (both in one call)."""
        if len(chips) == 0:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        batch = np.concatenate([chips, chips[:, :, ::-1]]) if self.flip else chips
        if self._embed_queue is None:  # batching off: FACEGATE_BATCHING__MAX_BATCH still bounds one call
            embeddings = self.embedder.embed(batch, batch_size=self.settings.batching.max_batch)
        else:
            embeddings = self._embed_queue(batch)
        if not self.flip:
            return embeddings
        return (embeddings[: len(chips)] + embeddings[len(chips) :]) * np.float32(0.5)

    def _embed_batch(self, items: list[Chips], wide: bool) -> list[Embeddings]:
        """The embedder's batched call: every caller's chips in one array, split back per caller."""
        embedder = self.embedder if wide else self._narrow_embedder
        embeddings = embedder.embed(np.concatenate(items), batch_size=self.settings.batching.max_batch)
        bounds = np.cumsum([len(chips) for chips in items])[:-1]
        return np.split(embeddings, bounds)

    def _detect_batch(self, tensors: list[npt.NDArray[np.float32]], wide: bool) -> list[npt.NDArray[np.float32]]:
        return (self.detector if wide else self._narrow_detector).scores_many(tensors)

    @property
    def loaded(self) -> bool:
        return bool(self.detector.provider and self.embedder.provider)

    @property
    def load_failed(self) -> bool:
        """Whether opening a network failed the last time it was tried (models opened on first use)."""
        return self.detector.load_failed or self.embedder.load_failed

    def providers(self) -> dict[str, str | None]:
        """The ONNX Runtime provider each network actually runs on (None until loaded)."""
        return {"detector": self.detector.provider, "embedder": self.embedder.provider}

    def decoder(self, data: bytes, budget: PixelBudget | None = None) -> Callable[[], SizedImage]:
        """A loader of photo bytes for this pipeline: decoded under `image.max_pixels` (HEIC too with `image.heic`),
        a large JPEG straight to a reduced scale near the detector's `max_side` (decode_to_fit), a photo too small
        for the detector refused from its header; and, given the request's `budget`, only while the request's
        photos have not used it up."""
        load = functools.partial(decode_to_fit, data, **self._fit())
        return load if budget is None else budget.limit(load)

    def file_loader(self, path: Path) -> Callable[[], SizedImage]:
        """`decoder` for a photo file (OSError if it cannot be read, when loaded)."""
        return functools.partial(load_to_fit, path, **self._fit())

    def _fit(self) -> dict[str, Any]:
        """decode_to_fit's options for this pipeline's detector and image settings."""
        image, detector = self.settings.image, self.settings.detector
        return {
            "max_pixels": image.max_pixels,
            "longest": detector.max_side,
            "heic": image.heic,
            "refuse": functools.partial(refuse_undetectable, settings=detector),
        }

    def working(self, image: PhotoSource) -> WorkingImage:
        """The detector's copy of a photo. A photo given as a loader (a function returning it, e.g. decoding an
        upload) is loaded and shrunk while holding one of `image.max_concurrent_decodes` slots, and only the shrunk
        copy outlives this call: however many requests arrive at once, a worker holds at most that many photos at
        full size (up to ~1 GB each while a 40-megapixel PNG is decoded and converted; a JPEG that large is decoded
        at 1/4 scale by `decoder`'s loaders)."""
        if not callable(image):
            return working_image(image, self.settings.detector)
        with self._full_size:
            return working_image(image(), self.settings.detector)

    def detect(self, image: PhotoSource) -> tuple[WorkingImage, list[Detection]]:
        work = self.working(image)
        detections = self.detector.detect(
            work.pixels, upsample=work.upsample, score_threshold=self.settings.detector.score_threshold
        )
        return work, detections

    def find_faces(self, image: PhotoSource) -> list[Face]:
        """Every face in the photo (up to `detector.max_faces`) with its embedding, highest detector score first."""
        return self.photo_faces(image).faces

    def photo_faces(self, image: PhotoSource) -> PhotoFaces:
        """`find_faces`, with how many faces the detector found (more than it returns when the photo is capped)."""
        with self._preparing:
            work, detections = self.detect(image)
            if not detections:
                return PhotoFaces([], 0, work.min_face_px)
            prepared = self._prepare(work, detections)
        faces = self._finish(prepared, self.embed(prepared.chips))
        return PhotoFaces(faces, prepared.detected, prepared.min_face_px)

    def embed_photo(self, image: PhotoSource, *, face: str = "single") -> Face:
        """The one face of a photo: `single` refuses photos with several faces, `largest` takes the biggest box.

        The choice is made on the detections, so only the chosen face gets landmarks, a chip and an embedding.
        """
        with self._preparing:
            work, detections = self.detect(image)
            if not detections:
                raise no_face(work.min_face_px)
            if len(detections) > 1:
                boxes = [_original_box(d.box, work.scale) for d in detections]
                if face != "largest":
                    raise MultipleFaces(
                        f"{len(detections)} faces were found; send a photo with one face or ask for face=largest",
                        boxes=[b.as_dict() for b in boxes],
                    )
                chosen = max(range(len(detections)), key=lambda i: (boxes[i].area, detections[i].score))
                detections = [detections[chosen]]
            prepared = self._prepare(work, detections)
        return self._finish(prepared, self.embed(prepared.chips))[0]

    def embed_face_at(self, image: PhotoSource, box: Box, *, min_iou: float = 0.5) -> Face | None:
        """The face of the photo whose box overlaps `box` (original photo pixels) best, if by at least `min_iou`;
        else None. As in `embed_photo`, only the chosen detection gets landmarks, a chip and an embedding."""
        with self._preparing:
            work, detections = self.detect(image)
            overlap = [_original_box(d.box, work.scale).iou(box) for d in detections]
            if not detections or max(overlap) < min_iou:
                return None
            prepared = self._prepare(work, [detections[overlap.index(max(overlap))]])
        return self._finish(prepared, self.embed(prepared.chips))[0]

    def find_faces_many(self, images: Sequence[PhotoSource]) -> list[list[Face] | FacegateError]:
        """`find_faces` for several photos: `photo_faces_many` without the counts."""
        return [r if isinstance(r, FacegateError) else r.faces for r in self.photo_faces_many(images)]

    def photo_faces_many(self, images: Sequence[PhotoSource]) -> list[PhotoFaces | FacegateError]:
        """`photo_faces` for several photos, their chips embedded together (in calls of up to `batching.max_batch`).

        images: photos, or functions returning one (e.g. decoding it): each is then loaded only for its own
            detection, so that a request of many large photos never holds more than one at full size.
        A photo that fails to load (any FacegateError) or that the detector refuses (ImageTooSmall) gives its error
        in its place; the others still give faces. ModelUnavailable concerns every photo and is raised."""
        prepared: list[_Prepared | FacegateError] = []
        for image in images:
            try:
                with self._preparing:
                    prepared.append(self._prepare(*self.detect(image)))
            except ModelUnavailable:
                raise
            except FacegateError as error:
                prepared.append(_detached(error))
        ready = [p for p in prepared if isinstance(p, _Prepared)]
        chips = [p.chips for p in ready if len(p.chips)]
        embeddings = self.embed(np.concatenate(chips)) if chips else np.zeros((0, EMBEDDING_DIM), np.float32)
        results: list[PhotoFaces | FacegateError] = []
        start = 0
        for p in prepared:
            if isinstance(p, FacegateError):
                results.append(p)
                continue
            count = len(p.detections)
            faces = self._finish(p, embeddings[start : start + count])
            results.append(PhotoFaces(faces, p.detected, p.min_face_px))
            start += count
        return results

    def _finish(self, prepared: _Prepared, embeddings: Embeddings) -> list[Face]:
        return prepared.finish(embeddings, self.head, self.indistinct_mean)

    def _prepare(self, work: WorkingImage, found: list[Detection]) -> _Prepared:
        """Everything but the embeddings: landmarks, chips and quality of each detection, for the
        `detector.max_faces` most confident of those found (they come sorted by descending score)."""
        detections = found[: self.settings.detector.max_faces]
        points = [self.landmarks.predict(work.pixels, d.box) for d in detections]
        chips = face_chips(work.pixels, points) if detections else np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
        # Quality is measured where the embedding comes from: the working photo (pixels as the models see them).
        qualities = [
            measure(image_shape=work.pixels.shape, box=d.box, landmarks=p, chip=c, score=d.score)
            for d, p, c in zip(detections, points, chips, strict=True)
        ]
        return _Prepared(
            work.scale, detections, points, chips, qualities, detected=len(found), min_face_px=work.min_face_px
        )


def _detached(error: FacegateError) -> FacegateError:
    """`error` without the frames it was raised through or the exception it was raised from, to be kept in a list
    of results. Their locals are what the failed decode held (Pillow's decoder and buffers: 2 GB for a 200-byte
    TIFF declaring a huge tile), and through the traceback the error would also reach the list holding it: a cycle
    that only a full garbage collection frees, so a request of such photos kept every one (measured: 17 GB)."""
    error.__traceback__ = None
    error.__cause__ = error.__context__ = None
    return error


class PixelBudget:
    """The pixels one request's photos may decode together (`image.max_request_pixels`). Each photo's loader checks
    it before decoding: once the photos decoded so far reach it, the next ones are refused (RequestTooLarge in
    their place) without being decoded, so a request goes over by one photo at most. A photo costs the pixels
    actually decoded: a large JPEG, decoded at reduced scale, costs that scale's."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self.spent = 0  # one request's photos are decoded one after another: no lock

    def limit(self, load: Callable[[], SizedImage]) -> Callable[[], SizedImage]:
        def load_within_budget() -> SizedImage:
            if self.spent >= self.pixels:
                raise RequestTooLarge(
                    f"not decoded: the photos before it in this request decoded {self.spent:,} pixels, at least "
                    f"FACEGATE_IMAGE__MAX_REQUEST_PIXELS ({self.pixels:,}); send it in another request",
                    max_request_pixels=self.pixels,
                )
            sized = load()
            self.spent += int(sized.pixels.shape[0]) * int(sized.pixels.shape[1])
            return sized

        return load_within_budget


class _Counter:
    """How many threads are inside `with counter:` (read without the lock: a momentary value is all it serves)."""

    def __init__(self) -> None:
        self._value = 0
        self._lock = threading.Lock()

    def count(self) -> int:
        return self._value

    def __enter__(self) -> None:
        with self._lock:
            self._value += 1

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._value -= 1


@dataclass(frozen=True)
class _Prepared:
    """A photo's faces before embedding: what `find_faces` computes on the calling thread."""

    scale: float  # the working photo's (not the photo itself: a many-photo request keeps this for each photo)
    detections: list[Detection]
    points: list[Landmarks]
    chips: Chips
    qualities: list[FaceQuality]
    detected: int  # faces the detector found: more than `detections` when the photo was capped
    min_face_px: int  # WorkingImage.min_face_px

    def finish(
        self,
        embeddings: Embeddings,
        head: EmbeddingHead | None = None,
        indistinct_mean: npt.NDArray[np.float32] | None = None,
    ) -> list[Face]:
        """The faces with their embeddings (the head's, when one is given), in the original photo's pixels; with
        `indistinct_mean`, their quality's distinctiveness measured on the embedder's own output."""
        served = head.apply(embeddings) if head is not None else embeddings
        qualities = (
            self.qualities
            if indistinct_mean is None
            else [with_distinctiveness(q, e, indistinct_mean) for q, e in zip(self.qualities, embeddings, strict=True)]
        )
        return [
            _to_original(d, p, e, self.scale, q, base)
            for d, p, e, q, base in zip(self.detections, self.points, served, qualities, embeddings, strict=True)
        ]


def _original_box(box: Box, scale: float) -> Box:
    return box if scale == 1.0 else box.scaled(1.0 / scale)


def _to_original(
    detection: Detection,
    points: Landmarks,
    embedding: np.ndarray,
    scale: float,
    quality: FaceQuality | None = None,
    base: np.ndarray | None = None,
) -> Face:
    if scale == 1.0:
        return Face(detection.box, detection.score, points, embedding, quality, base)
    original = np.floor(points.astype(np.float64) * (1.0 / scale) + 0.5).astype(np.int64)
    return Face(_original_box(detection.box, scale), detection.score, original, embedding, quality, base)
