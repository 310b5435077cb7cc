"""Photo bytes -> H x W x 3 uint8 RGB array, with Pillow.

What decoding guarantees:

* Only photo formats are decoded: JPEG (and MPO, the multi-picture JPEG of many cameras), PNG (and APNG), GIF, WebP,
  AVIF, BMP and TIFF (`FORMATS`). Pillow reads some 40 formats; every parser is attack surface and some hand the data
  to other programs (EPS runs Ghostscript), so any other image Pillow recognises (PSD, EPS, ICO, TGA, ...) and HEIC/HEIF
  or JPEG XL, which it does not read, raise `UnsupportedImage`; anything else raises `InvalidImage`.
* The pixel count is checked from the header, before any pixel is decoded: more than `max_pixels` raises
  `ImageTooLarge`. Pillow's own decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`, left at its default) also applies:
  images over it are refused with `ImageTooLarge` too (Pillow raises `DecompressionBombError` above twice that limit
  and warns above it; facegate refuses both cases), so the effective limit is min(max_pixels, MAX_IMAGE_PIXELS).
* The whole image is decoded: truncated or corrupt data raises `InvalidImage` (Pillow's global
  `LOAD_TRUNCATED_IMAGES` is never set, so missing data is never filled in silently).
* The EXIF orientation tag is applied, so the array is upright as a viewer shows it.
* Animated images (GIF, APNG, WebP, multi-page TIFF) give their first frame.
* Colour modes: greyscale and 1-bit are replicated to RGB; palettes are expanded; CMYK and YCbCr use Pillow's
  conversion; 16-bit greyscale (I;16*) and 32-bit integer (I) images are scaled from 0..65535 to 0..255 with
  rounding (v / 257; I values outside 0..65535 are clipped), 32-bit float (F) images from 0..1 when their maximum is
  at most 1, else they are clipped to 0..255. Transparency (an alpha channel, or a palette/grey tRNS entry) is
  composited on **white**: the colour under fully transparent pixels is undefined content (often black), while white
  is what most viewers show, so a face cut out on a transparent background is seen on a plain light background.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError

from app.errors import ImageTooLarge, InvalidImage, UnsupportedImage
from app.vision.types import Image

# Pillow plugin ids of the formats decoded (JPEG also opens MPO files).
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF")
# ISO-BMFF brands of HEIF (HEIC is the iPhone's default) and the JPEG XL signatures: photo formats Pillow cannot read,
# named so that the client knows to convert rather than being told the photo is not an image.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_JXL_SIGNATURES = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")

# Errors Pillow's decoders raise for malformed or truncated data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError)

_WITH_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def decode_image(data: bytes, *, max_pixels: int) -> Image:
    """Decode an uploaded photo.

    data: the file's bytes (JPEG, PNG, GIF, WebP, BMP, TIFF, ... anything Pillow reads).
    max_pixels: refuse images with more pixels than this (width x height, checked before decoding).
    Returns a C-contiguous, read-only H x W x 3 uint8 RGB array, upright (EXIF orientation applied).
    Raises InvalidImage (empty, not an image, truncated or corrupt, unsupported mode) or ImageTooLarge.
    """
    if not data:
        raise InvalidImage("the upload is empty: no image data")
    return _decode(io.BytesIO(data), max_pixels=max_pixels)


def media_type(data: bytes) -> str:
    """The MIME type of a photo facegate accepted (one of FORMATS), from its header alone; else
    application/octet-stream."""
    try:
        with PILImage.open(io.BytesIO(data), formats=FORMATS) as im:
            return PILImage.MIME.get(im.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError, ValueError):
        return "application/octet-stream"


def load_image(path: str | Path, *, max_pixels: int) -> Image:
    """Decode a photo file as `decode_image` does. A missing or unreadable file raises OSError as usual."""
    with Path(path).open("rb") as f:
        if f.seek(0, io.SEEK_END) == 0:
            raise InvalidImage(f"{Path(path).name} is empty: no image data")
        f.seek(0)
        return _decode(f, max_pixels=max_pixels)


def _decode(stream: IO[bytes], *, max_pixels: int) -> Image:
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    try:
        im = PILImage.open(stream, formats=FORMATS)  # reads the header only
    except PILImage.DecompressionBombError as exc:
        raise ImageTooLarge(f"the image has too many pixels ({exc})", max_pixels=max_pixels) from exc
    except UnidentifiedImageError as exc:
        unsupported = _unsupported_format(stream)
        if unsupported is not None:
            raise UnsupportedImage(
                f"{unsupported} images are not supported; send JPEG, PNG, WebP, AVIF, GIF, BMP or TIFF",
                format=unsupported,
            ) from exc
        raise InvalidImage("the data is not an image in a format we can read") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImage(f"the image is truncated or corrupt: {exc}") from exc
    with im:
        width, height = im.size
        pixels = width * height
        limit = min(max_pixels, PILImage.MAX_IMAGE_PIXELS or max_pixels)
        if pixels > limit:
            raise ImageTooLarge(
                f"the image is {width}x{height} = {pixels:,} pixels; at most {limit:,} are accepted",
                width=width,
                height=height,
                max_pixels=limit,
            )
        if pixels == 0:
            raise InvalidImage(f"the image is empty ({width}x{height})")
        try:
            im.load()  # decodes the first frame completely; truncated data raises here
        except PILImage.DecompressionBombError as exc:
            raise ImageTooLarge(f"the image has too many pixels ({exc})", max_pixels=max_pixels) from exc
        except _DECODE_ERRORS as exc:
            raise InvalidImage(f"the image data is truncated or corrupt: {exc}") from exc
        try:
            upright = ImageOps.exif_transpose(im)
        except _DECODE_ERRORS:
            upright = im  # unreadable EXIF: keep the pixels as stored rather than refusing the photo
        try:
            return _to_rgb(upright)
        except ValueError as exc:
            raise InvalidImage(f"unsupported image mode {upright.mode}: {exc}") from exc


def _unsupported_format(stream: IO[bytes]) -> str | None:
    """The name of the image format of data that none of `FORMATS` opened, if it is an image format at all."""
    stream.seek(0)
    head = stream.read(32)
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:  # the major brand (AVIF's is "avif")
        return "HEIF/HEIC"
    if head.startswith(_JXL_SIGNATURES):
        return "JPEG XL"
    stream.seek(0)
    try:
        with PILImage.open(stream) as other:  # any Pillow format; the header only: nothing of it is decoded
            return str(other.format)
    except Exception:  # noqa: BLE001 - not recognised by any parser, whatever it raised: simply not an image
        return None


def _to_rgb(im: PILImage.Image) -> Image:
    mode = im.mode
    if mode == "RGB":
        rgb = np.asarray(im)
    elif mode in _SIXTEEN_BIT or mode == "I":
        grey = np.asarray(im).astype(np.int64)
        grey8 = ((np.clip(grey, 0, 65535) + 128) // 257).astype(np.uint8)  # round(v / 257): 65535 -> 255
        rgb = np.repeat(grey8[:, :, None], 3, axis=2)
    elif mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and float(values.max()) <= 1.0:
            values = values * 255.0
        grey8 = np.floor(np.clip(values, 0.0, 255.0) + 0.5).astype(np.uint8)
        rgb = np.repeat(grey8[:, :, None], 3, axis=2)
    elif mode in _WITH_ALPHA or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA")).astype(np.uint16)
        alpha = rgba[:, :, 3:4]
        # alpha-composite on white, rounded: c * a / 255 + 255 * (255 - a) / 255
        rgb = ((rgba[:, :, :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    else:
        rgb = np.asarray(im.convert("RGB"))  # L, 1, P, CMYK, YCbCr, RGBX, LAB, HSV, ...
    out: npt.NDArray[np.uint8] = np.ascontiguousarray(rgb, dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3:
        raise ValueError(f"conversion gave shape {out.shape}")
    out.flags.writeable = False
    return out
