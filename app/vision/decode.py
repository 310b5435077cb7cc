"""Photo bytes -> H x W x 3 uint8 RGB array, with Pillow.

What decoding guarantees:

* Only photo formats are decoded: JPEG (and MPO, the multi-picture JPEG of many cameras), PNG (and APNG), GIF, WebP,
  AVIF, BMP and TIFF (`FORMATS`), and HEIC/HEIF when the caller enables it (`heic=True`, FACEGATE_IMAGE__HEIC: pi-heif's
  plugin, libheif + libde265, which is registered with Pillow only then). Pillow reads some 40 formats; every parser is
  attack surface and some hand the data to other programs (EPS runs Ghostscript), so other image formats (PSD, EPS,
  ICO, TGA, ..., JPEG XL, which Pillow does not read, and HEIC/HEIF when not enabled) raise `UnsupportedImage`, named
  from their first bytes alone (no parser of theirs runs); anything else raises `InvalidImage`. A TIFF whose pixel
  layout Pillow does not decode (floating-point colour, 12-bit samples, ...) raises `UnsupportedImage` too.
* Data whose decoding costs far more than its size says is refused before it is decoded: a JPEG (or MPO) with more
  than `MAX_JPEG_SCANS` scans or `MAX_JPEG_MARKERS` markers, or padded with more than `MAX_JPEG_JUNK` bytes, a PNG
  with more than `MAX_PNG_CHUNKS` chunks or `MAX_PNG_INFLATED_CHUNKS` compressed metadata chunks, a GIF with more
  than `MAX_GIF_BLOCKS` extension blocks before its image, and a TIFF in more than `MAX_TIFF_PARTS` strips or tiles
  or with tiles of more pixels than the image limit (`InvalidImage`); an RLE-compressed BMP over
  `MAX_RLE_BMP_PIXELS` or `MAX_RLE_BMP_BYTES` (`ImageTooLarge`).
* The pixel count is checked from the header, before any pixel is decoded: more than `max_pixels` raises
  `ImageTooLarge`. Pillow's own decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`, left at its default) also applies:
  images over it are refused with `ImageTooLarge` too (Pillow raises `DecompressionBombError` above twice that limit
  and warns above it; facegate refuses both cases), so the effective limit is min(max_pixels, MAX_IMAGE_PIXELS).
* The whole image is decoded: truncated or corrupt data raises `InvalidImage` (Pillow's global
  `LOAD_TRUNCATED_IMAGES` is never set, so missing data is not filled in silently). The exception is a JPEG whose
  image data stops short but is closed by an end-of-image marker: libjpeg decodes the missing blocks as grey, as
  viewers show such a file, with a warning that Pillow does not pass on.
* The EXIF orientation tag is applied, so the array is upright as a viewer shows it; EXIF that cannot be read is
  ignored (the pixels as stored), and a readable orientation tag is applied even when other tags are malformed. HEIF
  is the exception: libheif applies the file's own rotation and mirroring (irot, imir), which HEIF readers follow
  rather than EXIF (an iPhone writes both, saying the same), so its EXIF orientation is not applied again.
* Animated images (GIF, APNG, WebP, multi-page TIFF) give their first frame; a HEIF with several images (a burst)
  gives its primary image.
* Colour modes: greyscale and 1-bit are replicated to RGB; palettes are expanded; CMYK and YCbCr use Pillow's
  conversion; 10- and 12-bit HEIF is scaled to 8 bits by libheif; 16-bit greyscale (I;16*) and 32-bit integer (I)
  images are scaled from 0..65535 to 0..255 with
  rounding (v / 257; I values outside 0..65535 are clipped), 32-bit float (F) images from 0..1 when their maximum is
  at most 1, else they are clipped to 0..255. Transparency (an alpha channel, or a palette/grey tRNS entry) is
  composited on **white**: the colour under fully transparent pixels is undefined content (often black), while white
  is what most viewers show, so a face cut out on a transparent background is seen on a plain light background.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import re
import struct
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage
from PIL import TiffImagePlugin, UnidentifiedImageError

from app.errors import ImageTooLarge, InvalidImage, UnsupportedImage
from app.vision.types import Image, SizedImage

# Warnings Pillow gives for uploads refused or handled here, which only put lines in the server's log (one per
# distinct message: the image's size or byte counts are in it): an image over MAX_IMAGE_PIXELS but under twice that
# (refused: ImageTooLarge), and EXIF or TIFF directories cut short (a corrupt TIFF is InvalidImage; unreadable EXIF
# in another photo is ignored).
warnings.filterwarnings("ignore", category=PILImage.DecompressionBombWarning)
warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning, module=r"PIL\.")

# Pillow plugin ids of the formats decoded (JPEG also opens MPO files).
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF")
# pi-heif's plugin id: added to FORMATS for the callers that enable HEIC (`_formats`), and the file names of HEIF
# photos (.hif: Canon's and Fujifilm's cameras) that folder commands pick up then.
HEIF = "HEIF"
HEIF_SUFFIXES = frozenset({".heic", ".heif", ".hif"})
_HEIF_LOCK = threading.Lock()

# Errors Pillow's decoders raise for malformed or truncated data. RuntimeError: libavif reports corrupt AVIF data
# with it ("Decoding of color planes failed", "Missing or empty image item"), from Image.open as well as from load;
# struct.error: Pillow's readers written in Python unpack header fields with struct; OverflowError: a BigTIFF's
# 8-byte offsets (of a strip, a tile or the EXIF directory) at 2**63 or beyond, which Pillow seeks to as they are.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    RuntimeError,
    OverflowError,
    struct.error,
)

# A progressive JPEG's decoder makes one pass over the whole image's coefficients per scan (about 8 ms per scan at
# 36 megapixels), and a scan can be a dozen bytes: 670 kB with 10,000 scans took 50 s of CPU. Encoders write far
# fewer (libjpeg's progressive script: 10 scans for a colour photo, 18 for CMYK); 100 bounds the decode of a
# 40-megapixel photo to about a second.
MAX_JPEG_SCANS = 100
# Markers (segments and scans) in the first picture of a JPEG. A photo has a few dozen (APPn metadata, tables,
# scans; even 20 MB of 64 kB metadata segments is 320); the header before the first scan is walked in Python by
# Pillow, marker by marker (5 million empty comments: 6 s), and the limit keeps our own walk short too.
MAX_JPEG_MARKERS = 1000
# Padding and junk in a JPEG's first picture: bytes before the first scan that belong to no segment, and runs of 0xFF
# fill bytes anywhere (valid scan data never has two in a row). libjpeg skips both, but Pillow's header parser reads
# the first kind one byte at a time (20 MB: 10 s), and a long run of fill bytes makes Pillow's feeding of libjpeg
# quadratic (libjpeg rereads the run from its start each time Pillow hands it more data: 20 MB took 5 s). A photo
# has none, or a byte or two.
MAX_JPEG_JUNK = 65_536
_JPEG_FILL_RUN = b"\xff" * (MAX_JPEG_JUNK + 1)
# What Pillow's JPEG reader (and so MPO) requires at the start: SOI and the first byte of the next marker.
_JPEG_START = b"\xff\xd8\xff"
# The next marker (0xFF and its code) where entropy-coded data may come first: in that data every 0xFF is followed
# by 0x00 (byte stuffing) or is a restart marker RST0-7 (no length, part of the scan); 0xFF fill bytes may precede a
# marker (the match is the last of them). libjpeg looks for markers the same way. (No `\xff+`: with it, re searches
# some 50 times slower.)
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
# Start-of-frame markers (SOF0-SOF15; C4, C8 and CC are other markers), the first of which says how the picture is
# coded, and those of pictures libjpeg can decode at a reduced scale: the DCT-based ones (baseline, extended and
# progressive, Huffman or arithmetic). It has no reduced scale for a lossless one (SOF3, SOF11: Pillow then reports
# broken data), and hierarchical ones (SOF5-7, SOF13-15) it does not decode at all.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_SCALABLE_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC9, 0xCA})
_JPEG_NO_LENGTH = {0x01, 0xD8}  # TEM, SOI: markers without a length field

# Chunks in a PNG (APNG included), up to IEND. Pillow reads them one by one in Python, before the image data and after
# it: 1.6 million empty ancillary chunks (19 MB) took 5-6 s, and were accepted. A photo has a few dozen (the dev set's
# PNGs: at most 38); encoders cut the image data into chunks of 8 kB or more (a 20 MB PNG: some 2,500), and an
# animation adds two per frame. 20,000 leaves room for all of these and bounds the walk below to ~10 ms.
MAX_PNG_CHUNKS = 20_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks whose data Pillow inflates (up to 1 MiB each): the ICC profile (iCCP; one at most) and compressed or
# international text (zTXt, iTXt: XMP, comments). Pillow's 64 MB cap on text leaves out an ICC profile, a zTXt with an
# empty keyword and an iTXt whose text is not UTF-8: 19,000 of those, 1 kB each (20 MB), inflated 19 GB in 52 s. A
# photo has a few; 100 bound the inflating to about 0.3 s.
MAX_PNG_INFLATED_CHUNKS = 100
_PNG_INFLATED = frozenset({b"iCCP", b"zTXt", b"iTXt"})

# Pillow decodes RLE-compressed BMP (RLE8, RLE4; palette images, not photos) in a Python loop: about 0.1 us per
# pixel for RLE4 (6000 x 6000 in 300 kB: 3 s) and 0.25 us per byte of codes that draw little or nothing (20 MB on a
# 16 x 16 image: 5 s). These limits keep one photo under about a quarter of a second; PNG needs no such limit.
MAX_RLE_BMP_PIXELS = 2_000_000
MAX_RLE_BMP_BYTES = 1_000_000
_BMP_RLE = {1: "RLE8", 2: "RLE4"}  # BMP compression field (BI_RLE8, BI_RLE4)

# Blocks of a GIF before its first image: extensions and their sub-blocks, which Pillow reads one by one in Python
# (9 MB of empty comment extensions, or of 1-byte comment sub-blocks: 0.9 s, and accepted). A photo's GIF has a few
# (a graphic control extension, a loop count, perhaps an XMP packet: some hundreds of sub-blocks for a large one);
# 65,536 bounds the walk below to some 30 ms.
MAX_GIF_BLOCKS = 65_536
_GIF_SIGNATURES = (b"GIF87a", b"GIF89a")

# Classic TIFF, little- and big-endian, and BigTIFF (which Pillow reads too).
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Strips or tiles of a TIFF's first image. Pillow makes a Python tile of each uncompressed strip when it opens the
# file, and decodes them one by one: 2.4 million one-row strips (19 MB) took 4.8 s to open and 23 s and 890 MB in
# all, and were accepted. A photo has a few hundred (a 40-megapixel image of 256 x 256 tiles: ~600; one row per strip:
# one per row); 50,000 bounds Pillow's work to some 0.3 s.
MAX_TIFF_PARTS = 50_000
_TIFF_STRIP_OFFSETS, _TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH, _TIFF_TILE_OFFSETS = 273, 322, 323, 324

# EXIF orientation (tag 0x0112) -> the transpose that shows the stored pixels as a viewer does.
_ORIENTATION_TAG = 0x0112
_UPRIGHT = {
    2: PILImage.Transpose.FLIP_LEFT_RIGHT,
    3: PILImage.Transpose.ROTATE_180,
    4: PILImage.Transpose.FLIP_TOP_BOTTOM,
    5: PILImage.Transpose.TRANSPOSE,
    6: PILImage.Transpose.ROTATE_270,
    7: PILImage.Transpose.TRANSVERSE,
    8: PILImage.Transpose.ROTATE_90,
}

_SWAPS_SIDES = {
    PILImage.Transpose.TRANSPOSE,
    PILImage.Transpose.ROTATE_270,
    PILImage.Transpose.TRANSVERSE,
    PILImage.Transpose.ROTATE_90,
}

# Image formats facegate does not decode, recognised by their first bytes (named as Pillow names them, plus HEIF/HEIC
# and JPEG XL, photo formats Pillow cannot read) so that the client knows to convert rather than being told the
# photo is not an image. No parser of these formats runs: some are slow on hostile data (Pillow's EPS reader reads a
# 20 MB file line by line: 19 s), and the point of the allow-list is that they are not attack surface.

_SIGNATURES: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    ("JPEG XL", (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")),
    ("EPS", (b"%!PS", b"\xc5\xd0\xd3\xc6")),  # PostScript text, or the binary header of DOS EPS
    ("PSD", (b"8BPS",)),
    ("JPEG2000", (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  \r\n\x87\n")),
    ("ICNS", (b"icns",)),
    ("QOI", (b"qoif",)),
    ("DDS", (b"DDS ",)),
    ("BLP", (b"BLP1", b"BLP2")),
    ("FITS", (b"SIMPLE  =",)),
    ("XPM", (b"/* XPM */",)),
    ("XVTHUMB", (b"P7 332",)),
    ("SUN", (b"\x59\xa6\x6a\x95",)),
    ("DCX", (b"\xb1\x68\xde\x3a",)),
    ("FTEX", (b"FTEX",)),
    ("MSP", (b"DanM", b"LinS")),
    ("PIXAR", (b"\x80\xe8\x00\x00",)),
    ("WMF", (b"\xd7\xcd\xc6\x9a",)),  # placeable WMF (EMF: below)
    ("MPEG", (b"\x00\x00\x01\xb3",)),
    ("GRIB", (b"GRIB",)),
    ("BUFR", (b"BUFR",)),
    ("HDF5", (b"\x89HDF\r\n\x1a\n",)),
    ("IM", (b"Image type:",)),  # the first header line Pillow's IM writer puts
)
# ISO-BMFF major brands of HEIF (HEIC is the iPhone's default; AVIF's is "avif") and their media types (ISO/IEC
# 23008-12 Annex C: HEVC-coded images and sequences; mif1 and msf1 say nothing of the codec).
_HEIF_MEDIA_TYPES = {
    b"heic": "image/heic",
    b"heix": "image/heic",
    b"heim": "image/heic",
    b"heis": "image/heic",
    b"hevc": "image/heic-sequence",
    b"hevx": "image/heic-sequence",
    b"hevm": "image/heic-sequence",  # multiview
    b"hevs": "image/heic-sequence",  # scalable
    b"mif1": "image/heif",
    b"msf1": "image/heif-sequence",
}
_HEIF_NAME = "HEIF/HEIC"  # `details.format` of a HEIF refused
_XBM = re.compile(rb"\s{0,16}#define[ \t]+\S*_width[ \t]+[0-9]+")
# Netpbm: "P1".."P6" or "Pf", white space (and comment lines), then the width.
_PNM = re.compile(rb"P[1-6f]\s+(?:#[^\n]*\n\s*)*[0-9]")

_WITH_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def decode_image(data: bytes, *, max_pixels: int, heic: bool = False) -> Image:
    """Decode an uploaded photo.

    data: the file's bytes (JPEG, PNG, GIF, WebP, AVIF, BMP or TIFF; HEIC/HEIF with `heic`).
    max_pixels: refuse images with more pixels than this (width x height, checked before decoding).
    heic: decode HEIC/HEIF too (needs pi-heif, the `heic` extra); otherwise it raises UnsupportedImage.
    Returns a C-contiguous, read-only H x W x 3 uint8 RGB array, upright (EXIF orientation applied).
    Raises InvalidImage (empty, not an image, truncated or corrupt, unsupported mode, too costly a structure),
    UnsupportedImage (an image in another format) or ImageTooLarge.
    """
    if not data:
        raise InvalidImage("the upload is empty: no image data")
    return _decode(data, max_pixels=max_pixels, heic=heic).pixels


def decode_to_fit(
    data: bytes, *, max_pixels: int, longest: int, heic: bool = False, refuse: Callable[[int, int], None] | None = None
) -> SizedImage:
    """`decode_image` for a caller that shrinks the photo to a longer side of `longest` pixels anyway (the
    detector's working copy): a JPEG at least twice that size is decoded at the smallest of libjpeg's scales 1/2,
    1/4 and 1/8 that still leaves both sides at least as long as the shrunk photo's. A 12-megapixel phone photo then
    decodes at 1/2 scale (about 2.7x faster) and a 40-megapixel one at 1/4, into 1/16 of the memory. Other formats
    (HEIF included: libheif has no reduced scale), and lossless JPEGs, are decoded whole. The result gives the photo's
    own upright size beside the pixels. `refuse`, given the photo's width and height from its header (as stored:
    its EXIF orientation is not applied yet), may raise to refuse it before any pixel is decoded."""
    if not data:
        raise InvalidImage("the upload is empty: no image data")
    if longest < 1:
        raise ValueError(f"longest must be at least 1, got {longest}")
    return _decode(data, max_pixels=max_pixels, longest=longest, heic=heic, refuse=refuse)


def media_type(data: bytes) -> str:
    """The MIME type of a photo facegate accepted (one of FORMATS, or HEIF), from its header alone; else
    application/octet-stream. A HEIF is named from its brand, without libheif, whatever FACEGATE_IMAGE__HEIC says now:
    a photo stored while it was on keeps its type."""
    heif = _heif_media_type(data)
    if heif is not None:
        return heif
    try:
        with PILImage.open(io.BytesIO(data), formats=FORMATS) as im:
            return PILImage.MIME.get(im.format or "", "application/octet-stream")
    except _DECODE_ERRORS:
        return "application/octet-stream"


def load_image(path: str | Path, *, max_pixels: int, heic: bool = False) -> Image:
    """Decode a photo file as `decode_image` does. A missing or unreadable file raises OSError as usual."""
    return _decode(_read_photo(path), max_pixels=max_pixels, heic=heic).pixels


def load_to_fit(
    path: str | Path, *, max_pixels: int, longest: int, heic: bool = False, refuse: Callable[[int, int], None] | None = None
) -> SizedImage:
    """`decode_to_fit` for a photo file, with `load_image`'s errors."""
    return decode_to_fit(_read_photo(path), max_pixels=max_pixels, longest=longest, heic=heic, refuse=refuse)


def _read_photo(path: str | Path) -> bytes:
    """A photo file's bytes; an empty file is InvalidImage naming it (a missing or unreadable one: OSError)."""
    data = Path(path).read_bytes()
    if not data:
        raise InvalidImage(f"{Path(path).name} is empty: no image data")
    return data


def _decode(
    data: bytes,
    *,
    max_pixels: int,
    longest: int | None = None,
    heic: bool = False,
    refuse: Callable[[int, int], None] | None = None,
) -> SizedImage:
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    limit = min(max_pixels, PILImage.MAX_IMAGE_PIXELS or max_pixels)  # Pillow's bomb guard applies too
    jpeg_frame = None
    if data.startswith(_JPEG_START):
        # before Image.open: Pillow's own header walk is the slow part for some
        jpeg_frame = _check_jpeg_structure(data)
    elif data.startswith(_PNG_SIGNATURE):
        _check_png_structure(data)
    elif data.startswith(_GIF_SIGNATURES):
        _check_gif_structure(data)
    elif data.startswith(_TIFF_SIGNATURES):
        _check_tiff_structure(data, limit)
    try:
        im = PILImage.open(io.BytesIO(data), formats=_formats(heic))  # reads the header only
    except PILImage.DecompressionBombError as exc:
        raise _bomb(exc, limit) from exc
    except UnidentifiedImageError as exc:
        if _is_unreadable_tiff_layout(data):
            raise UnsupportedImage(
                "this TIFF's pixel layout (sample format, bits per sample or colour space, e.g. floating-point colour "
                "or 12-bit samples) is not supported; send an 8- or 16-bit greyscale or RGB TIFF, or JPEG or PNG",
                format="TIFF",
            ) from exc
        unsupported = _unsupported_format(data)
        if unsupported == _HEIF_NAME and heic:
            # pi-heif's plugin turns libheif's reason into a SyntaxError, which Image.open drops
            raise InvalidImage("the HEIF/HEIC image is truncated or corrupt: libheif cannot read it") from exc
        if unsupported is not None:
            raise UnsupportedImage(_unsupported_message(unsupported), format=unsupported) from exc
        raise InvalidImage("the data is not an image in a format we can read") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImage(f"the image is truncated or corrupt: {exc}") from exc
    with im:
        width, height = im.size
        pixels = width * height
        if pixels > limit:
            raise ImageTooLarge(
                f"the image is {width}x{height} = {pixels:,} pixels; at most {limit:,} are accepted",
                width=width,
                height=height,
                max_pixels=limit,
            )
        if pixels == 0:
            raise InvalidImage(f"the image is empty ({width}x{height})")
        if refuse is not None:
            refuse(width, height)
        if im.format == "BMP" and im.info.get("compression") in _BMP_RLE:
            _check_rle_bmp(_BMP_RLE[im.info["compression"]], width, height, len(data))
        if (
            longest is not None
            and im.format in ("JPEG", "MPO")
            and jpeg_frame in _JPEG_SCALABLE_FRAMES
            and max(width, height) >= 2 * longest
        ):
            # Pillow picks the largest scale-down that keeps both sides at least the requested ones: the
            # shrunk photo's sides (rounded up), so the detector's resize still only shrinks.
            ratio = longest / max(width, height)
            im.draft(None, (math.ceil(width * ratio), math.ceil(height * ratio)))
        try:
            im.load()  # decodes the first frame completely; truncated data raises here
        except PILImage.DecompressionBombError as exc:
            raise _bomb(exc, limit) from exc
        except _DECODE_ERRORS as exc:
            raise InvalidImage(f"the image data is truncated or corrupt: {exc}") from exc
        # libheif has applied the HEIF's rotation and mirroring already (and pi-heif set its EXIF orientation to 1)
        method = None if im.format == HEIF else _orientation(im)
        upright = im if method is None else im.transpose(method)
        if method in _SWAPS_SIDES:
            width, height = height, width
        try:
            return SizedImage(_to_rgb(upright), width, height)
        except ValueError as exc:
            raise InvalidImage(f"unsupported image mode {upright.mode}: {exc}") from exc


def _bomb(exc: PILImage.DecompressionBombError, limit: int) -> ImageTooLarge:
    """ImageTooLarge for Pillow's refusal of a header far over its own limit, told in facegate's limit: Pillow's
    message names its MAX_IMAGE_PIXELS (178,956,970), which is not the limit a client is held to."""
    found = re.search(r"\((\d+) pixels\)", str(exc))  # "Image size (N pixels) exceeds limit of ..."
    size = f" ({int(found.group(1)):,} pixels)" if found else ""
    return ImageTooLarge(f"the image is too large{size}; at most {limit:,} pixels are accepted", max_pixels=limit)


def _formats(heic: bool) -> tuple[str, ...]:
    """The Pillow plugins Image.open may run on an upload: FORMATS, and pi-heif's HEIF plugin when `heic`. The
    plugin is registered with Pillow on the first such call, for the whole process; a caller without `heic` never
    names it, so its data never reaches libheif (and a process that never enables HEIC never loads it)."""
    if not heic:
        return FORMATS
    import pi_heif  # here: only a process that decodes HEIC loads libheif (the settings checked that it can)

    with _HEIF_LOCK:
        if PILImage.OPEN.get(HEIF, (None, None))[0] is not pi_heif.HeifImageFile:
            # Thumbnails, depth maps and auxiliary images are never decoded here: not even listed when a file is
            # opened. (The alpha plane is libheif's to decode with the image.)
            pi_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
    return (*FORMATS, HEIF)


@functools.cache
def _heif_installed() -> bool:
    return importlib.util.find_spec("pi_heif") is not None


def _unsupported_message(name: str) -> str:
    if name != _HEIF_NAME:
        return f"{name} images are not supported; send JPEG, PNG, WebP, AVIF, GIF, BMP or TIFF"
    enable = "FACEGATE_IMAGE__HEIC=true"
    if not _heif_installed():
        enable += " and facegate's `heic` extra (pi-heif)"
    return (
        f"HEIF/HEIC images are not decoded by this server (its operator can enable them with {enable}); send JPEG, "
        "PNG, WebP, AVIF, GIF, BMP or TIFF"
    )


def _heif_media_type(data: bytes) -> str | None:
    """The media type of a HEIF, from its `ftyp` box's major brand (None: not a HEIF)."""
    return _HEIF_MEDIA_TYPES.get(data[8:12]) if data[4:8] == b"ftyp" else None


def _check_jpeg_structure(data: bytes) -> int | None:
    """The start-of-frame marker code of the JPEG's first picture (how it is coded; None if it has none), after
    refusing JPEG data whose first picture (the one decoded; an MPO's others and anything after its EOI, such as a
    phone's motion-photo video, are not) has more than MAX_JPEG_SCANS scans, more than MAX_JPEG_MARKERS markers, more
    than MAX_JPEG_JUNK bytes outside any segment before its first scan, or a longer run of fill bytes after it.

    The segments are followed by their lengths, as libjpeg reads them, so the payload of an APPn segment (an EXIF
    thumbnail is a whole JPEG) is never mistaken for markers; a scan's entropy-coded data is skipped by a search for
    the next marker. At most MAX_JPEG_MARKERS + 1 steps, each a length read or a search in C (about 1 ms per MB of
    photo data, some 20 ms per MB at worst), and the header's junk is searched no further than its limit.
    """
    scans = markers = junk = 0
    frame = None
    pos = 2  # after SOI
    scan_data_at = picture_end = len(data)
    while True:
        # before the first scan a header marker is expected at pos: look no further than the junk allowed
        end = len(data) if scans else min(len(data), pos + MAX_JPEG_JUNK - junk + 2)
        found = _JPEG_NEXT_MARKER.search(data, pos, end)
        if scans == 0:
            junk += max(0, (end if found is None else found.start()) - pos)
            if junk > MAX_JPEG_JUNK:
                raise InvalidImage(
                    f"the JPEG has more than {MAX_JPEG_JUNK:,} bytes of padding or junk between its header segments",
                    max_junk_bytes=MAX_JPEG_JUNK,
                )
        if found is None:
            break  # no end marker: the decoder will say the data is truncated
        code = data[found.start() + 1]
        if code == _JPEG_EOI:
            picture_end = found.start()
            break
        markers += 1
        if markers > MAX_JPEG_MARKERS:
            raise InvalidImage(
                f"the JPEG has more than {MAX_JPEG_MARKERS:,} markers (segments and scans); a photo has a few dozen",
                max_markers=MAX_JPEG_MARKERS,
            )
        pos = found.end()
        if code in _JPEG_NO_LENGTH:
            continue
        if code in _JPEG_FRAMES and frame is None:
            frame = code
        if code == _JPEG_SOS:
            scans += 1
            scan_data_at = min(scan_data_at, pos)
            if scans > MAX_JPEG_SCANS:
                raise InvalidImage(
                    f"the JPEG has more than {MAX_JPEG_SCANS} scans (progressive passes; a photo has about 10):"
                    " too costly to decode",
                    max_scans=MAX_JPEG_SCANS,
                )
        pos += int.from_bytes(data[pos : pos + 2], "big")  # the length counts its own 2 bytes
    if data.find(_JPEG_FILL_RUN, scan_data_at, picture_end) >= 0:
        raise InvalidImage(
            f"the JPEG has a run of more than {MAX_JPEG_JUNK:,} fill bytes (0xFF) in its image data",
            max_junk_bytes=MAX_JPEG_JUNK,
        )
    return frame


def _check_png_structure(data: bytes) -> None:
    """Refuse a PNG with more than MAX_PNG_CHUNKS chunks before IEND, following the chunks by their lengths (a
    truncated or malformed chain is left to the decoder, which says so)."""
    pos, chunks, inflated = len(_PNG_SIGNATURE), 0, 0
    while pos + 8 <= len(data):
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise InvalidImage(
                f"the PNG has more than {MAX_PNG_CHUNKS:,} chunks; a photo has a few dozen: too costly to read",
                max_chunks=MAX_PNG_CHUNKS,
            )
        kind = data[pos + 4 : pos + 8]
        if kind == b"IEND":
            return
        if kind in _PNG_INFLATED:
            inflated += 1
            if inflated > MAX_PNG_INFLATED_CHUNKS:
                raise InvalidImage(
                    f"the PNG has more than {MAX_PNG_INFLATED_CHUNKS} compressed metadata chunks (ICC profile, "
                    "zTXt, iTXt); a photo has a few: too costly to read",
                    max_metadata_chunks=MAX_PNG_INFLATED_CHUNKS,
                )
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")  # length, type, data, CRC


def _check_tiff_structure(data: bytes, max_pixels: int) -> None:
    """Refuse a TIFF whose first image is cut into more than MAX_TIFF_PARTS strips or tiles, or whose tiles are
    larger than the whole image may be (libtiff allocates a whole tile to decode it: a 206-byte file declaring one
    32768 x 16368 tile for 16 x 16 pixels took 2.1 GB), from its first directory's entries alone (counts and tile
    sizes; a truncated or malformed directory is left to the decoder, which says so)."""
    order = "<" if data[:2] == b"II" else ">"
    # Where the first directory's offset is, and the formats of that offset, the directory's entry count and an
    # entry's count; an entry's size. BigTIFF has 8-byte offsets and counts, and 20-byte entries.
    big = data[2:4] in (b"+\x00", b"\x00+")
    offset_at, offset, entry_count, count, entry_size = (8, "Q", "Q", "Q", 20) if big else (4, "I", "H", "I", 12)
    if len(data) < offset_at + struct.calcsize(offset):
        return
    at = struct.unpack_from(order + offset, data, offset_at)[0]
    first = at + struct.calcsize(entry_count)
    if first > len(data):
        return
    entries = struct.unpack_from(order + entry_count, data, at)[0]
    parts, tile = 0, [0, 0]
    for i in range(min(entries, (len(data) - first) // entry_size)):
        where = first + i * entry_size
        tag, kind = struct.unpack_from(order + "HH", data, where)
        values = struct.unpack_from(order + count, data, where + 4)[0]
        if tag in (_TIFF_STRIP_OFFSETS, _TIFF_TILE_OFFSETS):
            parts = max(parts, values)
        elif tag in (_TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH) and values == 1 and kind in (3, 4, 16):  # SHORT, LONG, LONG8
            value_format = {3: "H", 4: "I", 16: "Q"}[kind]
            value_at = where + 4 + struct.calcsize(count)  # after the tag, type and count
            tile[tag - _TIFF_TILE_WIDTH] = struct.unpack_from(order + value_format, data, value_at)[0]
    if parts > MAX_TIFF_PARTS:
        raise InvalidImage(
            f"the TIFF's image is cut into {parts:,} strips or tiles; a photo has a few hundred, at most "
            f"{MAX_TIFF_PARTS:,} are accepted: too costly to read",
            max_parts=MAX_TIFF_PARTS,
        )
    if tile[0] * tile[1] > max_pixels:
        raise InvalidImage(
            f"the TIFF's tiles are {tile[0]}x{tile[1]} = {tile[0] * tile[1]:,} pixels each, more than a whole image "
            f"may have ({max_pixels:,})",
            max_pixels=max_pixels,
        )


def _check_gif_structure(data: bytes) -> None:
    """Refuse a GIF with more than MAX_GIF_BLOCKS extension blocks and sub-blocks before its first image, following
    them by their lengths (a truncated or malformed chain is left to the decoder, which says so)."""
    if len(data) < 13:
        return
    flags = data[10]  # of the logical screen descriptor: bit 7, a global colour table of 2^(bits 0-2 + 1) entries
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks = 0
    while pos < len(data) and data[pos] == 0x21:  # an extension: introducer, label, then sub-blocks up to a 0 size
        pos += 2
        while pos < len(data):
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise InvalidImage(
                    f"the GIF has more than {MAX_GIF_BLOCKS:,} extension blocks before its image; a photo has a few: "
                    "too costly to read",
                    max_blocks=MAX_GIF_BLOCKS,
                )
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break


def _check_rle_bmp(compression: str, width: int, height: int, size: int) -> None:
    """Refuse an RLE-compressed BMP too large for Pillow's Python decoder (MAX_RLE_BMP_PIXELS, MAX_RLE_BMP_BYTES)."""
    if width * height > MAX_RLE_BMP_PIXELS or size > MAX_RLE_BMP_BYTES:
        raise ImageTooLarge(
            f"the BMP is {compression}-compressed ({width}x{height}, {size:,} bytes): at most {MAX_RLE_BMP_PIXELS:,}"
            f" pixels and {MAX_RLE_BMP_BYTES:,} bytes are accepted in that encoding; send PNG or an uncompressed BMP",
            width=width,
            height=height,
            max_pixels=MAX_RLE_BMP_PIXELS,
            max_bytes=MAX_RLE_BMP_BYTES,
        )


def _orientation(im: PILImage.Image) -> PILImage.Transpose | None:
    """The transpose that shows the stored pixels as a viewer does, from the EXIF orientation tag (None: as stored).

    Only the tag is read: ImageOps.exif_transpose also rewrites the EXIF block without the tag, and fails on a
    malformed tag elsewhere in it (an ImageDescription stored as a RATIONAL), which would leave a sideways phone photo
    sideways. EXIF that cannot be parsed at all means no orientation.
    """
    try:
        orientation = im.getexif().get(_ORIENTATION_TAG)
    except (*_DECODE_ERRORS, AttributeError):
        return None
    return _UPRIGHT.get(orientation) if isinstance(orientation, int) else None


def _is_unreadable_tiff_layout(data: bytes) -> bool:
    """Whether data is a TIFF that no reader opened because Pillow does not decode its pixel layout (an RGB of 32-bit
    floats, 12-bit samples, ...): a real TIFF, so 415 like any other unsupported image, not 422 "not an image".
    Image.open drops its readers' reasons, so the TIFF reader runs again (on the header only, as Image.open did)."""
    if not data.startswith(_TIFF_SIGNATURES):
        return False
    try:
        TiffImagePlugin.TiffImageFile(io.BytesIO(data)).close()
    except SyntaxError as exc:
        return str(exc) == "unknown pixel mode"
    except _DECODE_ERRORS:
        return False
    return False


def _unsupported_format(data: bytes) -> str | None:
    """The name of the image format of data that none of `FORMATS` opened, from its first bytes alone, if they are
    those of an image format. Formats without a signature, which Pillow recognises only by running its parser on
    anything (SPIDER, IPTC, IMT, McIDAS, DIB, GIMP brushes), are not named: to facegate they are not images."""
    head = data[:64]
    if _heif_media_type(head) is not None:
        return _HEIF_NAME
    for name, signatures in _SIGNATURES:
        if head.startswith(signatures):
            return name
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and head[4:6] != b"\x00\x00":  # reserved, type, count
        return "ICO" if head[2] == 1 else "CUR"
    if head[:4] == b"\x01\x00\x00\x00" and head[40:44] == b" EMF":  # EMF: Pillow's WMF reader opens both
        return "WMF"
    if _PNM.match(head):
        return "PPM"  # PBM, PGM, PPM (ASCII or binary) and PFM
    if head[:2] == b"\x01\xda" and head[2] in (0, 1) and head[3] in (1, 2):  # SGI: magic, storage, bytes per channel
        return "SGI"
    if head[:1] == b"\x0a" and len(head) >= 4 and head[1] in (0, 2, 3, 4, 5) and head[3] in (1, 2, 4, 8):
        return "PCX"  # manufacturer 10, version, encoding, bits per pixel
    if len(head) >= 16 and head[4:6] in (b"\x11\xaf", b"\x12\xaf") and head[14:16] in (b"\x00\x00", b"\x03\x00"):
        return "FLI"  # FLI/FLC animation: magic at 4, flags at 14
    if _XBM.match(data[:512]):
        return "XBM"
    if _is_tga(head):
        return "TGA"
    return None


def _is_tga(head: bytes) -> bool:
    """Whether an 18-byte TGA header (the format has no signature) is plausible, as Pillow's TGA reader checks it: a
    colour map type of 0 or 1, a known image type, a non-zero size and a known depth."""
    if len(head) < 18:
        return False
    width, height = struct.unpack_from("<HH", head, 12)
    return (
        head[1] in (0, 1)
        and head[2] in (1, 2, 3, 9, 10, 11)
        and width > 0
        and height > 0
        and head[16] in (1, 8, 16, 24, 32)
    )


def _to_rgb(im: PILImage.Image) -> Image:
    mode = im.mode
    if mode == "RGB":
        rgb = np.asarray(im)
    elif mode in _SIXTEEN_BIT or mode == "I":
        grey = np.asarray(im)
        rgb = _by_rows(grey, _grey_to_8bit)
        key = im.info.get("transparency")
        if isinstance(key, int):  # a 16-bit grey tRNS entry: that exact value is transparent, composited on white
            rgb[grey == key] = 255
    elif mode == "F":
        values = np.asarray(im, dtype=np.float32)
        blocks = _row_blocks(values) if values.size else []
        largest = max((float(_finite(values[rows]).max()) for rows in blocks), default=0.0)
        scale = 255.0 if largest <= 1.0 else 1.0  # values in 0..1
        rgb = _by_rows(values, lambda block: _float_to_8bit(block, scale))
    elif mode in _WITH_ALPHA or "transparency" in im.info:
        rgb = _by_rows(np.asarray(im.convert("RGBA")), _composite_on_white)
    else:
        rgb = np.asarray(im.convert("RGB"))  # L, 1, P, CMYK, YCbCr, RGBX, LAB, HSV, ...
    out: npt.NDArray[np.uint8] = np.ascontiguousarray(rgb, dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3:
        raise ValueError(f"conversion gave shape {out.shape}")
    out.flags.writeable = False
    return out


# Rows converted at once: the conversions' wide intermediates (int64, float32) of a whole 40-megapixel photo took
# ~1 GB beside it; a block of rows keeps them to a few MB.
_ROW_BLOCK_PIXELS = 1 << 20


def _by_rows(pixels: npt.NDArray[Any], convert: Callable[[npt.NDArray[Any]], npt.NDArray[np.uint8]]) -> Image:
    """`convert` (an H x W [x C] block -> H x W x 3 uint8) applied a block of rows at a time."""
    out = np.empty((*pixels.shape[:2], 3), np.uint8)
    for rows in _row_blocks(pixels):
        out[rows] = convert(pixels[rows])
    return out


def _row_blocks(pixels: npt.NDArray[Any]) -> list[slice]:
    height, width = pixels.shape[:2]
    step = max(1, _ROW_BLOCK_PIXELS // max(1, width))
    return [slice(top, top + step) for top in range(0, height, step)]


def _finite(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)


def _grey_to_8bit(grey: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    wide = grey.astype(np.int64)
    grey8 = ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)  # round(v / 257): 65535 -> 255
    return np.repeat(grey8[:, :, None], 3, axis=2)


def _float_to_8bit(block: npt.NDArray[np.float32], scale: float) -> npt.NDArray[np.uint8]:
    values = _finite(block)
    if scale != 1.0:
        values = values * scale
    grey8 = np.floor(np.clip(values, 0.0, 255.0) + 0.5).astype(np.uint8)
    return np.repeat(grey8[:, :, None], 3, axis=2)


def _composite_on_white(block: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    rgba = block.astype(np.uint16)
    alpha = rgba[:, :, 3:4]
    # alpha-composite on white, rounded: c * a / 255 + 255 * (255 - a) / 255
    return ((rgba[:, :, :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
