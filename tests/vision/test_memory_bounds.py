"""What one photo, and many at once, make a worker hold: full-size photos are decoded under a per-process limit
(`image.max_concurrent_decodes`), and converting an unusual pixel format costs little beyond the decoded photo."""

from __future__ import annotations

import functools
import gc
import io
import threading
import time
import tracemalloc
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image as PILImage

from app.config import Settings
from app.errors import InvalidImage, NoFace
from app.service import FaceService
from app.vision.decode import decode_image
from app.vision.pipeline import Pipeline
from app.vision.types import Image


def _png(image: PILImage.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


class _Watched:
    """A photo loader that records how many loads run at once (a real decode, slowed so that loads overlap)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def __call__(self) -> Image:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.05)
            return decode_image(self.data, max_pixels=40_000_000)
        finally:
            with self._lock:
                self.running -= 1


class TestDecodeGate:
    @pytest.mark.parametrize("slots", [1, 2])
    def test_full_size_photos_are_loaded_a_few_at_a_time(self, settings: Settings, slots: int) -> None:
        settings = settings.model_copy(
            update={"image": settings.image.model_copy(update={"max_concurrent_decodes": slots})}
        )
        pipeline = Pipeline.from_settings(settings)
        loader = _Watched(_png(PILImage.new("RGB", (1600, 1200), (90, 80, 70))))
        with ThreadPoolExecutor(8) as pool:
            works = list(pool.map(lambda _: pipeline.working(loader), range(8)))
        assert loader.most == slots
        assert all(w.pixels.shape == (768, 1024, 3) and w.scale == 1024 / 1600 for w in works)

    def test_requests_decode_inside_the_gate(self, settings: Settings) -> None:
        # /identify through the service: 4 requests at once of a 12-megapixel RGBA photo (decoded and converted:
        # ~100 MB of arrays each) hold one at a time with one slot.
        settings = settings.model_copy(
            update={"image": settings.image.model_copy(update={"max_concurrent_decodes": 1})}
        )
        service = FaceService.open(settings, load_models=True)
        photo = _png(PILImage.new("RGBA", (4000, 3000), (10, 20, 30, 128)))
        try:
            tracemalloc.start()
            with ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(functools.partial(service.identify, photo)) for _ in range(4)]
                for future in futures:
                    with pytest.raises(NoFace):
                        future.result()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            service.close()
        assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"


class TestConversionMemory:
    @pytest.mark.parametrize(
        ("mode", "value"), [("I;16", 30_000), ("I", 70_000), ("F", 0.5), ("RGBA", (10, 20, 30, 128)), ("LA", (9, 200))]
    )
    def test_conversion_holds_little_beyond_the_result(self, mode: str, value: object) -> None:
        # A 12-megapixel photo is 36 MB as 8-bit RGB, and RGBA is first read as one 4-byte-per-pixel copy; the
        # conversions' int64 / uint16 / float32 intermediates of the whole photo took 250-350 MB more.
        photo = PILImage.new(mode, (4000, 3000), value)  # type: ignore[arg-type]
        data = _tiff(photo) if mode in ("I", "F") else _png(photo)
        tracemalloc.start()
        try:
            image = decode_image(data, max_pixels=40_000_000)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert image.shape == (3000, 4000, 3)
        assert peak < 36 * 2**20 + 4000 * 3000 * 4 + 32 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def _tiff(image: PILImage.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "TIFF", compression="tiff_adobe_deflate")
    return out.getvalue()


def test_converted_pixels_are_exact() -> None:
    # Row blocks change nothing: 16-bit rounding, floats in 0..1 scaled, alpha composited on white, as one piece.
    grey = np.arange(0, 65536, 7, dtype=np.uint16)[: 3 * 3120].reshape(3, 3120)
    np.testing.assert_array_equal(
        decode_image(_png(PILImage.fromarray(grey)), max_pixels=10**8)[:, :, 0], (grey.astype(np.int64) + 128) // 257
    )
    rgba = np.random.default_rng(0).integers(0, 256, (700, 1600, 4), dtype=np.uint8)
    got = decode_image(_png(PILImage.fromarray(rgba, "RGBA")), max_pixels=10**8)
    wide = rgba.astype(np.int64)
    want = (wide[:, :, :3] * wide[:, :, 3:] + 255 * (255 - wide[:, :, 3:]) + 127) // 255
    np.testing.assert_array_equal(got, want)


def test_photos_that_fail_to_load_leave_nothing_of_their_decode_behind(settings: Settings) -> None:
    """The many-photo endpoints answer a photo that failed to load with its error. That error must not keep what
    the failed decode held: its traceback reaches the decode's frames (Pillow's buffers: a 200-byte TIFF declaring
    a huge tile took 2 GB), and it reached the result list too, a cycle that lasted until a full garbage
    collection: a request of eight such photos left a worker at 17 GB."""
    pipeline = Pipeline.from_settings(settings)
    held: list[weakref.ref[np.ndarray]] = []

    def failing() -> Image:
        pixels = np.zeros((1000, 1000, 3), np.uint8)  # what a decode held when its data turned out broken
        held.append(weakref.ref(pixels))
        try:
            raise OSError("broken data stream when reading image file")  # as Pillow raises it
        except OSError as error:
            raise InvalidImage("the image data is truncated or corrupt") from error

    gc.disable()  # what is left must be freed at once, not by the next collection
    try:
        results = pipeline.photo_faces_many([failing, failing, failing])
        assert [type(r) for r in results] == [InvalidImage] * 3
        assert len(held) == 3 and all(ref() is None for ref in held)
    finally:
        gc.enable()
        pipeline.close()
