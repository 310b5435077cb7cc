"""The hostile-input corpus (issue 6): bad photos and bad requests generated in code, as cases for
tests/api/test_hostile_input.py.

A case is one HTTP request and the answer it must get: a 4xx with a stable error code (the database unchanged), or,
for photo formats facegate supports (CMYK, 16-bit, palette with alpha, animated GIF, EXIF-rotated, WebP, ...), a 2xx
that proves the face was found. Requests are built lazily from a `Ctx` (real face photos and the ids the test
enrolled), so that the expensive photos (a 100-megapixel JPEG, a PNG bomb) are made once and only when used.
"""

from __future__ import annotations

import functools
import inspect
import io
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage

# --------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Ctx:
    """What a case may use: a real colour face photo (JPEG) of the enrolled identity `colin`, a greyscale face photo
    (PNG) of the enrolled identity `amy`, and their ids (`colin`, `colin_face`, `amy`, `amy_face`)."""

    colin: bytes
    amy: bytes
    ids: Mapping[str, str]

    @functools.cached_property
    def colin_image(self) -> PILImage.Image:
        return PILImage.open(io.BytesIO(self.colin)).convert("RGB")


def encode(im: PILImage.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_from_rows(width: int, height: int, *, rows: int | None = None, colour_type: int = 2) -> bytes:
    """A PNG whose header declares width x height (8-bit RGB by default) and whose data holds `rows` rows of zeros
    (all of them by default), compressed: a decompression bomb is a few hundred kB for 48 megapixels."""
    channels = {0: 1, 2: 3}[colour_type]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + width * channels)
    body = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")
    )


@functools.cache
def png_bomb() -> bytes:
    """8000 x 6000 RGB (48 megapixels, 144 MB decoded) in ~140 kB: over image.max_pixels (40 M)."""
    return png_from_rows(8000, 6000)


@functools.cache
def png_header_bomb() -> bytes:
    """A header declaring 100000 x 100000 (10 gigapixels, beyond Pillow's own bomb limit) and one row of data."""
    return png_from_rows(100_000, 100_000, rows=1, colour_type=0)


@functools.cache
def jpeg_100_megapixels() -> bytes:
    """A real, complete 10000 x 10000 JPEG (one grey colour: ~1.2 MB on disk, cheap to make)."""
    return encode(PILImage.new("L", (10_000, 10_000), 128), "JPEG", quality=50)


def one_pixel() -> bytes:
    return encode(PILImage.new("RGB", (1, 1), (200, 150, 120)), "PNG")


def zero_width_png() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def corrupt_png(ctx: Ctx) -> bytes:
    """A real face PNG with bytes of its compressed data overwritten (the chunk checksum fixed up, so that only the
    deflate stream is wrong)."""
    data = bytearray(encode(ctx.colin_image, "PNG"))
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4 : at])[0]
    middle = at + 4 + length // 2
    data[middle : middle + 64] = b"\xff" * 64
    data[at + 4 + length : at + 8 + length] = struct.pack(">I", zlib.crc32(bytes(data[at : at + 4 + length])))
    return bytes(data)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def jpeg_garbage_after_header(ctx: Ctx) -> bytes:
    data = ctx.colin
    return data[:200] + bytes(range(256)) * 20


def cmyk_jpeg(ctx: Ctx) -> bytes:
    return encode(ctx.colin_image.convert("CMYK"), "JPEG", quality=95)


def png_16_bit(ctx: Ctx) -> bytes:
    grey = np.asarray(ctx.colin_image.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    return encode(PILImage.fromarray(grey), "PNG")  # Pillow writes I;16 as a 16-bit greyscale PNG


def palette_with_alpha(ctx: Ctx) -> bytes:
    """256-colour palette PNG with a tRNS chunk: the border is transparent, the face opaque."""
    rgba = np.array(ctx.colin_image.convert("RGBA"))
    rgba[:12, :, 3] = 0
    rgba[-12:, :, 3] = 0
    pal = PILImage.fromarray(rgba, "RGBA").quantize(colors=255, method=PILImage.Quantize.FASTOCTREE)
    data = encode(pal, "PNG")
    assert PILImage.open(io.BytesIO(data)).mode == "P" and b"tRNS" in data
    return data


def animated_gif(ctx: Ctx) -> bytes:
    """Three frames: the face first, then two blank frames (facegate reads the first frame)."""
    face = ctx.colin_image
    frames = [face, PILImage.new("RGB", face.size, "white"), PILImage.new("RGB", face.size, "black")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(PILImage.open(io.BytesIO(buf.getvalue())), "n_frames", 1) == 3
    return buf.getvalue()


def exif_rotated(ctx: Ctx, *, tag: bool = True) -> bytes:
    """The face stored turned a quarter to the left, with EXIF Orientation 6 ("rotate 90 CW to view"): a viewer (and
    facegate) shows it upright. Without the tag the same pixels are a sideways face."""
    stored = ctx.colin_image.transpose(PILImage.Transpose.ROTATE_90)
    if not tag:
        return encode(stored, "JPEG", quality=95)
    exif = PILImage.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def exif_orientation_invalid(ctx: Ctx) -> bytes:
    """An upright photo whose EXIF Orientation is 99 (no such value): read as stored."""
    exif = PILImage.Exif()
    exif[0x0112] = 99
    return encode(ctx.colin_image, "JPEG", quality=95, exif=exif.tobytes())


def png_text_bomb(ctx: Ctx) -> bytes:
    """A real face PNG with a zTXt chunk that inflates to 50 MB (110 kB on disk)."""
    data = encode(ctx.colin_image, "PNG")
    at = data.index(b"IDAT") - 4
    compressor = zlib.compressobj(9)
    payload = b"Comment\x00\x00" + compressor.compress(b"\x00" * 50_000_000) + compressor.flush()
    return data[:at] + png_chunk(b"zTXt", payload) + data[at:]


def jpeg_header_claims_65535_square(ctx: Ctx) -> bytes:
    """The face JPEG with its frame header (SOF0) saying 65535 x 65535: 4.3 gigapixels claimed, 12 kB sent."""
    data = bytearray(ctx.colin)
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = b"\xff\xff\xff\xff"
    return bytes(data)


def webp(ctx: Ctx) -> bytes:
    return encode(ctx.colin_image, "WEBP", quality=90)


def avif(ctx: Ctx) -> bytes:
    return encode(ctx.colin_image, "AVIF", quality=90)


def mpo(ctx: Ctx) -> bytes:
    """A multi-picture JPEG (what many cameras write): the face, then a second picture."""
    face = ctx.colin_image
    return encode(face, "MPO", save_all=True, append_images=[PILImage.new("RGB", face.size, "white")])


def tiff(ctx: Ctx) -> bytes:
    return encode(ctx.colin_image, "TIFF")


def bmp(ctx: Ctx) -> bytes:
    return encode(ctx.colin_image, "BMP")


def fake_heic() -> bytes:
    """The start of an iPhone HEIC file (ISO-BMFF `ftyp` box, brand heic): a real format facegate does not decode."""
    ftyp = b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heicmiaf"
    return struct.pack(">I", 8 + len(ftyp) - 4) + ftyp + b"\x00" * 64


def eps() -> bytes:
    """A PostScript header Pillow recognises (decoding it would run Ghostscript): refused by the format allow-list."""
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n%%EndComments\nshowpage\n"


def pdf() -> bytes:
    return b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def psd(ctx: Ctx) -> bytes:
    """A Photoshop file Pillow could read, but not in facegate's allow-list."""
    im = ctx.colin_image.resize((32, 32))
    header = b"8BPS" + struct.pack(">H6sHIIHH", 1, b"\x00" * 6, 3, 32, 32, 8, 3)
    planes = b"".join(np.asarray(im)[:, :, c].tobytes() for c in range(3))
    return header + struct.pack(">I", 0) * 3 + struct.pack(">H", 0) + planes


def blank_png() -> bytes:
    return encode(PILImage.new("RGB", (200, 200), (180, 180, 180)), "PNG")


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def entropy_coded(bits: str) -> bytes:
    """Huffman-coded bits as scan data: padded with 1s to whole bytes, every 0xFF byte stuffed with 0x00."""
    bits += "1" * (-len(bits) % 8)
    out = bytearray()
    for i in range(0, len(bits), 8):
        out.append(int(bits[i : i + 8], 2))
        if out[-1] == 0xFF:
            out.append(0)
    return bytes(out)


def progressive_jpeg(width: int, height: int, scans: int) -> bytes:
    """A greyscale progressive JPEG with `scans` scans, every coefficient zero (uniform grey 128): one DC scan, then
    AC scans that each code the whole image as end-of-band runs in a few bytes, so that a small file costs one pass
    over the whole image per scan to decode (the audit's scan bomb)."""
    blocks = -(-width // 8) * -(-height // 8)
    out = b"\xff\xd8" + jpeg_segment(0xDB, b"\x00" + b"\x01" * 64)  # SOI; quantisation table 0: all ones
    out += jpeg_segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")  # SOF2, 1 component
    out += jpeg_segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")  # DC table 0: "0" = difference 0
    out += jpeg_segment(0xC4, b"\x10" + bytes([1, 1] + [0] * 14) + b"\xe0\x00")  # AC table 0: "0" = EOB14, "1" = EOB
    out += jpeg_segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + entropy_coded("0" * blocks)  # the DC scan
    eob_runs = entropy_coded(("0" + "1" * 14) * -(-blocks // 32767))  # EOB14 with all 14 bits set: 32767 blocks
    out += (jpeg_segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + eob_runs) * (scans - 1)  # AC scans, bands 1-63
    return out + b"\xff\xd9"


def exif_with_a_rational(tag: int, orientation: int) -> bytes:
    """An EXIF block (little-endian TIFF, one IFD) with an Orientation and `tag` stored as a RATIONAL, a type that tag
    never has: Pillow reads the block, but cannot write it back (which ImageOps.exif_transpose does)."""
    entries = sorted([struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0), struct.pack("<HHII", tag, 5, 1, 38)])
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<II", 1, 1)  # the rational at 38


def rle_bmp(width: int, height: int, codes: bytes, *, bits: int) -> bytes:
    """A BMP compressed with RLE8 (bits=8) or RLE4 (bits=4) with a grey palette (index i: i * 255 // (colours - 1));
    `codes`: the RLE data, bottom row first."""
    colours = 1 << bits
    palette = b"".join(bytes([i * 255 // (colours - 1)] * 3 + [0]) for i in range(colours))
    offset = 14 + 40 + len(palette)
    compression = 1 if bits == 8 else 2
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(codes), 2835, 2835, colours, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(codes), 0, 0, offset) + info + palette + codes


def avif_corrupt_picture(ctx: Ctx) -> bytes:
    """The face as AVIF with its coded picture zeroed: the container is intact, libavif fails to decode the picture
    (Pillow raises RuntimeError from load)."""
    data = encode(ctx.colin_image, "AVIF", quality=90)
    coded = data.index(b"mdat") + 4
    return data[:coded] + bytes(len(data) - coded)


def avif_without_item_locations(ctx: Ctx) -> bytes:
    """The face as AVIF with its `iloc` box renamed: the primary image is missing (RuntimeError from Image.open)."""
    return encode(ctx.colin_image, "AVIF", quality=90).replace(b"iloc", b"xloc", 1)


def exif_junk_rotated(ctx: Ctx, fmt: str = "JPEG") -> bytes:
    """`exif_rotated` whose EXIF also holds an ImageDescription stored as a RATIONAL: the orientation is readable, the
    block cannot be written back; the face must still come out upright."""
    stored = ctx.colin_image.transpose(PILImage.Transpose.ROTATE_90)
    params: dict[str, Any] = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    return encode(stored, fmt, exif=exif_with_a_rational(0x010E, 6), **params)


@functools.cache
def jpeg_scan_bomb() -> bytes:
    """The audit's scan bomb: 6000 x 6000 (36 megapixels, under image.max_pixels) with 10,000 scans in 670 kB; it took
    50 s of CPU to decode."""
    return progressive_jpeg(6000, 6000, 10_000)


def jpeg_many_comments(ctx: Ctx) -> bytes:
    """The face JPEG with 2,000 empty comment segments in its header (Pillow walks them in Python)."""
    return ctx.colin[:2] + b"\xff\xfe\x00\x02" * 2000 + ctx.colin[2:]


def jpeg_fill_bytes(ctx: Ctx) -> bytes:
    """The face JPEG with 1 MB of 0xFF fill bytes after its SOI (Pillow reads them one at a time)."""
    return ctx.colin[:2] + b"\xff" * 1_000_000 + ctx.colin[2:]


def jpeg_fill_bytes_in_image_data(ctx: Ctx) -> bytes:
    """The face JPEG with 1 MB of 0xFF fill bytes before its EOI (a long run makes Pillow's feeding of libjpeg
    quadratic: 20 MB took 5 s)."""
    eoi = ctx.colin.rindex(b"\xff\xd9")
    return ctx.colin[:eoi] + b"\xff" * 1_000_000 + ctx.colin[eoi:]


def png_with_chunks(ctx: Ctx, count: int) -> bytes:
    """The face PNG with `count` empty private ancillary chunks after its header (Pillow reads chunks one by one in
    Python: 1.6 million of them, 19 MB, took 5-6 s and were accepted)."""
    png = encode(ctx.colin_image, "PNG")
    after_ihdr = 8 + 25
    return png[:after_ihdr] + png_chunk(b"zzZz", b"") * count + png[after_ihdr:]


def png_chunk_bomb(ctx: Ctx) -> bytes:
    return png_with_chunks(ctx, 100_000)


def gif_comment_bomb(ctx: Ctx) -> bytes:
    """The face as a GIF with 3 million empty comment extensions before its image (9 MB; Pillow reads them one by one
    in Python: 0.9 s, and accepted)."""
    gif = encode(ctx.colin_image.convert("P"), "GIF")
    first = 13 + (3 << ((gif[10] & 7) + 1))  # after the header, screen descriptor and global palette
    return gif[:first] + b"\x21\xfe\x00" * 3_000_000 + gif[first:]


def tiff_of(samples: int, bits: int, sample_format: int, width: int = 4, height: int = 4) -> bytes:
    """A little-endian, uncompressed, chunky TIFF, all pixels 0, written by hand: Pillow writes none of the layouts
    it cannot read."""
    pixels = bytes(width * height * samples * bits // 8)
    photometric = 2 if samples == 3 else 1
    count = 10
    arrays = 8 + 2 + count * 12 + 4  # BitsPerSample, then SampleFormat, then the pixels
    pixel_at = arrays + 4 * samples

    def entry(tag: int, kind: int, n: int, value: int) -> bytes:
        if kind == 3 and n == 1:
            return struct.pack("<HHIHH", tag, kind, n, value, 0)
        return struct.pack("<HHII", tag, kind, n, value)

    def per_sample(value: int, at: int) -> tuple[int, int]:
        return (value, 1) if samples == 1 else (at, samples)

    bps_value, bps_n = per_sample(bits, arrays)
    sf_value, sf_n = per_sample(sample_format, arrays + 2 * samples)
    entries = [
        entry(256, 3, 1, width),
        entry(257, 3, 1, height),
        entry(258, 3, bps_n, bps_value),
        entry(259, 3, 1, 1),  # no compression
        entry(262, 3, 1, photometric),
        entry(273, 4, 1, pixel_at),
        entry(277, 3, 1, samples),
        entry(278, 3, 1, height),
        entry(279, 4, 1, len(pixels)),
        entry(339, 3, sf_n, sf_value),
    ]
    # (one sample: the values are in the entries themselves, and these 4 bytes are unused)
    arrays_data = struct.pack(f"<{2 * samples}H", *[bits] * samples, *[sample_format] * samples)
    head = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", count) + b"".join(entries) + struct.pack("<I", 0)
    return head + arrays_data + pixels


def tiff_from_tags(tags: dict[int, tuple[int, list[int]]], tail: bytes = b"") -> bytes:
    """A little-endian TIFF with one directory of `tags` ({tag: (type 3 SHORT or 4 LONG, values)}), `tail` after it."""
    entries, arrays = b"", b""
    arrays_at = 8 + 2 + 12 * len(tags) + 4
    for tag, (kind, values) in sorted(tags.items()):
        payload = struct.pack(f"<{len(values)}{'H' if kind == 3 else 'I'}", *values)
        if len(payload) <= 4:
            entries += struct.pack("<HHI", tag, kind, len(values)) + payload.ljust(4, b"\0")
        else:
            entries += struct.pack("<HHII", tag, kind, len(values), arrays_at + len(arrays))
            arrays += payload
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + entries + b"\0" * 4 + arrays + tail


def bigtiff_grey(**tags: int) -> bytes:
    """A 4 x 4 grey BigTIFF (pixels 0..15 x 16), uncompressed, written by hand with every tag a LONG8 (8-byte values,
    which BigTIFF allows for offsets up to 2**64 - 1); `tags` ({"t273": value}) add tags or replace the usual ones."""
    count = 9 + sum(1 for name in tags if int(name[1:]) not in (256, 257, 258, 259, 262, 273, 277, 278, 279))
    pixel_at = 16 + 8 + 20 * count + 8
    values = {256: 4, 257: 4, 258: 8, 259: 1, 262: 1, 273: pixel_at, 277: 1, 278: 4, 279: 16}
    values.update({int(name[1:]): value for name, value in tags.items()})
    entries = b"".join(struct.pack("<HHQQ", tag, 16, 1, value) for tag, value in sorted(values.items()))
    head = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16) + struct.pack("<Q", len(values)) + entries + b"\0" * 8
    return head + bytes(range(0, 256, 16))


def tiff_in_strips(rows: int) -> bytes:
    """A 1 x `rows` grey TIFF, uncompressed, one row per strip, every strip the same byte: 8 bytes a row. Pillow makes
    a Python tile of each strip: 2.4 million (19 MB) took 23 s and 890 MB, and were accepted."""
    pixel_at = 8 + 2 + 12 * 9 + 4 + 8 * rows
    return tiff_from_tags(
        {256: (4, [1]), 257: (4, [rows]), 258: (3, [8]), 259: (3, [1]), 262: (3, [1]), 277: (3, [1]),
         278: (4, [1]), 273: (4, [pixel_at] * rows), 279: (4, [1] * rows)},  # fmt: skip
        b"\x80",
    )


def tiff_with_a_huge_tile() -> bytes:
    """206 bytes: a 16 x 16 RGBA TIFF, deflate-compressed, in one tile of 32768 x 16368 pixels, which libtiff
    allocates whole to decode it (2.1 GB, 3-7 s; then the data turned out broken)."""
    return tiff_from_tags(
        {256: (4, [16]), 257: (4, [16]), 258: (3, [8] * 4), 259: (3, [8]), 262: (3, [2]), 277: (3, [4]),
         322: (4, [32768]), 323: (4, [16368]), 324: (4, [200]), 325: (4, [6])},  # fmt: skip
        b"\x80" * 6,
    )


def png_with_icc_profiles(ctx: Ctx, count: int = 19_000) -> bytes:
    """The face PNG with `count` ICC profile chunks of 1 kB, each inflating to 1 MiB, which Pillow inflates one by
    one outside its cap on text: 19,000 (20 MB) took 52 s."""
    png = encode(ctx.colin_image, "PNG")
    profile = png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(bytes(1 << 20), 9))
    after_ihdr = 8 + 25
    return png[:after_ihdr] + profile * count + png[after_ihdr:]


def tiff_of_float_rgb() -> bytes:
    """A TIFF of 32-bit float RGB samples: a layout Pillow does not decode."""
    return tiff_of(3, 32, 3)


def eps_ten_million_lines() -> bytes:
    """An EPS header and 10 million comment lines (20 MB): Pillow's EPS reader took 19 s to scan it."""
    return b"%!PS-Adobe-3.0 EPSF-3.0\n" + b"%\n" * 10_000_000


@functools.cache
def rle4_bmp_36_megapixels() -> bytes:
    """6000 x 6000 RLE4 in 300 kB (runs of 254 pixels): Pillow's Python RLE decoder took 3 s."""
    row = b"".join(bytes([min(254, 6000 - x), 0x12]) for x in range(0, 6000, 254)) + b"\x00\x00"
    return rle_bmp(6000, 6000, row * 6000 + b"\x00\x01", bits=4)


# --------------------------------------------------------------------------------------- raw requests


def raw_multipart(parts: list[tuple[bytes, bytes | None, bytes]], boundary: bytes = b"hostileboundary") -> bytes:
    """A multipart body from raw bytes (name, filename or None, content): lets a field's name or value be bytes
    that are not UTF-8, which httpx would never send."""
    out = b""
    for name, filename, content in parts:
        disposition = b'form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        out += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n"
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + content + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


MULTIPART = {"content-type": "multipart/form-data; boundary=hostileboundary"}


def nested_json(levels: int) -> str:
    """A JSON object `levels` deep ({"a": [[...]]}, the object itself being the first level)."""
    return '{"a": ' + "[" * (levels - 1) + "]" * (levels - 1) + "}"


# ------------------------------------------------------------------------------------------- the cases

Value = Any  # a value, or a callable taking the Ctx (photos are built only when the case runs)


@dataclass(frozen=True)
class Case:
    """One request and the answer it must get. `status` 4xx: the error JSON with `code`, nothing stored. 2xx: the
    request worked; `check` looks at the body."""

    id: str
    method: str
    path: str  # formatted with Ctx.ids: "/identities/{colin}"
    status: int
    code: str | None = None
    files: Value = None
    data: Value = None
    json: Value = None
    content: Value = None
    headers: Mapping[str, str] | None = None
    params: Mapping[str, Any] | None = None
    app: str = "shared"  # "small_limit": the app whose image.max_upload_bytes is 64 kB
    check: Callable[[Any, Ctx], None] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.method} {self.path.split('?')[0]}"

    def request(self, ctx: Ctx) -> tuple[str, str, dict[str, Any]]:
        kwargs: dict[str, Any] = {}
        for key in ("files", "data", "json", "content"):
            value = _resolve(getattr(self, key), ctx)
            if value is not None:
                kwargs[key] = value
        if self.headers is not None:
            kwargs["headers"] = dict(self.headers)
        if self.params is not None:
            kwargs["params"] = dict(self.params)
        return self.method, self.path.format(**ctx.ids), kwargs


def _resolve(value: Value, ctx: Ctx) -> Any:
    if callable(value):
        return _resolve(value(ctx), ctx)
    if isinstance(value, dict):
        return {k: _resolve(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, ctx) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v, ctx) for v in value)
    return value


def upload(make: Callable[..., bytes], name: str = "photo.jpg", kind: str = "image/jpeg") -> Callable[[Ctx], Any]:
    """A file tuple for httpx whose content is made when the case runs (`make` takes the Ctx or nothing)."""

    takes_ctx = bool(inspect.signature(make).parameters)

    def build(ctx: Ctx) -> tuple[str, bytes, str]:
        return name, make(ctx) if takes_ctx else make(), kind

    return build


def colin(ctx: Ctx) -> bytes:
    return ctx.colin


def amy(ctx: Ctx) -> bytes:
    return ctx.amy


COLIN = upload(colin, "colin.jpg")
AMY = upload(amy, "amy.png", "image/png")
ZERO_ID = "0" * 32


def _verify_matches(r: Any, ctx: Ctx) -> None:
    body = r.json()
    assert body["mode"] == "identity" and body["identity_id"] == ctx.ids["colin"], body
    assert body["match"] is True and body["distance"] < 0.2, body


def _identify_finds_colin(r: Any, ctx: Ctx) -> None:
    faces = r.json()["faces"]
    assert len(faces) == 1 and faces[0]["candidates"][0]["identity_id"] == ctx.ids["colin"], faces
    assert faces[0]["candidates"][0]["distance"] < 0.2


def _cluster_problems(expected: dict[str, str]) -> Callable[[Any, Ctx], None]:
    def check(r: Any, ctx: Ctx) -> None:
        body = r.json()
        assert {p["photo"]: p["code"] for p in body["problems"]} == expected, body
        assert body["n_faces"] == 0 and body["clusters"] == []

    return check


def _per_photo(expected: list[str | None], *, key: str) -> Callable[[Any, Ctx], None]:
    """A many-photo reply (/embed, /identify/batch): photo i has the error code expected[i], or (None) a result
    under `key` that finds Colin."""

    def check(r: Any, ctx: Ctx) -> None:
        images = r.json()["images"]
        assert [p["index"] for p in images] == list(range(len(expected))), images
        for photo, code in zip(images, expected, strict=True):
            if code is not None:
                assert photo["error"]["code"] == code and photo["error"]["message"], photo
                continue
            assert photo.get("error") is None, photo
            if key == "faces":
                assert len(photo["faces"]) == 1 and len(photo["faces"][0]["embedding"]) == 128, photo
            else:
                assert photo["result"]["faces"][0]["candidates"][0]["identity_id"] == ctx.ids["colin"], photo

    return check


BAD_PHOTOS = [
    ("images", upload(png_bomb, "bomb.png")),
    ("images", upload(fake_heic, "x.heic")),
    ("images", upload(lambda ctx: truncated(ctx.colin), "half.jpg")),
    ("images", upload(one_pixel, "tiny.png")),
    ("images", upload(lambda: b"", "empty.jpg")),
    ("images", upload(blank_png, "blank.png")),
    ("images", upload(avif_corrupt_picture, "bad.avif", "image/avif")),
    ("images", upload(jpeg_scan_bomb, "scans.jpg")),
    ("images", upload(rle4_bmp_36_megapixels, "rle.bmp", "image/bmp")),
]
BAD_PHOTO_CODES = [
    "image_too_large", "unsupported_image", "invalid_image", "image_too_small", "invalid_image", "no_face",
    "invalid_image", "invalid_image", "image_too_large",
]
# A good photo that once failed the whole request (500): sideways, with junk EXIF beside its orientation.
JUNK_EXIF = ("images", upload(exif_junk_rotated, "junk-exif.jpg"))


def verify_colin(make: Callable[..., bytes], kind: str = "image/jpeg") -> dict[str, Any]:
    return {"files": {"image": upload(make, "probe", kind)}, "data": lambda ctx: {"identity_id": ctx.ids["colin"]}}


def _cases() -> list[Case]:
    C = Case
    enroll_new = {"name": "Nobody New"}
    cases = [
        # --- photos that are not photos -------------------------------------------------------------------
        C("not-an-image", "POST", "/enroll", 422, "invalid_image", files={"image": upload(lambda: b"hello")},
          data=enroll_new),
        C("empty-file", "POST", "/enroll", 422, "invalid_image", files={"image": upload(lambda: b"")}, data=enroll_new),
        C("empty-file-verify-b", "POST", "/verify", 422, "invalid_image",
          files={"image_a": COLIN, "image_b": upload(lambda: b"")}),
        C("truncated-jpeg-verify", "POST", "/verify", 422, "invalid_image",
          **{**verify_colin(lambda ctx: truncated(ctx.colin))}),
        C("truncated-png-identify", "POST", "/identify", 422, "invalid_image",
          files={"image": upload(lambda ctx: truncated(encode(ctx.colin_image, "PNG")), "t.png", "image/png")}),
        C("truncated-jpeg-add-face", "POST", "/identities/{colin}/faces", 422, "invalid_image",
          files={"image": upload(lambda ctx: truncated(ctx.colin, 0.8))}),
        C("truncated-gif", "POST", "/identify", 422, "invalid_image",
          files={"image": upload(lambda ctx: truncated(animated_gif(ctx), 0.3), "t.gif", "image/gif")}),
        C("jpeg-garbage-after-header", "POST", "/enroll", 422, "invalid_image",
          files={"image": upload(jpeg_garbage_after_header)}, data=enroll_new),
        C("png-corrupt-data", "POST", "/verify", 422, "invalid_image",
          files={"image_a": upload(corrupt_png, "a.png", "image/png"), "image_b": COLIN}),
        C("png-zero-width", "POST", "/enroll", 422, "invalid_image",
          files={"image": upload(zero_width_png, "z.png", "image/png")}, data=enroll_new),
        C("text-as-image-field", "POST", "/identify", 422, "invalid_request", data={"image": "not a file"}),
        # --- too big, too small ------------------------------------------------------------------------------
        C("png-decompression-bomb", "POST", "/enroll", 413, "image_too_large",
          files={"image": upload(png_bomb, "bomb.png", "image/png")}, data=enroll_new),
        C("png-header-bomb-10-gigapixels", "POST", "/identify", 413, "image_too_large",
          files={"image": upload(png_header_bomb, "bomb.png", "image/png")}),
        C("jpeg-100-megapixels", "POST", "/enroll", 413, "image_too_large",
          files={"image": upload(jpeg_100_megapixels)}, data=enroll_new),
        C("jpeg-100-megapixels-add-face", "POST", "/identities/{colin}/faces", 413, "image_too_large",
          files={"image": upload(jpeg_100_megapixels)}),
        C("png-text-chunk-bomb", "POST", "/verify", 422, "invalid_image",
          **verify_colin(png_text_bomb, "image/png")),
        C("jpeg-header-claims-4-gigapixels", "POST", "/enroll", 413, "image_too_large",
          files={"image": upload(jpeg_header_claims_65535_square)}, data=enroll_new),
        # --- photos far costlier to decode than their size: refused before decoding --------------------------------
        C("jpeg-10000-scans", "POST", "/identify", 422, "invalid_image", files={"image": upload(jpeg_scan_bomb)}),
        C("jpeg-2000-comment-segments", "POST", "/verify", 422, "invalid_image", **verify_colin(jpeg_many_comments)),
        C("jpeg-1-mb-of-fill-bytes", "POST", "/identities/{colin}/faces", 422, "invalid_image",
          files={"image": upload(jpeg_fill_bytes)}),
        C("jpeg-1-mb-of-fill-bytes-in-image-data", "POST", "/identify", 422, "invalid_image",
          files={"image": upload(jpeg_fill_bytes_in_image_data)}),
        C("png-100000-chunks", "POST", "/identify", 422, "invalid_image", files={"image": upload(png_chunk_bomb)}),
        C("gif-3-million-comment-extensions", "POST", "/enroll", 422, "invalid_image",
          files={"image": upload(gif_comment_bomb, "x.gif", "image/gif")}, data=enroll_new),
        C("bmp-rle4-36-megapixels", "POST", "/enroll", 413, "image_too_large",
          files={"image": upload(rle4_bmp_36_megapixels, "rle.bmp", "image/bmp")}, data=enroll_new),
        C("tiff-2.4-million-strips", "POST", "/identify", 422, "invalid_image",
          files={"image": upload(functools.partial(tiff_in_strips, 2_400_000), "x.tif", "image/tiff")}),
        C("tiff-one-tile-of-536-megapixels", "POST", "/identify", 422, "invalid_image",
          files={"image": upload(tiff_with_a_huge_tile, "x.tif", "image/tiff")}),
        C("bigtiff-strip-at-2-63", "POST", "/enroll", 422, "invalid_image",
          files={"image": upload(lambda: bigtiff_grey(t273=2**63), "x.tif", "image/tiff")},
          data=enroll_new),
        C("bigtiff-exif-directory-at-2-64-1", "POST", "/identities/{colin}/faces", 422, "invalid_image",
          files={"image": upload(lambda: bigtiff_grey(t34665=2**64 - 1), "x.tif", "image/tiff")}),
        C("png-19000-icc-profiles", "POST", "/identify", 422, "invalid_image",
          files={"image": upload(png_with_icc_profiles, "x.png", "image/png")}),
        C("tiff-of-float-rgb", "POST", "/identify", 415, "unsupported_image",
          files={"image": upload(tiff_of_float_rgb, "x.tif", "image/tiff")}),
        C("eps-10-million-lines", "POST", "/identify", 415, "unsupported_image",
          files={"image": upload(eps_ten_million_lines, "x.eps", "application/postscript")}),
        C("avif-corrupt-picture", "POST", "/identify", 422, "invalid_image",
          files={"image": upload(avif_corrupt_picture, "x.avif", "image/avif")}),
        C("avif-without-item-locations", "POST", "/enroll", 422, "invalid_image",
          files={"image": upload(avif_without_item_locations, "x.avif", "image/avif")}, data=enroll_new),
        C("one-pixel-enroll", "POST", "/enroll", 422, "image_too_small",
          files={"image": upload(one_pixel, "1.png", "image/png")}, data=enroll_new),
        C("one-pixel-verify-photos", "POST", "/verify", 422, "image_too_small",
          files={"image_a": COLIN, "image_b": upload(one_pixel, "1.png", "image/png")}),
        C("blank-photo-no-face", "POST", "/identities/{colin}/faces", 422, "no_face",
          files={"image": upload(blank_png, "b.png", "image/png")}),
        # --- formats facegate decodes: the face must be found (2xx) --------------------------------------------
        C("cmyk-jpeg", "POST", "/verify", 200, **verify_colin(cmyk_jpeg), check=_verify_matches),
        C("png-16-bit", "POST", "/verify", 200, **verify_colin(png_16_bit, "image/png"), check=_verify_matches),
        C("palette-with-alpha", "POST", "/verify", 200, **verify_colin(palette_with_alpha, "image/png"),
          check=_verify_matches),
        C("animated-gif", "POST", "/identify", 200, files={"image": upload(animated_gif, "a.gif", "image/gif")},
          check=_identify_finds_colin),
        C("exif-rotated", "POST", "/verify", 200, **verify_colin(exif_rotated), check=_verify_matches),
        C("exif-rotation-missing-is-sideways", "POST", "/verify", 422, "no_face",
          **verify_colin(lambda ctx: exif_rotated(ctx, tag=False))),
        C("exif-orientation-invalid", "POST", "/verify", 200, **verify_colin(exif_orientation_invalid),
          check=_verify_matches),
        *[
            C(f"exif-junk-rotated-{fmt.lower()}", "POST", "/verify", 200,
              **verify_colin(functools.partial(exif_junk_rotated, fmt=fmt)), check=_verify_matches)
            for fmt in ("JPEG", "PNG", "WEBP")
        ],
        C("webp", "POST", "/verify", 200, **verify_colin(webp, "image/webp"), check=_verify_matches),
        C("avif", "POST", "/verify", 200, **verify_colin(avif, "image/avif"), check=_verify_matches),
        C("mpo-camera-jpeg", "POST", "/verify", 200, **verify_colin(mpo), check=_verify_matches),
        C("tiff", "POST", "/verify", 200, **verify_colin(tiff, "image/tiff"), check=_verify_matches),
        C("bmp", "POST", "/verify", 200, **verify_colin(bmp, "image/bmp"), check=_verify_matches),
        # --- formats facegate does not decode (415) -------------------------------------------------------------
        C("heic", "POST", "/enroll", 415, "unsupported_image", files={"image": upload(fake_heic, "x.heic")},
          data=enroll_new),
        C("eps-ghostscript", "POST", "/identify", 415, "unsupported_image", files={"image": upload(eps, "x.eps")}),
        C("psd", "POST", "/verify", 415, "unsupported_image", **verify_colin(psd)),
        C("pdf", "POST", "/identities/{colin}/faces", 422, "invalid_image", files={"image": upload(pdf, "x.pdf")}),
        C("cluster-lists-bad-photos", "POST", "/cluster", 200, files=[
            ("images", upload(png_bomb, "bomb.png")),
            ("images", upload(fake_heic, "x.heic")),
            ("images", upload(lambda ctx: truncated(ctx.colin), "half.jpg")),
            ("images", upload(one_pixel, "tiny.png")),
            ("images", upload(avif_corrupt_picture, "bad.avif", "image/avif")),
            ("images", upload(jpeg_scan_bomb, "scans.jpg")),
            ("images", upload(rle4_bmp_36_megapixels, "rle.bmp", "image/bmp")),
        ], check=_cluster_problems({
            "bomb.png": "image_too_large", "x.heic": "unsupported_image", "half.jpg": "invalid_image",
            "tiny.png": "image_too_small", "bad.avif": "invalid_image", "scans.jpg": "invalid_image",
            "rle.bmp": "image_too_large",
        })),
        # --- fields: wrong, missing, repeated, unknown -----------------------------------------------------------
        C("enroll-wrong-file-field", "POST", "/enroll", 422, "invalid_request", files={"photo": COLIN},
          data=enroll_new),
        C("enroll-missing-image", "POST", "/enroll", 422, "invalid_request", data=enroll_new),
        C("enroll-neither-name-nor-id", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN}),
        C("enroll-name-and-id", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data=lambda ctx: {"name": "X", "identity_id": ctx.ids["colin"]}),
        C("enroll-unknown-face-policy", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data={"name": "X", "face": "all"}),
        C("enroll-bool-not-bool", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data={"name": "X", "allow_low_quality": "maybe"}),
        C("identify-wrong-field", "POST", "/identify", 422, "invalid_request", files={"img": COLIN}),
        C("identify-extra-field", "POST", "/identify", 422, "invalid_request", files={"image": COLIN},
          data={"name": "x"}),
        C("verify-image-without-identity", "POST", "/verify", 422, "invalid_request", files={"image": COLIN}),
        C("verify-image-a-only", "POST", "/verify", 422, "invalid_request", files={"image_a": COLIN}),
        C("verify-mixed-forms", "POST", "/verify", 422, "invalid_request", files={"image": COLIN, "image_b": COLIN}),
        C("verify-nothing", "POST", "/verify", 422, "invalid_request", data={"threshold": "0.3"}),
        C("add-face-with-name-field", "POST", "/identities/{colin}/faces", 422, "invalid_request",
          files={"image": COLIN}, data={"name": "x"}),
        C("add-face-two-images", "POST", "/identities/{colin}/faces", 422, "invalid_request",
          files=[("image", COLIN), ("image", COLIN)]),
        C("cluster-no-images", "POST", "/cluster", 422, "invalid_request", data={"threshold": "0.3"}),
        C("cluster-wrong-field", "POST", "/cluster", 422, "invalid_request", files={"image": COLIN}),
        C("cluster-too-many-photos", "POST", "/cluster", 422, "invalid_request",
          files=[("images", (f"{i}.png", b"x", "image/png")) for i in range(101)]),
        C("too-many-files", "POST", "/cluster", 400, "invalid_request",
          files=[("images", (f"{i}.png", b"x", "image/png")) for i in range(1001)]),
        C("too-many-form-fields", "POST", "/identify", 400, "invalid_request",
          files={"image": COLIN}, data={f"f{i}": "x" for i in range(1001)}),
        C("many-long-unknown-fields", "POST", "/identify", 422, "invalid_request", files={"image": COLIN},
          data={f"{i:03d}" + "y" * 4000: "x" for i in range(999)}),  # was an 8 MB reply
        C("text-field-over-1-mb", "POST", "/enroll", 400, "invalid_request", files={"image": COLIN},
          data={"name": "x", "metadata": "{" + " " * 1_100_000 + "}"}),
        # --- metadata -------------------------------------------------------------------------------------------
        C("metadata-huge", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data={"name": "X", "metadata": '{"blob": "' + "x" * 20_000 + '"}'}),
        C("metadata-not-json", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data={"name": "X", "metadata": "{'single': 'quotes'}"}),
        C("metadata-array", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data={"name": "X", "metadata": "[1, 2, 3]"}),
        C("metadata-deep-nesting", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data={"name": "X", "metadata": '{"a": ' + "[" * 5000 + "]" * 5000 + "}"}),
        *[
            C(f"metadata-nested-{levels}-levels", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
              data={"name": "X", "metadata": nested_json(levels)})
            for levels in (33, 300, 500)  # 300 was stored (then unreadable), 500 a RecursionError
        ],
        *[
            C(f"patch-metadata-nested-{levels}-levels", "PATCH", "/identities/{colin}", 422, "invalid_request",
              content=b'{"metadata": ' + nested_json(levels).encode() + b"}",
              headers={"content-type": "application/json"})
            for levels in (33, 256)  # 256 was stored, then every read of the identity was a 500
        ],
        C("metadata-nan", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data={"name": "X", "metadata": '{"score": NaN, "max": Infinity}'}),
        C("metadata-with-identity-id", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data=lambda ctx: {"identity_id": ctx.ids["colin"], "metadata": "{}"}),
        C("patch-metadata-over-store-limit", "PATCH", "/identities/{colin}", 422, "invalid_request",
          json={"metadata": {"blob": "x" * 70_000}}),
        C("patch-metadata-deep-nesting", "PATCH", "/identities/{colin}", 400, "invalid_request",
          content=b'{"metadata": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
          headers={"content-type": "application/json"}),
        C("patch-metadata-nul", "PATCH", "/identities/{colin}", 422, "invalid_request",
          json={"metadata": {"a": "x\u0000y"}}),
        C("patch-unknown-field", "PATCH", "/identities/{colin}", 422, "invalid_request", json={"nmae": "x"}),
        C("patch-body-is-a-list", "PATCH", "/identities/{colin}", 422, "invalid_request", json=[{"name": "x"}]),
        C("patch-malformed-json", "PATCH", "/identities/{colin}", 422, "invalid_request", content=b'{"name": ',
          headers={"content-type": "application/json"}),
        # --- content types ----------------------------------------------------------------------------------------
        C("json-to-enroll", "POST", "/enroll", 422, "invalid_request", json={"image": "aGVsbG8=", "name": "x"}),
        C("text-plain-to-verify", "POST", "/verify", 422, "invalid_request", content=b"image=1",
          headers={"content-type": "text/plain"}),
        C("urlencoded-to-identify", "POST", "/identify", 422, "invalid_request", data={"top_k": "3"}),
        C("multipart-without-boundary", "POST", "/identify", 400, "invalid_request", content=b"--x\r\n",
          headers={"content-type": "multipart/form-data"}),
        C("multipart-garbage", "POST", "/enroll", 400, "invalid_request", content=b"\x00\xff" * 500,
          headers=MULTIPART),
        # A body cut short (a client or proxy giving up): Starlette kept the parts it completed, "image: Field required".
        C("multipart-cut-in-the-photo", "POST", "/enroll", 400, "invalid_request", headers=MULTIPART,
          content=lambda ctx: raw_multipart([(b"name", None, b"Cut"), (b"image", b"c.jpg", ctx.colin)])[:-5000]),
        C("multipart-cut-before-closing-boundary", "POST", "/identify/batch", 400, "invalid_request", headers=MULTIPART,
          content=lambda ctx: raw_multipart([(b"images", b"a.jpg", ctx.colin), (b"images", b"b.jpg", ctx.colin)])[
              : -len(b"--hostileboundary--\r\n")]),
        C("multipart-to-calibrate", "POST", "/calibrate", 422, "invalid_request", files={"source": ("s", b"gallery")}),
        C("calibrate-text-plain", "POST", "/calibrate", 422, "invalid_request", content=b'{"source": "gallery"}',
          headers={"content-type": "text/plain"}),
        C("patch-form-encoded", "PATCH", "/identities/{colin}", 422, "invalid_request", data={"name": "x"}),
        # --- names -------------------------------------------------------------------------------------------------
        C("name-not-utf8", "POST", "/enroll", 400, "invalid_request", headers=MULTIPART,
          content=lambda ctx: raw_multipart([(b"image", b"c.jpg", ctx.colin), (b"name", None, b"Jos\xe9 \xff\xfe")])),
        C("name-not-utf8-behind-a-decoy-disposition", "POST", "/enroll", 400, "invalid_request", headers=MULTIPART,
          content=lambda ctx: raw_multipart([(b"image", b"c.jpg", ctx.colin)])[: -len(b"--hostileboundary--\r\n")]
          + b'--hostileboundary\r\nContent-Disposition: form-data; name="x"; filename="decoy.txt"\r\n'
          + b'Content-Disposition: form-data; name="name"\r\n\r\n' + "Иван".encode("koi8-r")
          + b"\r\n--hostileboundary--\r\n"),
        C("metadata-not-utf8", "POST", "/enroll", 400, "invalid_request", headers=MULTIPART,
          content=lambda ctx: raw_multipart(
              [(b"image", b"c.jpg", ctx.colin), (b"name", None, b"X"), (b"metadata", None, b'{"a": "\xc3\x28"}')]
          )),
        C("field-name-not-utf8", "POST", "/identify", 400, "invalid_request", headers=MULTIPART,
          content=lambda ctx: raw_multipart([(b"image", b"c.jpg", ctx.colin), (b"top\xff_k", None, b"3")])),
        *[
            C(f"multipart-charset-{codec}-{path.strip('/').replace('/', '-')}", "POST", path, 400, "invalid_request",
              headers={"content-type": MULTIPART["content-type"] + f"; charset={codec}"},
              content=lambda ctx, field=field: raw_multipart([(field, b"c.jpg", ctx.colin)]))
            for codec, path, field in [
                ("hex", "/identify", b"image"), ("base64", "/enroll", b"image"), ("rot13", "/verify", b"image_a"),
                ("zlib", "/cluster", b"images"), ("bz2", "/embed", b"images"), ("uu", "/identify/batch", b"images"),
                ("quopri", "/identities/{colin}/faces", b"image"), ("no-such-charset", "/enroll", b"image"),
                ("undefined", "/identify", b"image"),
            ]
        ],
        C("multipart-charset-idna-file-name", "POST", "/identify", 400, "invalid_request",
          headers={"content-type": MULTIPART["content-type"] + "; charset=idna"},
          content=lambda ctx: raw_multipart([(b"image", b"xn--abc-", ctx.colin)])),
        C("identity-id-not-utf8", "POST", "/verify", 400, "invalid_request", headers=MULTIPART,
          content=lambda ctx: raw_multipart(
              [(b"image", b"c.jpg", ctx.colin), (b"identity_id", None, b"\xed\xa0\x80")]
          )),
        C("name-very-long", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data={"name": "N" * 100_000}),
        C("name-201-characters", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data={"name": "é" * 201}),
        C("name-blank", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN}, data={"name": " \t "}),
        C("name-invisible-only", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data={"name": "\u200b\u200d\u0301"}),
        C("name-nul", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN}, data={"name": "Bob\x00"}),
        C("name-ansi-escape", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data={"name": "Bob\x1b[31mRed"}),
        C("name-newline-log-injection", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data={"name": "Bob\r\nINFO forged log line"}),
        *[
            C(f"name-{label}", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN}, data={"name": name})
            for label, name in [
                ("bidi-override", "Alice\u202egnp.exe"), ("bidi-embedding", "\u202bBob"),
                ("bidi-isolate", "Bob\u2067x"), ("right-to-left-mark", "Bob\u200f"),
                ("arabic-letter-mark", "Bob\u061c1"), ("byte-order-mark", "\ufeffBob"),
                ("tag-characters", "Bob\U000e0041\U000e007f"), ("noncharacter-ffff", "Bob\uffff"),
                ("noncharacter-fdd0", "Bob\ufdd0"), ("noncharacter-plane-1", "Bob\U0001fffe"),
            ]
        ],
        C("patch-name-bidi-override", "PATCH", "/identities/{colin}", 422, "invalid_request",
          json={"name": "Colin\u202eNIL"}),
        C("patch-name-byte-order-mark", "PATCH", "/identities/{colin}", 422, "invalid_request",
          json={"name": "Colin\ufeff"}),
        C("patch-name-control-character", "PATCH", "/identities/{colin}", 422, "invalid_request",
          json={"name": "Colin\u0085Powell"}),
        C("patch-name-too-long", "PATCH", "/identities/{colin}", 422, "invalid_request", json={"name": "x" * 201}),
        C("list-name-filter-too-long", "GET", "/identities", 422, "invalid_request", params={"name": "x" * 201}),
        # --- ids ---------------------------------------------------------------------------------------------------
        C("get-unknown-identity", "GET", f"/identities/{ZERO_ID}", 404, "unknown_identity"),
        C("get-malformed-id", "GET", "/identities/not-an-id", 404, "unknown_identity"),
        C("get-sql-in-id", "GET", "/identities/'%20OR%201=1%20--", 404, "unknown_identity"),
        C("get-nul-in-id", "GET", "/identities/%00", 404, "unknown_identity"),
        C("get-id-too-long", "GET", "/identities/" + "a" * 65, 422, "invalid_request"),
        C("patch-unknown-identity", "PATCH", f"/identities/{ZERO_ID}", 404, "unknown_identity",
          json={"name": "x"}),
        C("delete-unknown-identity", "DELETE", f"/identities/{ZERO_ID}", 404, "unknown_identity"),
        C("delete-malformed-id", "DELETE", "/identities/DROP%20TABLE%20faces", 404, "unknown_identity"),
        C("add-face-unknown-identity", "POST", f"/identities/{ZERO_ID}/faces", 404, "unknown_identity",
          files={"image": COLIN}),
        C("delete-unknown-face", "DELETE", "/identities/{colin}/faces/" + ZERO_ID, 404, "unknown_face"),
        C("delete-malformed-face-id", "DELETE", "/identities/{colin}/faces/not-a-face", 404, "unknown_face"),
        C("delete-face-of-another-identity", "DELETE", "/identities/{colin}/faces/{amy_face}", 404,
          "unknown_face"),
        C("delete-face-unknown-identity", "DELETE", f"/identities/{ZERO_ID}/faces/" + "{colin_face}", 404,
          "unknown_identity"),
        C("photo-not-stored", "GET", "/identities/{colin}/faces/{colin_face}/image", 404, "image_not_stored"),
        C("photo-of-another-identity", "GET", "/identities/{colin}/faces/{amy_face}/image", 404, "unknown_face"),
        C("photo-malformed-face-id", "GET", "/identities/{colin}/faces/DROP%20TABLE%20faces/image", 404,
          "unknown_face"),
        C("photo-face-id-too-long", "GET", "/identities/{colin}/faces/" + "f" * 65 + "/image", 422,
          "invalid_request"),
        C("verify-unknown-identity", "POST", "/verify", 404, "unknown_identity", files={"image": COLIN},
          data={"identity_id": ZERO_ID}),
        C("verify-malformed-identity", "POST", "/verify", 404, "unknown_identity", files={"image": COLIN},
          data={"identity_id": "'; DROP TABLE identities; --"}),
        C("enroll-unknown-identity", "POST", "/enroll", 404, "unknown_identity", files={"image": COLIN},
          data={"identity_id": ZERO_ID}),
        C("enroll-identity-id-too-long", "POST", "/enroll", 422, "invalid_request", files={"image": COLIN},
          data={"identity_id": "f" * 65}),
        # --- thresholds, top_k, paging ------------------------------------------------------------------------------
        *[
            C(f"verify-threshold-{label}", "POST", "/verify", 422, "invalid_request",
              files={"image_a": COLIN, "image_b": COLIN}, data={"threshold": value})
            for label, value in [("negative", "-0.5"), ("zero", "0"), ("nan", "NaN"), ("inf", "inf"),
                                 ("string", "strict"), ("over-4", "4.0001")]
        ],
        *[
            C(f"identify-top-k-{label}", "POST", "/identify", 422, "invalid_request", files={"image": COLIN},
              data={"top_k": value})
            for label, value in [("zero", "0"), ("negative", "-3"), ("over-100", "101"), ("float", "2.5"),
                                 ("string", "five"), ("huge", "9" * 40), ("nan", "NaN")]
        ],
        C("identify-threshold-nan", "POST", "/identify", 422, "invalid_request", files={"image": COLIN},
          data={"threshold": "nan"}),
        C("identify-threshold-negative-inf", "POST", "/identify", 422, "invalid_request", files={"image": COLIN},
          data={"threshold": "-inf"}),
        C("cluster-threshold-negative", "POST", "/cluster", 422, "invalid_request", files={"images": COLIN},
          data={"threshold": "-1"}),
        C("list-limit-zero", "GET", "/identities", 422, "invalid_request", params={"limit": 0}),
        C("list-offset-negative", "GET", "/identities", 422, "invalid_request", params={"offset": -1}),
        C("list-limit-huge", "GET", "/identities", 422, "invalid_request", params={"limit": "1e9"}),
        # --- calibration ----------------------------------------------------------------------------------------------
        C("calibrate-target-far-zero", "POST", "/calibrate", 422, "invalid_request",
          json={"source": "gallery", "target_far": 0}),
        C("calibrate-target-far-one", "POST", "/calibrate", 422, "invalid_request",
          json={"source": "gallery", "target_far": 1}),
        C("calibrate-target-far-nan", "POST", "/calibrate", 422, "invalid_request",
          content=b'{"source": "pairs", "same": [0.1], "different": [0.9], "target_far": NaN}',
          headers={"content-type": "application/json"}),
        C("calibrate-distance-infinity", "POST", "/calibrate", 422, "invalid_request",
          content=b'{"source": "pairs", "same": [0.1], "different": [Infinity], "target_far": 0.01}',
          headers={"content-type": "application/json"}),
        C("calibrate-distance-negative", "POST", "/calibrate", 422, "invalid_request",
          json={"source": "pairs", "same": [-0.1], "different": [0.9], "target_far": 0.01}),
        C("calibrate-distances-over-4-applied", "POST", "/calibrate", 422, "invalid_request",
          json={"source": "pairs", "same": [5, 5.5], "different": [7, 8], "target_far": 0.5, "apply": True}),
        C("calibrate-distance-1e308-applied", "POST", "/calibrate", 422, "invalid_request",
          json={"source": "pairs", "same": [0.1], "different": [1e308], "target_far": 0.5, "apply": True}),
        C("calibrate-distances-strings", "POST", "/calibrate", 422, "invalid_request",
          json={"source": "pairs", "same": ["near"], "different": [0.9]}),
        C("calibrate-unknown-source", "POST", "/calibrate", 422, "invalid_request", json={"source": "oracle"}),
        C("calibrate-pairs-without-distances", "POST", "/calibrate", 422, "invalid_request",
          json={"source": "pairs"}),
        C("calibrate-gallery-too-small", "POST", "/calibrate", 409, "insufficient_data",
          json={"source": "gallery", "apply": True}),
        C("calibrate-empty-body", "POST", "/calibrate", 422, "invalid_request", content=b"",
          headers={"content-type": "application/json"}),
        C("calibration-curve-unknown-source", "GET", "/calibration/curve", 422, "invalid_request",
          params={"source": "oracle"}),
        C("calibration-curve-gallery-too-small", "GET", "/calibration/curve", 409, "insufficient_data",
          params={"source": "gallery"}),
        # --- many-photo endpoints: a bad photo gets its own error, the request does not fail ------------------------
        C("embed-lists-bad-photos", "POST", "/embed", 200, files=[*BAD_PHOTOS, ("images", COLIN), JUNK_EXIF],
          check=_per_photo([*BAD_PHOTO_CODES, None, None], key="faces")),
        C("identify-batch-lists-bad-photos", "POST", "/identify/batch", 200,
          files=[("images", COLIN), *BAD_PHOTOS, JUNK_EXIF], data={"top_k": "2"},
          check=_per_photo([None, *BAD_PHOTO_CODES, None], key="result")),
        C("embed-no-images", "POST", "/embed", 422, "invalid_request"),
        C("embed-wrong-field", "POST", "/embed", 422, "invalid_request", files={"image": COLIN}),
        C("embed-too-many-photos", "POST", "/embed", 422, "invalid_request",
          files=[("images", (f"{i}.png", b"x", "image/png")) for i in range(33)]),
        C("embed-field-not-utf8", "POST", "/embed", 400, "invalid_request", headers=MULTIPART,
          content=lambda ctx: raw_multipart([(b"images", b"c.jpg", ctx.colin), (b"note", None, b"\xff\xfe")])),
        C("identify-batch-no-images", "POST", "/identify/batch", 422, "invalid_request", data={"top_k": "3"}),
        C("identify-batch-extra-field", "POST", "/identify/batch", 422, "invalid_request",
          files={"images": COLIN}, data={"name": "x"}),
        C("identify-batch-too-many-photos", "POST", "/identify/batch", 422, "invalid_request",
          files=[("images", (f"{i}.png", b"x", "image/png")) for i in range(33)]),
        C("identify-batch-top-k-zero", "POST", "/identify/batch", 422, "invalid_request", files={"images": COLIN},
          data={"top_k": "0"}),
        C("identify-batch-threshold-nan", "POST", "/identify/batch", 422, "invalid_request",
          files={"images": COLIN}, data={"threshold": "NaN"}),
        # --- body size (the app whose limit is 64 kB) ------------------------------------------------------------
        C("body-over-limit-enroll", "POST", "/enroll", 413, "request_too_large", app="small_limit",
          files={"image": upload(lambda: b"\xff\xd8" + b"\x00" * 100_000)}, data={"name": "x"}),
        C("body-over-limit-cluster", "POST", "/cluster", 413, "request_too_large", app="small_limit",
          files=[("images", COLIN)] * 8),
        C("body-over-limit-verify", "POST", "/verify", 413, "request_too_large", app="small_limit",
          files={"image_a": upload(png_bomb, "bomb.png"), "image_b": COLIN}),
        C("body-over-limit-patch", "PATCH", f"/identities/{ZERO_ID}", 413, "request_too_large", app="small_limit",
          json={"metadata": {"blob": "x" * 100_000}}),
        C("body-over-limit-calibrate", "POST", "/calibrate", 413, "request_too_large", app="small_limit",
          json={"source": "pairs", "same": [0.1] * 20_000, "different": [0.9] * 20_000}),
        C("body-over-limit-embed", "POST", "/embed", 413, "request_too_large", app="small_limit",
          files=[("images", COLIN)] * 8),
        C("body-over-limit-identify-batch", "POST", "/identify/batch", 413, "request_too_large", app="small_limit",
          files=[("images", COLIN)] * 8),
        C("body-over-limit-chunked", "POST", "/identify", 413, "request_too_large", app="small_limit",
          content=lambda ctx: iter([b"x" * 10_000] * 10), headers=MULTIPART),
    ]
    return cases


CASES: list[Case] = _cases()
