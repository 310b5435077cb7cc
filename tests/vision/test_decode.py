"""vision.decode: bytes -> upright H x W x 3 uint8 RGB, with every failure typed. Synthetic images only."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import GifImagePlugin
from PIL import Image as PILImage

from app.errors import ImageTooLarge, InvalidImage, UnsupportedImage
from app.vision.decode import (
    MAX_GIF_BLOCKS,
    MAX_JPEG_JUNK,
    MAX_JPEG_MARKERS,
    MAX_JPEG_SCANS,
    MAX_PNG_CHUNKS,
    MAX_PNG_INFLATED_CHUNKS,
    MAX_RLE_BMP_BYTES,
    MAX_RLE_BMP_PIXELS,
    MAX_TIFF_PARTS,
    decode_image,
    load_image,
)
from tests.hostile_cases import (
    bigtiff_grey,
    exif_with_a_rational,
    png_chunk,
    progressive_jpeg,
    rle_bmp,
    tiff_from_tags,
    tiff_in_strips,
    tiff_of,
    tiff_with_a_huge_tile,
)

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


def refused_at_once(data: bytes, match: str, max_pixels: int = LIMIT) -> InvalidImage:
    """The InvalidImage decoding `data` raises, checked to come before any costly work (under 0.5 s of CPU)."""
    start = time.process_time()
    with pytest.raises(InvalidImage, match=match) as info:
        decode_image(data, max_pixels=max_pixels)
    assert time.process_time() - start < 0.5
    return info.value


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

    def test_sixteen_bit_grey_with_a_transparent_value_is_composited_on_white(self) -> None:
        """A 16-bit grey PNG's tRNS names one grey value transparent: it decoded black (the 8-bit one white)."""
        grey = np.full((6, 8), 1000, np.uint16)
        grey[:, 5:] = 0
        out = decode_image(_encode(PILImage.fromarray(grey), "PNG", transparency=0), max_pixels=LIMIT)
        _check_array(out, (6, 8))
        assert (out[:, :5] == round(1000 / 257)).all()  # opaque: scaled to 8 bits
        assert (out[:, 5:] == 255).all()  # transparent: white

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

    @pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
    @pytest.mark.parametrize("tag", [0x010E, 0x0156])  # ImageDescription (text), TransferRange (numbers)
    def test_orientation_is_applied_when_another_exif_tag_is_malformed(self, fmt: str, tag: int) -> None:
        """A sideways phone photo with junk elsewhere in its EXIF still comes out upright (Orientation 6)."""
        params: dict[str, object] = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
        data = _encode(PILImage.fromarray(_marked_rgb()), fmt, exif=exif_with_a_rational(tag, 6), **params)
        out = decode_image(data, max_pixels=LIMIT)
        _check_array(out, (60, 40))
        block = out[2:18, 32:38].astype(int)  # the red block, turned 90 degrees clockwise for display
        assert (block[..., 0] > 200).all() and (block[..., 1:] < 60).all()

    def test_unreadable_exif_keeps_the_stored_pixels(self) -> None:
        img = _marked_rgb()
        data = _encode(PILImage.fromarray(img), "PNG", exif=b"Exif\x00\x00not a TIFF header")
        assert np.array_equal(decode_image(data, max_pixels=LIMIT), img)

    def test_progressive_jpeg_with_up_to_the_scan_limit(self) -> None:
        out = decode_image(progressive_jpeg(64, 48, MAX_JPEG_SCANS), max_pixels=LIMIT)
        _check_array(out, (48, 64))
        assert (out == 128).all()

    def test_scans_outside_the_first_picture_are_not_counted(self) -> None:
        """An EXIF thumbnail (a JPEG inside an APP1 segment) and data after the picture's end (an MPO's other pictures,
        a phone's motion-photo video) are not decoded, so their scans do not count."""
        im = PILImage.fromarray(_marked_rgb())
        many_scans = progressive_jpeg(8, 8, 3 * MAX_JPEG_SCANS)
        plain = decode_image(_encode(im, "JPEG", quality=95), max_pixels=LIMIT)
        for data in (
            _encode(im, "JPEG", quality=95, exif=b"Exif\x00\x00" + many_scans),
            _encode(im, "JPEG", quality=95) + many_scans,
        ):
            assert np.array_equal(decode_image(data, max_pixels=LIMIT), plain)

    def test_jpeg_with_a_few_fill_bytes_and_comments(self) -> None:
        jpeg = _encode(PILImage.fromarray(_marked_rgb()), "JPEG", quality=95)
        padded = jpeg[:2] + b"\xff" * 16 + b"\xff\xfe\x00\x05hi!" * 100 + jpeg[2:]
        assert np.array_equal(decode_image(padded, max_pixels=LIMIT), decode_image(jpeg, max_pixels=LIMIT))

    def test_smallrle_bmp(self) -> None:
        rle8_row = b"\x0a\xff" + b"\x14\x00" + b"\x00\x00"  # 10 pixels of index 255, 20 of index 0, end of line
        out = decode_image(rle_bmp(30, 20, rle8_row * 20 + b"\x00\x01", bits=8), max_pixels=LIMIT)
        _check_array(out, (20, 30))
        assert (out[:, :10] == 255).all() and (out[:, 10:] == 0).all()
        rle4_row = b"\x0a\xff" + b"\x14\x00" + b"\x00\x00"  # index 15 (white) twice per byte, then black
        out = decode_image(rle_bmp(30, 20, rle4_row * 20 + b"\x00\x01", bits=4), max_pixels=LIMIT)
        assert (out[:, :10] == 255).all() and (out[:, 10:] == 0).all()

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

    def test_a_header_over_pillows_own_limit_is_refused_in_facegates_terms(self) -> None:
        """Pillow refuses 30000 x 30000 itself (DecompressionBombError); its message named Pillow's limit
        (178,956,970 pixels), not the one the client is held to, and details.max_pixels did not say the effective
        limit either."""
        with pytest.raises(ImageTooLarge) as info:
            decode_image(_png_header_only(30000, 30000), max_pixels=LIMIT)
        message = str(info.value)
        assert f"{LIMIT:,}" in message and "900,000,000 pixels" in message
        assert str(PILImage.MAX_IMAGE_PIXELS) not in message.replace(",", "")
        assert info.value.details["max_pixels"] == LIMIT
        with pytest.raises(ImageTooLarge) as info:  # a limit above Pillow's: Pillow's is the effective one
            decode_image(_png_header_only(30000, 30000), max_pixels=10**12)
        assert info.value.details["max_pixels"] == PILImage.MAX_IMAGE_PIXELS

    def test_refusals_log_no_pillow_warnings(self, tmp_path: Path) -> None:
        """Between Pillow's MAX_IMAGE_PIXELS and twice that, Pillow only warns (facegate refuses), and it warns of a
        TIFF directory cut short (facegate refuses it as corrupt): lines in the server's log for refused uploads, so
        not given. In a fresh interpreter, as a server imports the module (pytest resets the warning filters set
        while it collects the tests)."""
        bomb_limit = PILImage.MAX_IMAGE_PIXELS
        assert bomb_limit is not None
        side = int(bomb_limit**0.5) + 10  # 89.5 M pixels: over the limit, under twice it
        (tmp_path / "big.png").write_bytes(_png_header_only(side, side))
        (tmp_path / "cut.tif").write_bytes(tiff_of(3, 8, 1)[:20])
        script = (
            "import pathlib, sys\nfrom app.vision.decode import decode_image\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n        decode_image(pathlib.Path(path).read_bytes(), max_pixels=200_000_000)\n"
            "    except Exception as e:\n        print(type(e).__name__)\n"
        )
        paths = [str(tmp_path / "big.png"), str(tmp_path / "cut.tif")]
        run = subprocess.run([sys.executable, "-W", "default", "-c", script, *paths], capture_output=True, check=True)
        assert run.stdout.decode().split() == ["ImageTooLarge", "InvalidImage"]
        assert run.stderr.decode() == ""

    def test_max_pixels_is_respected(self) -> None:
        data = _encode(PILImage.new("RGB", (100, 50), "white"), "PNG")
        assert decode_image(data, max_pixels=5000).shape == (50, 100, 3)
        with pytest.raises(ImageTooLarge):
            decode_image(data, max_pixels=4999)

    def test_corrupt_avif(self) -> None:
        avif = _encode(PILImage.fromarray(_marked_rgb()), "AVIF", quality=90)
        coded = avif.index(b"mdat") + 4
        for bad in (
            avif[:coded] + bytes(len(avif) - coded),  # the coded picture zeroed: libavif cannot decode it
            avif.replace(b"iloc", b"xloc", 1),  # no item locations: the primary image is missing
        ):
            with pytest.raises(InvalidImage):
                decode_image(bad, max_pixels=LIMIT)

    def test_jpeg_with_too_many_scans_is_refused_before_decoding(self) -> None:
        with pytest.raises(InvalidImage, match=f"more than {MAX_JPEG_SCANS} scans") as info:
            decode_image(progressive_jpeg(64, 48, MAX_JPEG_SCANS + 1), max_pixels=LIMIT)
        assert info.value.details == {"max_scans": MAX_JPEG_SCANS}
        # the audit's bomb: 36 megapixels and 10,000 scans in 670 kB took 50 s of CPU to decode
        bomb = progressive_jpeg(6000, 6000, 10_000)
        start = time.process_time()
        with pytest.raises(InvalidImage, match="scans"):
            decode_image(bomb, max_pixels=40_000_000)
        assert time.process_time() - start < 0.5

    def test_jpeg_with_too_many_markers_or_too_much_padding_is_refused(self) -> None:
        """Pillow walks a JPEG's header in Python, marker by marker and junk byte by junk byte: 5 million empty comment
        segments took 6 s, 20 MB of fill bytes 10 s; 20 MB of fill bytes after the scan data took 5 s to decode."""
        jpeg = _encode(PILImage.fromarray(_marked_rgb()), "JPEG", quality=95)
        with pytest.raises(InvalidImage, match="markers") as info:
            decode_image(jpeg[:2] + b"\xff\xfe\x00\x02" * MAX_JPEG_MARKERS + jpeg[2:], max_pixels=LIMIT)
        assert info.value.details == {"max_markers": MAX_JPEG_MARKERS}
        after_app0 = 4 + int.from_bytes(jpeg[4:6], "big")  # the end of the first segment
        for junk in (b"\xff", b"\x00"):  # fill bytes, anything else
            with pytest.raises(InvalidImage, match="junk"):
                padded = jpeg[:after_app0] + junk * (MAX_JPEG_JUNK + 1) + jpeg[after_app0:]
                decode_image(padded, max_pixels=LIMIT)
        start = time.process_time()
        with pytest.raises(InvalidImage):
            decode_image(jpeg[:2] + b"\xff" * 20_000_000 + jpeg[2:], max_pixels=LIMIT)
        assert time.process_time() - start < 0.5
        # fill bytes in or after the scan data: a few are fine, a long run is refused
        eoi = jpeg.rindex(b"\xff\xd9")
        stuffed = jpeg.index(b"\xff\x00", jpeg.index(b"\xff\xda"))  # an 0xFF of the scan data
        assert np.array_equal(
            decode_image(jpeg[:eoi] + b"\xff" * 16 + jpeg[eoi:], max_pixels=LIMIT), decode_image(jpeg, max_pixels=LIMIT)
        )
        for at in (eoi, stuffed):
            with pytest.raises(InvalidImage, match="fill bytes"):
                decode_image(jpeg[:at] + b"\xff" * (MAX_JPEG_JUNK + 1) + jpeg[at:], max_pixels=LIMIT)

    def test_png_with_too_many_chunks_is_refused_before_decoding(self) -> None:
        """Pillow reads a PNG's chunks one by one in Python: 1.6 million empty ones (19 MB) took 5-6 s."""
        png = _encode(PILImage.fromarray(_marked_rgb()), "PNG")
        assert png.count(b"IDAT") == 1  # IHDR, IDAT, IEND: 3 chunks

        def with_extra(count: int) -> bytes:
            return png[:33] + png_chunk(b"zzZz", b"") * count + png[33:]

        expected = decode_image(png, max_pixels=LIMIT)
        assert np.array_equal(decode_image(with_extra(MAX_PNG_CHUNKS - 3), max_pixels=LIMIT), expected)
        with pytest.raises(InvalidImage, match="chunks") as info:
            decode_image(with_extra(MAX_PNG_CHUNKS - 2), max_pixels=LIMIT)
        assert info.value.details == {"max_chunks": MAX_PNG_CHUNKS}
        bomb = with_extra(1_600_000)
        start = time.process_time()
        with pytest.raises(InvalidImage, match="chunks"):
            decode_image(bomb, max_pixels=LIMIT)
        assert time.process_time() - start < 0.5
        # chunks after IEND are not the image's: not counted
        assert np.array_equal(decode_image(png + png_chunk(b"zzZz", b"") * MAX_PNG_CHUNKS, max_pixels=LIMIT), expected)

    def test_gif_with_too_many_blocks_before_its_image(self) -> None:
        """Pillow reads a GIF's extensions in Python: 9 MB of empty comment extensions, or of 1-byte comment
        sub-blocks, took 0.9 s and were accepted."""
        gif = _encode(PILImage.fromarray(_marked_rgb()).convert("P"), "GIF")
        first = 13 + (3 << ((gif[10] & 7) + 1))  # after the header, screen descriptor and global palette
        assert gif[first] in (0x21, 0x2C)  # an extension or the image descriptor
        expected = decode_image(gif, max_pixels=LIMIT)

        def with_comments(extensions: int, sub_blocks: int = 0) -> bytes:
            comments = b"\x21\xfe" + b"\x01x" * sub_blocks + b"\x00"
            return gif[:first] + comments * extensions + gif[first:]

        assert np.array_equal(decode_image(with_comments(MAX_GIF_BLOCKS), max_pixels=LIMIT), expected)
        assert np.array_equal(decode_image(with_comments(1, MAX_GIF_BLOCKS - 1), max_pixels=LIMIT), expected)
        for bomb in (with_comments(MAX_GIF_BLOCKS + 1), with_comments(1, MAX_GIF_BLOCKS), with_comments(3_000_000)):
            start = time.process_time()
            with pytest.raises(InvalidImage, match="extension blocks") as info:
                decode_image(bomb, max_pixels=LIMIT)
            assert time.process_time() - start < 0.5
            assert info.value.details == {"max_blocks": MAX_GIF_BLOCKS}
        # blocks after the first image are not read to decode it: not counted
        many_after = gif[:-1] + b"\x21\xfe\x00" * (2 * MAX_GIF_BLOCKS) + gif[-1:]
        assert np.array_equal(decode_image(many_after, max_pixels=LIMIT), expected)

    def test_png_with_too_many_compressed_metadata_chunks(self) -> None:
        """Pillow inflates each ICC profile, zTXt and iTXt chunk (up to 1 MiB), and its 64 MB cap on text leaves out
        profiles, a zTXt without a keyword and an iTXt that is not UTF-8: 19,000 of 1 kB (20 MB) took 52 s."""
        png = _encode(PILImage.fromarray(_marked_rgb()), "PNG")
        expected = decode_image(png, max_pixels=LIMIT)
        inflating = zlib.compress(bytes(1 << 20), 9)
        chunks = [
            png_chunk(b"iCCP", b"icc\0\0" + inflating),
            png_chunk(b"zTXt", b"\0\0" + inflating),  # no keyword
            png_chunk(b"iTXt", b"k\0\1\0\0\0" + zlib.compress(b"\xff" * (1 << 20), 9)),  # not UTF-8
        ]

        def with_metadata(count: int) -> bytes:
            return png[:33] + b"".join(chunks[i % 3] for i in range(count)) + png[33:]

        assert np.array_equal(decode_image(with_metadata(MAX_PNG_INFLATED_CHUNKS), max_pixels=LIMIT), expected)
        for count in (MAX_PNG_INFLATED_CHUNKS + 1, 19_000):
            refused = refused_at_once(with_metadata(count), "compressed metadata")
            assert refused.details == {"max_metadata_chunks": MAX_PNG_INFLATED_CHUNKS}

    def test_tiff_in_too_many_strips_is_refused_before_it_is_opened(self) -> None:
        """Pillow makes a Python tile of each uncompressed strip as it opens a TIFF: 2.4 million one-row strips
        (19 MB) took 4.8 s to open, 23 s and 890 MB in all, and were accepted."""
        assert decode_image(tiff_in_strips(MAX_TIFF_PARTS), max_pixels=LIMIT).shape == (MAX_TIFF_PARTS, 1, 3)
        for rows in (MAX_TIFF_PARTS + 1, 2_400_000):
            assert refused_at_once(tiff_in_strips(rows), "strips or tiles").details == {"max_parts": MAX_TIFF_PARTS}

    def test_tiff_tiles_larger_than_an_image_may_be_are_refused(self) -> None:
        """libtiff allocates a whole tile to decode it: 206 bytes declaring one 32768 x 16368 tile took 2.1 GB."""
        pixels = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)

        def tiled(side: int) -> bytes:  # 16 x 16 RGB, uncompressed, in one tile of side x side (a multiple of 16)
            tile = np.zeros((side, side, 3), np.uint8)
            tile[:16, :16] = pixels
            at = 8 + 2 + 12 * 10 + 4 + 6  # after the directory and BitsPerSample's three values
            return tiff_from_tags(
                {256: (3, [16]), 257: (3, [16]), 258: (3, [8, 8, 8]), 259: (3, [1]), 262: (3, [2]), 277: (3, [3]),
                 322: (3, [side]), 323: (3, [side]), 324: (4, [at]), 325: (4, [tile.size])},  # fmt: skip
                tile.tobytes(),
            )

        assert np.array_equal(decode_image(tiled(16), max_pixels=LIMIT), pixels)
        assert np.array_equal(decode_image(tiled(256), max_pixels=LIMIT), pixels)  # a tile larger than the image
        refused_at_once(tiff_with_a_huge_tile(), "tiles are 32768x16368")
        refused_at_once(tiled(4096), "tiles are 4096x4096", max_pixels=4096 * 4096 - 1)

    def test_bigtiff_is_read_through_its_own_directory_layout(self) -> None:
        image = _marked_rgb()
        data = _encode(PILImage.fromarray(image), "TIFF", big_tiff=True)
        assert data.startswith(b"II+\x00")
        assert np.array_equal(decode_image(data, max_pixels=LIMIT), image)

    @pytest.mark.parametrize("tag", [273, 34665], ids=["strip", "exif-directory"])
    @pytest.mark.parametrize("offset", [2**63, 2**64 - 1])
    def test_bigtiff_offsets_beyond_what_a_file_can_hold_are_invalid(self, tag: int, offset: int) -> None:
        """BigTIFF offsets are 8 bytes and Pillow seeks to them as they are: one at 2**63 or beyond raised
        OverflowError, which reached the API as a 500 (an unexpected error) instead of invalid_image."""
        assert decode_image(bigtiff_grey(), max_pixels=LIMIT).shape == (4, 4, 3)
        with pytest.raises(InvalidImage):
            decode_image(bigtiff_grey(**{f"t{tag}": offset}), max_pixels=LIMIT)

    def test_large_rle_bmp_is_refused_before_decoding(self) -> None:
        """Pillow decodes RLE BMP in a Python loop: 6000 x 6000 RLE4 in 300 kB took 3 s, and 20 MB of codes that draw
        nothing 5 s on a 16 x 16 image."""
        side = 1415  # just over MAX_RLE_BMP_PIXELS (2 M)
        row = b"".join(bytes([min(254, side - x), 0x12]) for x in range(0, side, 254)) + b"\x00\x00"
        with pytest.raises(ImageTooLarge, match="RLE4") as info:
            decode_image(rle_bmp(side, side, row * side + b"\x00\x01", bits=4), max_pixels=LIMIT)
        assert info.value.details["max_pixels"] == MAX_RLE_BMP_PIXELS
        moves = b"\x00\x02\x00\x00" * (MAX_RLE_BMP_BYTES // 4)  # "move by 0, 0", over and over
        with pytest.raises(ImageTooLarge, match="RLE8"):
            decode_image(rle_bmp(16, 16, moves + b"\x00\x01", bits=8), max_pixels=LIMIT)
        # the limit is RLE's: an uncompressed BMP of as many pixels decodes
        big = _encode(PILImage.new("RGB", (side, side), (10, 20, 30)), "BMP")
        assert decode_image(big, max_pixels=LIMIT).shape == (side, side, 3)


class TestOtherFormats:
    """Formats outside the allow-list are named (415 unsupported_image, details.format as Pillow names them) from
    their first bytes, without running their parsers; data that is no image format stays invalid_image."""

    @pytest.mark.parametrize(
        ("fmt", "mode", "params"),
        [
            ("BLP", "P", {}),
            ("DDS", "RGB", {}),
            ("EPS", "RGB", {}),
            ("ICNS", "RGB", {}),
            ("ICO", "RGB", {}),
            ("JPEG2000", "RGB", {}),
            ("JPEG2000", "RGB", {"no_jp2": True}),  # a bare codestream
            ("MSP", "1", {}),
            ("PCX", "RGB", {}),
            ("PPM", "RGB", {}),
            ("PPM", "L", {}),
            ("PPM", "1", {}),
            ("PPM", "F", {}),  # PFM
            ("QOI", "RGB", {}),
            ("SGI", "RGB", {}),
            ("TGA", "RGB", {}),
            ("TGA", "L", {"compression": "tga_rle"}),
            ("XBM", "1", {}),
        ],
    )
    def test_formats_pillow_writes(self, fmt: str, mode: str, params: dict[str, object]) -> None:
        data = _encode(PILImage.new(mode, (24, 16)), fmt, **params)
        with pytest.raises(UnsupportedImage) as info:
            decode_image(data, max_pixels=LIMIT)
        assert info.value.details == {"format": PILImage.open(io.BytesIO(data)).format}

    @pytest.mark.parametrize(
        ("name", "data"),
        [
            pytest.param("HEIF/HEIC", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), id="heic"),
            pytest.param("JPEG XL", b"\xff\x0a" + bytes(64), id="jxl-codestream"),
            pytest.param("JPEG XL", b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(64), id="jxl-container"),
            pytest.param("PSD", b"8BPS\x00\x01" + bytes(64), id="psd"),
            pytest.param("EPS", b"\xc5\xd0\xd3\xc6" + bytes(64), id="eps-dos-binary"),  # DOS EPS binary header
            pytest.param("SUN", b"\x59\xa6\x6a\x95" + bytes(64), id="sun-raster"),
            pytest.param("FITS", b"SIMPLE  =                    T" + b" " * 50, id="fits"),
            pytest.param("WMF", b"\xd7\xcd\xc6\x9a" + bytes(64), id="wmf-placeable"),
            pytest.param("WMF", b"\x01\x00\x00\x00" + bytes(36) + b" EMF" + bytes(64), id="emf"),
            pytest.param("CUR", b"\x00\x00\x02\x00\x01\x00" + bytes(64), id="cur"),
            pytest.param("IM", b"Image type: RGB image\r\nName: x\r\nImage size (x*y): 24*16\r\n" + bytes(64), id="im"),
        ],
    )
    def test_formats_named_by_signature(self, name: str, data: bytes) -> None:
        with pytest.raises(UnsupportedImage) as info:
            decode_image(data, max_pixels=LIMIT)
        assert info.value.details == {"format": name}

    def test_eps_is_refused_without_being_parsed(self) -> None:
        """Pillow's EPS reader scans a file line by line in Python: 10 million comment lines took 19 s to refuse."""
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n" + b"%\n" * 10_000_000
        start = time.process_time()
        with pytest.raises(UnsupportedImage) as info:
            decode_image(data, max_pixels=LIMIT)
        assert time.process_time() - start < 0.5
        assert info.value.details == {"format": "EPS"}

    @pytest.mark.parametrize(
        "data",
        [
            b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n",
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
            b"P1 is not a bitmap header",
            b"/* a C comment, not an XPM */",
            b"\x00\x00\x01\x00\x00\x00" + bytes(64),  # an icon header with no icon
        ],
        ids=["pdf", "svg", "text-like-pbm", "text-like-xpm", "empty-icon"],
    )
    def test_data_that_is_no_image_format(self, data: bytes) -> None:
        with pytest.raises(InvalidImage):
            decode_image(data, max_pixels=LIMIT)

    @pytest.mark.parametrize(("samples", "bits", "sample_format"), [(3, 32, 3), (3, 12, 1), (1, 64, 3)])
    def test_tiff_layouts_pillow_does_not_decode(self, samples: int, bits: int, sample_format: int) -> None:
        """A real TIFF in a layout Pillow cannot decode (RGB of floats, 12-bit RGB, 64-bit float grey) is an
        unsupported image (415), not "not an image" (422)."""
        data = tiff_of(samples, bits, sample_format)
        assert decode_image(tiff_of(samples, 8, 1), max_pixels=LIMIT).shape == (4, 4, 3)  # the writer is right
        with pytest.raises(UnsupportedImage) as info:
            decode_image(data, max_pixels=LIMIT)
        assert info.value.details == {"format": "TIFF"} and "pixel layout" in str(info.value)

    @pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's, given only here (pytest resets the filters)
    def test_a_tiff_cut_in_its_header_stays_invalid(self) -> None:
        with pytest.raises(InvalidImage):
            decode_image(tiff_of(3, 32, 3)[:20], max_pixels=LIMIT)
