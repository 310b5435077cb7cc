"""vision.decode: bytes -> upright H x W x 3 uint8 RGB, with every failure typed. Synthetic images only."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import GifImagePlugin
from PIL import Image as PILImage

from app.errors import ImageTooLarge, InvalidImage
from app.vision.decode import decode_image, load_image

LIMIT = 10_000_000


def _encode(im: PILImage.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _marked_rgb(h: int = 40, w: int = 60) -> np.ndarray:
    """Black, with a red block in the top-left corner (10 rows x 20 columns) and a green last column."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:10, :20] = (255, 0, 0)
    img[:, -1] = (0, 255, 0)
    return img


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _check_array(a: np.ndarray, shape: tuple[int, int]) -> None:
    assert a.dtype == np.uint8 and a.shape == shape + (3,) and a.flags.c_contiguous


class TestFormatsAndModes:
    def test_rgb_png_is_lossless(self) -> None:
        img = _marked_rgb()
        out = decode_image(_encode(PILImage.fromarray(img), "PNG"), max_pixels=LIMIT)
        _check_array(out, (40, 60))
        assert np.array_equal(out, img)

    @pytest.mark.parametrize(
        ("orientation", "shape", "red_corner"),
        [
            # the inside of the red block (JPEG rings at its edges), as a viewer shows the photo
            (1, (40, 60), (slice(2, 8), slice(2, 18))),
            (3, (40, 60), (slice(32, 38), slice(42, 58))),  # rotated 180
            (6, (60, 40), (slice(2, 18), slice(32, 38))),  # rotated 90 clockwise for display
            (8, (60, 40), (slice(42, 58), slice(2, 8))),  # rotated 90 counter-clockwise
        ],
    )
    def test_exif_orientation_is_applied(
        self, orientation: int, shape: tuple[int, int], red_corner: tuple[slice, slice]
    ) -> None:
        im = PILImage.fromarray(_marked_rgb())
        exif = im.getexif()
        exif[0x0112] = orientation
        out = decode_image(_encode(im, "JPEG", exif=exif.tobytes(), quality=95), max_pixels=LIMIT)
        _check_array(out, shape)
        block = out[red_corner].astype(int)
        assert (block[..., 0] > 200).all() and (block[..., 1:] < 60).all()
        red = (out[..., 0] > 200) & (out[..., 1] < 60)
        assert abs(int(red.sum()) - 200) < 30  # the block moved, nothing else turned red

    def test_cmyk_jpeg(self) -> None:
        cmyk = PILImage.fromarray(_marked_rgb()).convert("CMYK")
        data = _encode(cmyk, "JPEG", quality=95)
        assert PILImage.open(io.BytesIO(data)).mode == "CMYK"
        out = decode_image(data, max_pixels=LIMIT)
        _check_array(out, (40, 60))
        assert (out[2:8, 2:18, 0] > 230).all() and (out[2:8, 2:18, 1:] < 30).all()
        assert (out[20:, 5:50] < 25).all()

    def test_sixteen_bit_png_is_scaled_not_clipped(self) -> None:
        ramp = np.linspace(0, 65535, 64 * 16).round().astype(np.uint16).reshape(16, 64)
        data = _encode(PILImage.fromarray(ramp), "PNG")
        assert PILImage.open(io.BytesIO(data)).mode.startswith("I;16")
        out = decode_image(data, max_pixels=LIMIT)
        _check_array(out, (16, 64))
        expected = np.floor(ramp / 257 + 0.5).astype(np.uint8)
        assert np.array_equal(out[..., 0], expected)
        assert np.array_equal(out[..., 0], out[..., 2])
        assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 200  # full range kept

    def test_palette_with_transparency_is_composited_on_white(self) -> None:
        pal = PILImage.new("P", (30, 20), 0)
        pal.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)  # index 0 black (transparent), 1 red-ish
        pal.paste(1, (0, 0, 10, 20))
        data = _encode(pal, "PNG", transparency=0)
        out = decode_image(data, max_pixels=LIMIT)
        _check_array(out, (20, 30))
        assert (out[:, :10] == (200, 30, 40)).all()
        assert (out[:, 10:] == 255).all()  # transparent black -> white

    def test_greyscale_with_alpha(self) -> None:
        grey = np.full((12, 16), 100, np.uint8)
        alpha = np.zeros((12, 16), np.uint8)
        alpha[:, :8] = 255
        alpha[:, 8:12] = 128
        out = decode_image(_encode(PILImage.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"), max_pixels=LIMIT)
        _check_array(out, (12, 16))
        assert (out[:, :8] == 100).all()  # opaque: unchanged
        assert (out[:, 8:12] == (100 * 128 + 255 * 127 + 127) // 255).all()  # half: blended with white
        assert (out[:, 12:] == 255).all()  # transparent: white

    def test_rgba_png(self) -> None:
        rgba = np.zeros((10, 10, 4), np.uint8)
        rgba[..., 0] = 50
        rgba[:5, :, 3] = 255
        out = decode_image(_encode(PILImage.fromarray(rgba, "RGBA"), "PNG"), max_pixels=LIMIT)
        assert (out[:5] == (50, 0, 0)).all() and (out[5:] == 255).all()

    @pytest.mark.parametrize("mode", ["L", "1"])
    def test_greyscale_and_bilevel(self, mode: str) -> None:
        grey = np.zeros((10, 20), np.uint8)
        grey[:, 10:] = 255
        im = PILImage.fromarray(grey).convert(mode)
        out = decode_image(_encode(im, "PNG"), max_pixels=LIMIT)
        _check_array(out, (10, 20))
        assert (out[:, :10] == 0).all() and (out[:, 10:] == 255).all()

    def test_animated_gif_gives_the_first_frame(self) -> None:
        frames = [PILImage.new("RGB", (30, 20), colour) for colour in ("red", "blue", "green")]
        buf = io.BytesIO()
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
        gif = PILImage.open(io.BytesIO(buf.getvalue()))
        assert isinstance(gif, GifImagePlugin.GifImageFile) and gif.n_frames == 3
        out = decode_image(buf.getvalue(), max_pixels=LIMIT)
        _check_array(out, (20, 30))
        assert (out == (255, 0, 0)).all()

    def test_load_image_reads_a_file(self, tmp_path: Path) -> None:
        path = tmp_path / "photo.png"
        img = _marked_rgb()
        path.write_bytes(_encode(PILImage.fromarray(img), "PNG"))
        assert np.array_equal(load_image(path, max_pixels=LIMIT), img)
        empty = tmp_path / "empty.jpg"
        empty.write_bytes(b"")
        with pytest.raises(InvalidImage):
            load_image(empty, max_pixels=LIMIT)


class TestRefusals:
    def test_empty(self) -> None:
        with pytest.raises(InvalidImage, match="empty"):
            decode_image(b"", max_pixels=LIMIT)

    @pytest.mark.parametrize("data", [b"hello, not an image", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff" + b"\x00" * 50])
    def test_not_an_image(self, data: bytes) -> None:
        with pytest.raises(InvalidImage):
            decode_image(data, max_pixels=LIMIT)

    @pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
    @pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
    def test_truncated(self, fmt: str, keep: float) -> None:
        noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)  # does not compress away
        data = _encode(PILImage.fromarray(noise), fmt)
        with pytest.raises(InvalidImage):
            decode_image(data[: int(len(data) * keep)], max_pixels=LIMIT)

    def test_header_claiming_a_huge_image_is_refused_without_allocating(self) -> None:
        tracemalloc.start()
        try:
            with pytest.raises(ImageTooLarge):
                decode_image(_png_header_only(30000, 30000), max_pixels=LIMIT)
            # below Pillow's own bomb limit, our limit refuses it from the header alone
            with pytest.raises(ImageTooLarge) as info:
                decode_image(_png_header_only(5000, 4000), max_pixels=LIMIT)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 5_000_000  # 30000 x 30000 x 3 would be 2.7 GB
        assert info.value.details["width"] == 5000 and info.value.details["height"] == 4000

    def test_max_pixels_is_respected(self) -> None:
        data = _encode(PILImage.new("RGB", (100, 50), "white"), "PNG")
        assert decode_image(data, max_pixels=5000).shape == (50, 100, 3)
        with pytest.raises(ImageTooLarge):
            decode_image(data, max_pixels=4999)
