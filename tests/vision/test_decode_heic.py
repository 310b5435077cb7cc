"""vision.decode with HEIC/HEIF (FACEGATE_IMAGE__HEIC, pi-heif's plugin): decoded like the other formats when enabled,
refused as today when not. The HEIC files are made here from a real dev photo with pillow-heif (the test extra's
encoder: pi-heif only decodes), never stored in the repository."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pi_heif
import pillow_heif
import pytest
from PIL import Image as PILImage

from app.config import ImageSettings, Settings
from app.errors import ImageTooLarge, InvalidImage, UnsupportedImage
from app.vision import decode
from app.vision.decode import decode_image, decode_to_fit, load_image, load_to_fit, media_type
from app.vision.pipeline import Pipeline

LIMIT = 10_000_000
PHOTO = "barack_obama/face_recognition__obama.jpg"  # 910 x 1137, one face
ORIENTATION = 0x0112


def _heic(im: PILImage.Image, **params: object) -> bytes:
    """`im` as HEIC (x265, 4:2:0, 8-bit unless the image is 16-bit)."""
    buf = io.BytesIO()
    pillow_heif.from_pillow(im).save(buf, **{"quality": 90, **params})
    return buf.getvalue()


def _png(im: PILImage.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **params)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = PILImage.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def _mad(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> float:
    """Mean absolute difference, in 8-bit levels."""
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _patched(data: bytes, box: bytes, skip: int, payload: bytes) -> bytes:
    """`data` with `payload` written `skip` bytes into the content of its first box of type `box` (ispe, a FullBox:
    4 bytes of version and flags, then width and height; irot and clap: their fields at once)."""
    at = data.index(box) + 4 + skip
    return data[:at] + payload + data[at + len(payload) :]


@pytest.fixture(scope="module")
def source(dev_faces: Path) -> npt.NDArray[np.uint8]:
    """The dev photo as facegate decodes it: what the HEIC files below are made of."""
    return load_image(dev_faces / PHOTO, max_pixels=LIMIT)


@pytest.fixture(scope="module")
def small(source: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The photo at 1/4 size, for the tests that encode many files."""
    return np.asarray(PILImage.fromarray(source).reduce(4))


@pytest.fixture(scope="module")
def heic(source: npt.NDArray[np.uint8]) -> bytes:
    return _heic(PILImage.fromarray(source))


class TestDecodes:
    def test_pixels_are_the_photos(self, heic: bytes, source: npt.NDArray[np.uint8], tmp_path: Path) -> None:
        """Every entry point: bytes and files, whole and `to_fit` (HEIF has no reduced scale: decoded whole)."""
        assert heic[4:12] == b"ftypheic"
        out = decode_image(heic, max_pixels=LIMIT, heic=True)
        assert out.dtype == np.uint8 and out.flags.c_contiguous and not out.flags.writeable
        assert _mad(out, source) < 1.5  # 8-bit HEVC at quality 90: ~0.5
        fit = decode_to_fit(heic, max_pixels=LIMIT, longest=300, heic=True)
        assert (fit.width, fit.height) == (910, 1137) and np.array_equal(fit.pixels, out)
        path = tmp_path / "photo.HEIC"
        path.write_bytes(heic)
        assert np.array_equal(load_image(path, max_pixels=LIMIT, heic=True), out)
        assert np.array_equal(load_to_fit(path, max_pixels=LIMIT, longest=300, heic=True).pixels, out)

    def test_an_iphone_like_grid_of_tiles(self, source: npt.NDArray[np.uint8]) -> None:
        """An iPhone stores its photo as a grid of 512 x 512 HEVC pictures, joined by the reader."""
        data = _heic(PILImage.fromarray(source), tile_size=512)
        assert b"grid" in data
        assert _mad(decode_image(data, max_pixels=LIMIT, heic=True), source) < 1.5

    @pytest.mark.parametrize("orientation", range(1, 9))
    def test_rotation_and_mirroring_are_applied_once(self, small: npt.NDArray[np.uint8], orientation: int) -> None:
        """As an iPhone writes it: the pixels as the sensor gave them, a rotation (irot) and/or mirroring (imir) for
        display, and the EXIF orientation that says the same. libheif applies the transform; the EXIF tag must not
        turn the photo again. The result is the same photo in PNG with that EXIF orientation, as facegate reads it."""
        stored = PILImage.fromarray(small)
        data = _heic(stored, exif=_exif(orientation))
        written = PILImage.Exif()
        written.load(pillow_heif.open_heif(io.BytesIO(data)).info["exif"])
        assert written[ORIENTATION] == orientation
        assert (b"irot" in data or b"imir" in data) == (orientation != 1)
        upright = decode_image(_png(stored, exif=_exif(orientation)), max_pixels=LIMIT)
        assert _mad(decode_image(data, max_pixels=LIMIT, heic=True), upright) < 2.0

    def test_exif_orientation_without_a_transform_is_not_applied(self, small: npt.NDArray[np.uint8]) -> None:
        """HEIF readers follow the file's transforms, not EXIF: a file whose EXIF says Orientation 6 but that has no
        rotation (its irot turned to 0 degrees) is shown as stored, as libheif and Apple's readers show it."""
        data = _heic(PILImage.fromarray(small), exif=_exif(6))
        data = _patched(data, b"irot", 0, b"\x00")
        assert _mad(decode_image(data, max_pixels=LIMIT, heic=True), small) < 2.0

    @pytest.mark.parametrize("bits", [10, 12])
    def test_high_bit_depth_gives_8_bit_rgb(
        self, small: npt.NDArray[np.uint8], bits: int, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(pillow_heif.options, "SAVE_HDR_TO_12_BIT", bits == 12)
        height, width = small.shape[:2]
        wide = small.astype(np.uint16) * 257  # 0..255 -> 0..65535
        buf = io.BytesIO()
        pillow_heif.from_bytes("RGB;16", (width, height), wide.tobytes()).save(buf, quality=95)
        data = buf.getvalue()
        assert pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=False).info["bit_depth"] == bits
        out = decode_image(data, max_pixels=LIMIT, heic=True)
        assert out.dtype == np.uint8 and out.shape == small.shape
        assert _mad(out, small) < 2.0

    def test_alpha_is_composited_on_white_as_for_png(self, small: npt.NDArray[np.uint8]) -> None:
        alpha = np.full(small.shape[:2], 255, np.uint8)
        alpha[:40, :40] = 0
        rgba = PILImage.fromarray(np.dstack([small, alpha]))
        out = decode_image(_heic(rgba, quality=95), max_pixels=LIMIT, heic=True)
        assert out.shape == small.shape
        assert (out[2:38, 2:38] >= 250).all()  # the transparent corner: white, not the colour under it
        assert _mad(out, decode_image(_png(rgba), max_pixels=LIMIT)) < 2.0

    def test_a_burst_gives_its_primary_image(self, small: npt.NDArray[np.uint8]) -> None:
        flipped, mirrored = np.ascontiguousarray(small[::-1]), np.ascontiguousarray(small[:, ::-1])
        burst = pillow_heif.HeifFile()
        for frame in (small, flipped, mirrored):
            burst.add_from_pillow(PILImage.fromarray(frame))
        buf = io.BytesIO()
        burst.save(buf, quality=90, primary_index=1)  # not the first image
        assert len(pillow_heif.open_heif(io.BytesIO(buf.getvalue()))) == 3
        out = decode_image(buf.getvalue(), max_pixels=LIMIT, heic=True)
        assert _mad(out, flipped) < 2.0 and _mad(out, small) > 20

    def test_a_heif_with_the_generic_brand(self, small: npt.NDArray[np.uint8]) -> None:
        """mif1 (a HEIF that does not name its codec) is also an AVIF brand: Pillow's AVIF reader, tried first, hands
        a HEVC-coded one on to pi-heif."""
        data = _heic(PILImage.fromarray(small))
        generic = data[:8] + b"mif1" + data[12:]
        assert _mad(decode_image(generic, max_pixels=LIMIT, heic=True), small) < 2.0

    def test_media_type_of_a_stored_heic(self, heic: bytes) -> None:
        """A photo kept by FACEGATE_STORE_IMAGES is served with its type, named from the brand (no parser runs)."""
        assert media_type(heic) == "image/heic"
        generic = heic[:8] + b"mif1" + heic[12:]  # the major brand of a HEIF that does not name its codec
        assert media_type(generic) == "image/heif"
        for brand in (b"hevm", b"hevs"):  # HEVC image sequences, multiview and scalable (23008-12 Annex C)
            other = heic[:8] + brand + heic[12:]
            assert media_type(other) == "image/heic-sequence"
            decoded = decode_image(other, max_pixels=LIMIT, heic=True)
            assert decoded.shape == decode_image(heic, max_pixels=LIMIT, heic=True).shape


    @pytest.mark.model
    def test_the_face_embeds_as_from_the_jpeg(self, settings: Settings, dev_faces: Path, heic: bytes) -> None:
        """Through the pipeline's decoder (FACEGATE_IMAGE__HEIC on): the face of the HEIC made from the JPEG is the
        JPEG's face, at a squared distance far under the 0.36 threshold (HEVC's loss is not a different person)."""
        pipeline = Pipeline.from_settings(settings.model_copy(update={"image": ImageSettings(heic=True)}))
        try:
            from_jpeg = pipeline.embed_photo(pipeline.decoder((dev_faces / PHOTO).read_bytes()))
            from_heic = pipeline.embed_photo(pipeline.decoder(heic))
        finally:
            pipeline.close()
        assert abs(from_heic.box.left - from_jpeg.box.left) <= 3 and abs(from_heic.box.top - from_jpeg.box.top) <= 3
        distance = float(np.sum((from_heic.embedding - from_jpeg.embedding) ** 2))
        assert distance < 0.01, distance


class TestRefuses:
    def test_off_it_is_refused_as_before(self, heic: bytes) -> None:
        """Without `heic`, 415 unsupported_image as before, and the message says how to enable it; also in a process
        where another caller enabled it (pi-heif's plugin is registered with Pillow for the whole process)."""
        decode_image(heic, max_pixels=LIMIT, heic=True)
        for call in (
            lambda: decode_image(heic, max_pixels=LIMIT),
            lambda: decode_to_fit(heic, max_pixels=LIMIT, longest=300),
        ):
            with pytest.raises(UnsupportedImage) as info:
                call()
            assert info.value.details == {"format": "HEIF/HEIC"}
            assert "FACEGATE_IMAGE__HEIC=true" in info.value.message and "extra" not in info.value.message

    def test_without_pi_heif_the_message_names_the_extra(self, heic: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(decode, "_heif_installed", lambda: False)
        with pytest.raises(UnsupportedImage, match=r"FACEGATE_IMAGE__HEIC=true and facegate's `heic` extra"):
            decode_image(heic, max_pixels=LIMIT)

    def test_libheif_is_loaded_only_once_enabled(self, heic: bytes, tmp_path: Path) -> None:
        """Pillow's plugin registry is the process's: until a caller enables HEIC, nothing of pi-heif is imported or
        registered (a process with the setting off is as before); the first call that enables it registers it."""
        (tmp_path / "photo.heic").write_bytes(heic)
        script = (
            "import pathlib, sys\nfrom PIL import Image\nfrom app.vision.decode import decode_image\n"
            "data = pathlib.Path(sys.argv[1]).read_bytes()\n"
            "try:\n    decode_image(data, max_pixels=10_000_000)\n"
            "except Exception as e:\n    print(type(e).__name__, e.details)\n"
            "print('pi_heif' in sys.modules, 'HEIF' in Image.OPEN)\n"
            "print(decode_image(data, max_pixels=10_000_000, heic=True).shape)\n"
            "print('pi_heif' in sys.modules, 'HEIF' in Image.OPEN)\n"
        )
        command = [sys.executable, "-c", script, str(tmp_path / "photo.heic")]
        run = subprocess.run(command, capture_output=True, check=True)
        assert run.stdout.decode().splitlines() == [
            "UnsupportedImage {'format': 'HEIF/HEIC'}",
            "False False",
            "(1137, 910, 3)",
            "True True",
        ]

    def test_the_pixel_limit_is_checked_before_decoding(self, heic: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
        """As for the other formats, from the header: libheif never decodes a HEIC over the limit, however small its
        file (a 7 kB HEIC of one colour decodes to 32 megapixels, 235 MB)."""

        def no_decoding(self: object) -> None:
            raise AssertionError("decoded")

        monkeypatch.setattr(pi_heif.HeifImageFile, "load", no_decoding)
        with pytest.raises(ImageTooLarge) as info:
            decode_image(heic, max_pixels=910 * 1137 - 1, heic=True)
        assert info.value.details == {"width": 910, "height": 1137, "max_pixels": 910 * 1137 - 1}
        # A header that claims a larger picture (in a file without a crop, whose size is the picture's: ispe)
        uncropped = _heic(PILImage.new("RGB", (640, 480), (90, 120, 150)))
        claims = _patched(uncropped, b"ispe", 4, struct.pack(">II", 5000, 4000))
        with pytest.raises(ImageTooLarge) as info:
            decode_image(claims, max_pixels=LIMIT, heic=True)
        assert info.value.details == {"width": 5000, "height": 4000, "max_pixels": LIMIT}
        bomb = _patched(uncropped, b"ispe", 4, struct.pack(">II", 30000, 30000))
        with pytest.raises(ImageTooLarge):  # over Pillow's own bomb limit too
            decode_image(bomb, max_pixels=LIMIT, heic=True)

    @pytest.mark.parametrize(
        ("size", "box", "skip", "payload"),
        [
            # a header that understates the coded picture's size
            pytest.param((640, 480), b"ispe", 4, struct.pack(">II", 64, 48), id="image-size"),
            # a crop (clean aperture) that hides most of it: the size reported is the crop's
            pytest.param((1023, 767), b"clap", 0, struct.pack(">iiii", 64, 1, 48, 1), id="clean-aperture"),
        ],
    )
    def test_a_header_that_hides_a_larger_picture_is_refused_undecoded(
        self, size: tuple[int, int], box: bytes, skip: int, payload: bytes
    ) -> None:
        """The limit is checked on the size the header reports; libheif refuses to decode more than that (plus a
        margin for coding blocks) before decoding anything, so a small-looking HEIC cannot hide a large picture."""
        data = _patched(_heic(PILImage.new("RGB", size, (90, 120, 150))), box, skip, payload)
        start = time.process_time()
        with pytest.raises(InvalidImage):
            decode_image(data, max_pixels=64 * 48, heic=True)
        assert time.process_time() - start < 0.1

    @pytest.mark.parametrize(
        "damage",
        [
            pytest.param(lambda data: data[:40], id="cut-in-its-header"),
            pytest.param(lambda data: data[: len(data) // 3], id="cut-in-the-metadata"),
            pytest.param(lambda data: data[: len(data) * 2 // 3], id="cut-in-the-picture"),
            pytest.param(lambda data: data[: len(data) - 100], id="its-last-bytes-cut"),
            pytest.param(lambda data: data.replace(b"iloc", b"xloc", 1), id="no-item-locations"),
            pytest.param(
                lambda data: data[: data.index(b"mdat") + 4] + bytes(len(data) - data.index(b"mdat") - 4),
                id="picture-zeroed",
            ),
            pytest.param(
                lambda data: data[: data.index(b"mdat") + 4]
                + np.random.default_rng(0).integers(0, 256, len(data) - data.index(b"mdat") - 4, np.uint8).tobytes(),
                id="picture-noise",
            ),
        ],
    )
    def test_truncated_or_corrupt_is_invalid_image(self, heic: bytes, damage: Callable[[bytes], bytes]) -> None:
        with pytest.raises(InvalidImage):
            decode_image(damage(heic), max_pixels=LIMIT, heic=True)
