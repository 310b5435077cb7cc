"""vision.decode.decode_to_fit: camera-sized JPEGs decoded at a reduced scale for the detector's working copy, and
the faces found that way, in the photo's own coordinates."""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from app.config import DetectorSettings, Settings
from app.errors import ImageTooSmall, InvalidImage
from app.vision.decode import decode_image, decode_to_fit, load_to_fit
from app.vision.pipeline import Pipeline, check_working_size, refuse_undetectable, working_image
from app.vision.types import SizedImage

LIMIT = 100_000_000


def _smooth(width: int, height: int) -> np.ndarray:
    """Gradients and a dark block in the top-left corner: a photo-like image whose shrunk copies can be compared."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1).astype(np.uint8)
    img[: height // 8, : width // 4] = 20
    return img


def _jpeg(pixels: np.ndarray, orientation: int | None = None, **params: object) -> bytes:
    im = PILImage.fromarray(pixels)
    if orientation is not None:
        exif = im.getexif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    out = io.BytesIO()
    im.save(out, "JPEG", quality=92, **params)
    return out.getvalue()


def _lossless_grey_jpeg(width: int, height: int, components: int) -> bytes:
    """A lossless JPEG (SOF3, predictor 1) of mid-grey, which Pillow cannot write: every sample is its prediction
    (128 to begin with), a difference of 0 coded as 00 in the Huffman table (the usual DC luminance one)."""

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    huffman = bytes([0x00, 0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, *range(12)])
    frame = struct.pack(">BHHB", 8, height, width, components)
    frame += b"".join(bytes([c + 1, 0x11, 0]) for c in range(components))
    scan = bytes([components]) + b"".join(bytes([c + 1, 0]) for c in range(components)) + bytes([1, 0, 0])
    samples = bytes(-(-width * height * components * 2 // 8))
    return b"\xff\xd8" + segment(0xC4, huffman) + segment(0xC3, frame) + segment(0xDA, scan) + samples + b"\xff\xd9"


def _shrunk(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(PILImage.fromarray(pixels).resize((width, height), PILImage.Resampling.LANCZOS, reducing_gap=3.0))


class TestDecodeToFit:
    @pytest.mark.parametrize(
        ("size", "reduced"),
        [
            ((4096, 3072), (1024, 768)),  # 1/4: exactly the shrunk size
            ((4032, 3024), (2016, 1512)),  # a 12-megapixel phone photo: 1/4 would be 1008 px < 1024
            ((2048, 1000), (1024, 500)),  # twice the side: 1/2
            ((7296, 5472), (1824, 1368)),  # 40 megapixels: 1/4 (1/8 would be 912 px)
        ],
    )
    def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_still_covers_the_shrunk_size(
        self, size: tuple[int, int], reduced: tuple[int, int]
    ) -> None:
        pixels = _smooth(*size)
        data = _jpeg(pixels)
        out = decode_to_fit(data, max_pixels=LIMIT, longest=1024)
        assert isinstance(out, SizedImage)
        assert (out.width, out.height) == size  # the photo's own size, for boxes in its coordinates
        assert out.pixels.shape == (reduced[1], reduced[0], 3) and out.pixels.dtype == np.uint8
        # the same picture as decoding whole and shrinking: both shrunk to the detector's size, within a grey level
        # or two on average (JPEG's DCT scaling is an area average, not Lanczos)
        scale = 1024 / max(size)
        target = (round(size[0] * scale), round(size[1] * scale))
        whole = _shrunk(decode_image(data, max_pixels=LIMIT), *target)
        mean_difference = np.abs(_shrunk(out.pixels, *target).astype(int) - whole.astype(int)).mean()
        assert mean_difference < 2.0

    @pytest.mark.parametrize(("orientation", "swapped"), [(3, False), (6, True), (8, True)])
    def test_exif_orientation_turns_the_reduced_pixels_and_the_size(self, orientation: int, swapped: bool) -> None:
        pixels = _smooth(4096, 3072)
        upright = decode_to_fit(_jpeg(pixels), max_pixels=LIMIT, longest=1024)
        turned = decode_to_fit(_jpeg(pixels, orientation), max_pixels=LIMIT, longest=1024)
        assert (turned.width, turned.height) == ((3072, 4096) if swapped else (4096, 3072))
        expected = {3: np.rot90(upright.pixels, 2), 6: np.rot90(upright.pixels, -1), 8: np.rot90(upright.pixels, 1)}
        np.testing.assert_array_equal(turned.pixels, expected[orientation])
        # upright as decode_image shows it
        whole = decode_image(_jpeg(pixels, orientation), max_pixels=LIMIT)
        assert whole.shape[:2] == (turned.height, turned.width)
        size = (turned.pixels.shape[1], turned.pixels.shape[0])
        assert np.abs(_shrunk(whole, *size).astype(int) - turned.pixels.astype(int)).mean() < 2.0

    @pytest.mark.parametrize("size", [(2047, 1500), (1024, 768), (300, 200)])
    def test_a_jpeg_under_twice_the_side_is_decoded_whole(self, size: tuple[int, int]) -> None:
        data = _jpeg(_smooth(*size))
        out = decode_to_fit(data, max_pixels=LIMIT, longest=1024)
        assert (out.width, out.height) == size
        np.testing.assert_array_equal(out.pixels, decode_image(data, max_pixels=LIMIT))

    def test_other_formats_are_decoded_whole(self) -> None:
        im = PILImage.fromarray(_smooth(4096, 3072))
        buffer = io.BytesIO()
        im.save(buffer, "PNG", compress_level=1)
        out = decode_to_fit(buffer.getvalue(), max_pixels=LIMIT, longest=1024)
        assert (out.width, out.height) == (4096, 3072)
        np.testing.assert_array_equal(out.pixels, _smooth(4096, 3072))

    def test_progressive_and_cmyk_jpegs(self) -> None:
        pixels = _smooth(4096, 3072)
        progressive = decode_to_fit(_jpeg(pixels, progressive=True), max_pixels=LIMIT, longest=1024)
        assert progressive.pixels.shape == (768, 1024, 3)
        cmyk = PILImage.fromarray(pixels).convert("CMYK")
        buffer = io.BytesIO()
        cmyk.save(buffer, "JPEG", quality=92)
        out = decode_to_fit(buffer.getvalue(), max_pixels=LIMIT, longest=1024)
        assert out.pixels.shape == (768, 1024, 3) and (out.width, out.height) == (4096, 3072)
        assert np.abs(out.pixels.astype(int) - progressive.pixels.astype(int)).mean() < 3.0

    @pytest.mark.parametrize("components", [1, 3])
    def test_a_lossless_jpeg_is_decoded_whole(self, components: int) -> None:
        """libjpeg has no reduced scale for a lossless JPEG (SOF3): asked for one, Pillow reported broken data, and
        a photo decode_image reads was refused."""
        data = _lossless_grey_jpeg(4096, 16, components)
        whole = decode_image(data, max_pixels=LIMIT)
        assert whole.shape == (16, 4096, 3) and (whole == 128).all()
        out = decode_to_fit(data, max_pixels=LIMIT, longest=1024)
        assert (out.width, out.height) == (4096, 16)
        np.testing.assert_array_equal(out.pixels, whole)

    def test_refusals_are_those_of_decode_image(self, tmp_path: Path) -> None:
        data = _jpeg(np.random.default_rng(0).integers(0, 256, (3072, 4096, 3), dtype=np.uint8))
        with pytest.raises(InvalidImage, match="truncated"):
            decode_to_fit(data[: len(data) // 2], max_pixels=LIMIT, longest=1024)
        with pytest.raises(InvalidImage, match="empty"):
            decode_to_fit(b"", max_pixels=LIMIT, longest=1024)
        (tmp_path / "empty.jpg").write_bytes(b"")
        with pytest.raises(InvalidImage, match="empty.jpg is empty"):
            load_to_fit(tmp_path / "empty.jpg", max_pixels=LIMIT, longest=1024)
        with pytest.raises(ValueError, match="longest"):
            decode_to_fit(data, max_pixels=LIMIT, longest=0)

    def test_load_to_fit_reads_a_file(self, tmp_path: Path) -> None:
        path = tmp_path / "photo.jpg"
        path.write_bytes(_jpeg(_smooth(4096, 3072)))
        out = load_to_fit(path, max_pixels=LIMIT, longest=1024)
        assert (out.width, out.height, out.pixels.shape) == (4096, 3072, (768, 1024, 3))


class TestWorkingImage:
    def test_a_sized_image_is_shrunk_to_the_size_of_its_photo(self) -> None:
        sized = decode_to_fit(_jpeg(_smooth(4032, 3024)), max_pixels=LIMIT, longest=1024)
        work = working_image(sized, DetectorSettings(max_side=1024))
        assert work.pixels.shape == (768, 1024, 3)
        assert work.scale == 1024 / 4032  # relates boxes to the photo, not to the reduced pixels
        assert work.upsample == 0

    def test_a_sized_image_at_full_size_is_shrunk_as_an_array_is(self) -> None:
        pixels = _smooth(1600, 1200)
        sized = working_image(SizedImage(pixels, 1600, 1200), DetectorSettings(max_side=1024))
        plain = working_image(pixels, DetectorSettings(max_side=1024))
        np.testing.assert_array_equal(sized.pixels, plain.pixels)
        assert (sized.scale, sized.upsample) == (plain.scale, plain.upsample)


class TestTooSmallFromTheHeader:
    """A photo that shrinks to a sliver the detector cannot take is refused from its header, as it would be after
    decoding: a 1 x 40,000,000 px PNG (155 kB) took 2.9 s and 830 MB to decode first."""

    def _png(self, width: int, height: int) -> bytes:
        out = io.BytesIO()
        PILImage.new("L", (width, height), 128).save(out, "PNG")
        return out.getvalue()

    def test_a_sliver_is_refused_before_it_is_decoded(self, settings: Settings) -> None:
        pipeline = Pipeline.from_settings(settings)
        data = self._png(1, 40_000_000)
        started = time.process_time()
        with pytest.raises(ImageTooSmall) as early:
            pipeline.decoder(data)()
        assert time.process_time() - started < 0.5
        # the refusal the detector's working copy gets after a whole decode, word for word
        with pytest.raises(ImageTooSmall) as late:
            working_image(np.zeros((40_000_000, 1, 3), np.uint8)[:, :, :], settings.detector)
        assert str(early.value) == str(late.value) and early.value.details == late.value.details
        assert early.value.details["shrunk_to"] == {"width": 1, "height": settings.detector.max_side}

    def test_a_photo_too_small_one_way_up_only_is_left_to_the_decode(self) -> None:
        # 8 px wide is too narrow (10 columns needed), yet turned by its EXIF orientation it would be 8 rows (7
        # needed): the orientation is not known from the header, so only the decoded photo can be judged.
        settings = DetectorSettings(max_side=1024, upsample=0)
        refuse_undetectable(8, 1000, settings)  # no refusal
        with pytest.raises(ImageTooSmall):
            refuse_undetectable(5, 1000, settings)  # too small either way
        with pytest.raises(ImageTooSmall):
            check_working_size(8, 1000, settings)
        check_working_size(1000, 8, settings)


@pytest.mark.model
def test_faces_of_a_phone_sized_jpeg_match_the_whole_decode(settings: Settings, dev_faces: Path) -> None:
    """A real face in a 12-megapixel JPEG: the service's loader (reduced decode) and a whole decode find the same
    face at the same place in the photo's own pixels, with nearly the same embedding."""
    pipeline = Pipeline.from_settings(settings)
    pipeline.load()
    source = decode_image((dev_faces / "barack_obama" / "face_recognition__obama3.jpg").read_bytes(), max_pixels=LIMIT)
    height, width = source.shape[:2]
    scale = max(4032 / width, 3024 / height)
    big = _shrunk(source, round(width * scale), round(height * scale))[:3024, :4032]
    data = _jpeg(np.ascontiguousarray(big))
    assert pipeline.decoder(data)().pixels.shape == (1512, 2016, 3)  # what the service's loader gives the detector
    reduced = pipeline.find_faces(pipeline.decoder(data))
    whole = pipeline.find_faces(decode_image(data, max_pixels=LIMIT))
    assert len(reduced) == len(whole) == 1
    assert reduced[0].box.iou(whole[0].box) > 0.9
    assert reduced[0].box.right > 1000  # in the 4032-px photo's coordinates, not the reduced copy's
    assert np.abs(reduced[0].landmarks - whole[0].landmarks).max() <= 8  # 4 px of the working copy
    assert float(np.sum((reduced[0].embedding - whole[0].embedding) ** 2)) < 0.01  # the threshold is 0.36
