"""The MMOD detector's input: dlib's tiled image pyramid and its bilinear resize, reproduced bit for bit.

dlib's `input_rgb_image_pyramid<pyramid_down<6>>` shrinks the photo by 5/6 per level and packs all levels
into one image (the larger levels one under another, the smaller ones to the right of the lower part),
so that the fully convolutional network scans every scale in one pass. Each level is resized from the
previous level's already-normalised float plane with dlib's `resize_image`, whose SIMD arithmetic
(float32 column positions accumulated four at a time, float32 weights) is replayed here so that the
tensor is identical to dlib's. See docs/dlib-models.md sections 9.3 and 9.7.

The float planes are blended by two small numba kernels (one loop over the output pixels, ~2.5x faster
than the equivalent numpy gathers, which need a dozen full passes over memory per level); the positions
and weights are still computed with numpy. The 8-bit resize used for upsampling shares the blend kernel.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit

from app.vision.types import Box, Image

PYRAMID_RATE = 6  # pyramid_down<6>: each level is 5/6 of the previous one
PADDING = 10  # pixels between levels
OUTER_PADDING = 11  # pixels around the whole tiled image
MIN_LEVEL_HEIGHT = 5

F32 = np.float32
Plane = npt.NDArray[np.float32]  # C x H x W


@dataclass(frozen=True, slots=True)
class PyramidLayout:
    """Where each pyramid level sits in the tiled image (inclusive corners; level i is 5/6^i of the photo)."""

    levels: tuple[Box, ...]
    rows: int
    cols: int


def level_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """(height, width) of every pyramid level, the photo first (dlib's find_pyramid_down_output_image_size)."""
    if height * width == 0:
        return []
    rate = (PYRAMID_RATE - 1.0) / PYRAMID_RATE
    sizes = [(height, width)]
    while True:
        height, width = math.floor(rate * height), math.floor(rate * width)
        if height * width == 0 or height < MIN_LEVEL_HEIGHT:
            return sizes
        sizes.append((height, width))


def _u64(value: int) -> int:
    """C++ unsigned long arithmetic: negative results wrap around."""
    return value % (1 << 64)


def tiled_layout(height: int, width: int, *, padding: int = PADDING, outer: int = OUTER_PADDING) -> PyramidLayout:
    """dlib's compute_tiled_image_pyramid_details, including its unsigned comparisons."""
    sizes = level_sizes(height, width)
    if not sizes:
        return PyramidLayout((), 0, 0)
    total = sum(h + padding for h, _ in sizes) - 2 * padding
    column_height = 0
    prev_width = 0
    for h, w in sizes:
        # Stop the first column once the next level fits beside the previous one and the column is tall
        # enough to double back; rectangle::width()/height() are unsigned in dlib, hence the wrapping.
        if w <= _u64(width - prev_width - padding) and _u64((column_height - height) * 2) >= _u64(total - height):
            break
        column_height += h + padding
        prev_width = w
    column_height -= padding
    rows, cols = column_height + 2 * outer, width + 2 * outer

    levels: list[Box] = []
    y = outer
    while y < column_height + outer and len(levels) < len(sizes):
        h, w = sizes[len(levels)]
        levels.append(Box(outer, y, outer + w - 1, y + h - 1))
        y += h + padding
    y -= padding
    first = levels[0] if levels else None
    while len(levels) < len(sizes):
        h, w = sizes[len(levels)]
        right, bottom = outer + width - 1, y - 1
        rect = Box(right - w + 1, bottom - h + 1, right, bottom)
        if first is not None and _intersects(first, rect):
            break  # dlib drops the remaining levels rather than overlap the photo
        levels.append(rect)
        y -= h + padding
    return PyramidLayout(tuple(levels), rows, cols)


def _intersects(a: Box, b: Box) -> bool:
    return max(a.left, b.left) <= min(a.right, b.right) and max(a.top, b.top) <= min(a.bottom, b.bottom)


# ----------------------------------------------------------------------------------------------------------
# dlib's bilinear resize ("align corners"), SIMD path and scalar tail


@dataclass(frozen=True, slots=True)
class _Rows:
    top: npt.NDArray[np.intp]
    bottom: npt.NDArray[np.intp]
    frac: npt.NDArray[np.float64]  # double, used by the scalar tail
    frac32: npt.NDArray[np.float32]  # (float)frac, used by the SIMD path
    inv32: npt.NDArray[np.float32]  # (float)(1 - frac)


@dataclass(frozen=True, slots=True)
class _Cols:
    left: npt.NDArray[np.intp]  # SIMD columns (right = left + 1)
    frac: npt.NDArray[np.float32]
    inv: npt.NDArray[np.float32]
    tail_left: npt.NDArray[np.intp]  # scalar columns
    tail_right: npt.NDArray[np.intp]
    tail_frac: npt.NDArray[np.float64]  # double x - left


def _scale(n_in: int, n_out: int) -> float:
    return (n_in - 1) / float(max(n_out - 1, 1))


# The weights depend only on the two sizes, and a service sees few photo sizes: computing them took ~0.8 ms of a
# 640x480 photo's ~4-9 ms pyramid (24 levels, numpy calls on short arrays). Cached read-only (shared by threads);
# each entry holds a few arrays as long as the level, so 512 of each bound the cache to a few MB.
_WEIGHT_CACHE = 512


def _read_only(*arrays: npt.NDArray[Any]) -> None:
    for array in arrays:
        array.flags.writeable = False


@functools.lru_cache(maxsize=_WEIGHT_CACHE)
def _rows(n_in: int, n_out: int) -> _Rows:
    scale = _scale(n_in, n_out)
    steps = np.full(n_out + 1, scale)
    steps[0] = -scale
    y = np.cumsum(steps)[1:]  # y += y_scale per row, accumulated in double (cumsum is sequential)
    top = np.floor(y).astype(np.intp)
    frac = y - top
    rows = _Rows(top, np.minimum(top + 1, n_in - 1), frac, frac.astype(F32), (1.0 - frac).astype(F32))
    _read_only(rows.top, rows.bottom, rows.frac, rows.frac32, rows.inv32)
    return rows


@functools.lru_cache(maxsize=_WEIGHT_CACHE)
def _cols(n_in: int, n_out: int) -> _Cols:
    scale = _scale(n_in, n_out)
    # SIMD lanes: float32 positions starting at (float)(-4s + k s), each group adding (float)(4s).
    start = -4 * scale
    groups = n_out // 4 + 2
    acc = np.empty((groups + 1, 4), F32)
    acc[0] = np.array([start, start + scale, start + 2 * scale, start + 3 * scale]).astype(F32)
    acc[1:] = F32(4 * scale)
    pos = np.cumsum(acc, axis=0, dtype=F32)[1:]  # float32 accumulation, lane by lane
    left = pos.astype(np.int32)  # truncation, as _mm_cvttps_epi32
    stop = np.flatnonzero(left[:, 3] + 1 >= n_in)
    n_simd = min(4 * int(stop[0]), n_out)
    pos, left = pos.reshape(-1)[:n_simd], left.reshape(-1)[:n_simd]
    frac = pos - left.astype(F32)
    # Scalar tail: x restarts from -s + c s in double and adds s per column.
    tail = np.full(n_out - n_simd + 1, scale)
    tail[0] = -scale + n_simd * scale
    x = np.cumsum(tail)[1:]
    tail_left = np.floor(x).astype(np.intp)
    cols = _Cols(
        left.astype(np.intp),
        frac,
        F32(1) - frac,
        tail_left,
        np.minimum(tail_left + 1, n_in - 1),
        x - tail_left,
    )
    _read_only(cols.left, cols.frac, cols.inv, cols.tail_left, cols.tail_right, cols.tail_frac)
    return cols


# Compiled on first use (~1-3 s, once per process; Pipeline.load() does it at start). No fastmath: every
# float32 product and sum rounds as dlib's SSE code does (no fused multiply-add, no reordering).
@njit(nogil=True, cache=False, boundscheck=False)
def _blend_kernel(  # pragma: no cover - compiled
    flat: Any, src0: int, dst0: int, stride: int,
    top: Any, bottom: Any, wy0: Any, wy1: Any, left: Any, wx0: Any, wx1: Any,
) -> None:  # fmt: skip
    """dlib's four-column SIMD path for output columns [0, len(left)): weights (float)(wy*wx) and the float32
    sum ((w_tl*TL + w_tr*TR) + w_bl*BL) + w_br*BR. flat: C x N planes; src0/dst0: flat offsets of the
    two rectangles (they may share the buffer, never overlap), stride: row length in flat."""
    for c in range(flat.shape[0]):
        f = flat[c]
        for r in range(top.shape[0]):
            a = src0 + top[r] * stride
            b = src0 + bottom[r] * stride
            o = dst0 + r * stride
            y0 = wy0[r]
            y1 = wy1[r]
            for x in range(left.shape[0]):
                k = left[x]
                v = (y0 * wx0[x]) * f[a + k]
                v = v + (y0 * wx1[x]) * f[a + k + 1]
                v = v + (y1 * wx0[x]) * f[b + k]
                f[o + x] = v + (y1 * wx1[x]) * f[b + k + 1]


@njit(nogil=True, cache=False, boundscheck=False)
def _tail_kernel(  # pragma: no cover - compiled
    flat: Any, src0: int, dst0: int, stride: int,
    top: Any, bottom: Any, fy: Any, left: Any, right: Any, fx: Any, first: int,
) -> None:  # fmt: skip
    """dlib's scalar tail for output columns first..: horizontal blends in float32, the vertical one in double."""
    one = np.float32(1.0)
    for c in range(flat.shape[0]):
        f = flat[c]
        for r in range(top.shape[0]):
            a = src0 + top[r] * stride
            b = src0 + bottom[r] * stride
            o = dst0 + r * stride + first
            y = fy[r]
            for x in range(left.shape[0]):
                wx = np.float32(fx[x])
                ix = one - wx
                upper = ix * f[a + left[x]] + wx * f[a + right[x]]
                lower = ix * f[b + left[x]] + wx * f[b + right[x]]
                f[o + x] = np.float32((1.0 - y) * np.float64(upper) + y * np.float64(lower))


@njit(nogil=True, cache=False, boundscheck=False)
def _normalise_kernel(image: Any, means: Any, out: Any) -> None:  # pragma: no cover - compiled
    """out[c, r, x] = (float(image[r, x, c]) - means[c]) / 256 in float32, as dlib's input layer: one pass over the
    photo (numpy's subtract into the transposed level, then the division, took twice as long)."""
    scale = np.float32(256)
    for r in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                out[c, r, x] = (np.float32(image[r, x, c]) - means[c]) / scale


def _resize_within(flat: Plane, stride: int, src: Box, dst: Box) -> None:
    """dlib's resize_image on float planes, bit-exact: rectangle `src` of the C x N buffer `flat` (rows of
    `stride` values) resized into rectangle `dst` of the same buffer."""
    if dst.area == 0 or src.area == 0:
        return
    rows, cols = _rows(src.height, dst.height), _cols(src.width, dst.width)
    src0, dst0 = src.top * stride + src.left, dst.top * stride + dst.left
    n = len(cols.left)
    if n:
        weights = (rows.top, rows.bottom, rows.inv32, rows.frac32, cols.left, cols.inv, cols.frac)
        _blend_kernel(flat, src0, dst0, stride, *weights)
    if n < dst.width:
        tail = (cols.tail_left, cols.tail_right, cols.tail_frac)
        _tail_kernel(flat, src0, dst0, stride, rows.top, rows.bottom, rows.frac, *tail, n)


def resize_plane(src: Plane, height: int, width: int) -> Plane:
    """dlib's resize_image on float planes (C x h x w float32 -> C x height x width), bit-exact."""
    channels, h, w = src.shape
    # One buffer holding the source rows above the destination rows, both `stride` wide.
    stride = max(w, width, 1)
    buffer = np.zeros((channels, h + height, stride), F32)
    buffer[:, :h, :w] = src
    _resize_within(buffer.reshape(channels, -1), stride, Box(0, 0, w - 1, h - 1), Box(0, h, width - 1, h + height - 1))
    return buffer[:, h:, :width].copy()


def resize_rgb(image: Image, height: int, width: int) -> Image:
    """dlib's resize_image on 8-bit RGB (H x W x 3 -> height x width x 3): the same arithmetic, truncated."""
    out = np.zeros((height, width, 3), np.uint8)
    if out.size == 0 or image.size == 0:
        return out
    rows, cols = _rows(image.shape[0], height), _cols(image.shape[1], width)
    n = len(cols.left)
    if n:
        h, w = image.shape[:2]
        stride = max(w, n)
        buffer = np.empty((3, h + height, stride), F32)  # source planes above the blended rows
        buffer[:, :h, :w] = image.transpose(2, 0, 1)
        weights = (rows.top, rows.bottom, rows.inv32, rows.frac32, cols.left, cols.inv, cols.frac)
        _blend_kernel(buffer.reshape(3, -1), 0, h * stride, stride, *weights)
        planes = buffer[:, h:, :n]
        # float -> uint8 truncates, as dlib's _mm_cvttps_epi32 then static_cast<unsigned char> (values are < 256)
        np.copyto(out[:, :n], planes.transpose(1, 2, 0), casting="unsafe")
    if n < width:
        # Scalar tail, all in double, truncated.
        fx = cols.tail_frac[None, :, None]
        fy = rows.frac[:, None, None]

        def pixels(r: npt.NDArray[np.intp], c: npt.NDArray[np.intp]) -> npt.NDArray[np.float64]:
            return image[r[:, None], c[None, :]].astype(np.float64)

        upper = (1 - fx) * pixels(rows.top, cols.tail_left) + fx * pixels(rows.top, cols.tail_right)
        lower = (1 - fx) * pixels(rows.bottom, cols.tail_left) + fx * pixels(rows.bottom, cols.tail_right)
        out[:, n:] = (1 - fy) * upper + fy * lower  # float -> uint8 truncates
    return out


def upsample(image: Image) -> Image:
    """One 2x step of dlib's pyramid_up(pyramid_down<2>): H x W -> (2H + 1) x (2W + 2)."""
    height, width = image.shape[:2]
    return resize_rgb(image, 2 * height + 1, 2 * width + 2)


def tiled_pyramid(image: Image, layout: PyramidLayout, means: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The (1, 3, rows, cols) float32 input tensor: zeros, the photo as (v - mean)/256, then each level
    resized from the previous level's normalised plane (read from and written into the tensor in place)."""
    tensor = np.zeros((1, 3, layout.rows, layout.cols), F32)
    if not layout.levels:
        return tensor
    planes = tensor[0]
    flat = planes.reshape(3, -1)
    first = layout.levels[0]
    level = planes[:, first.top : first.bottom + 1, first.left : first.right + 1]
    _normalise_kernel(image, means.astype(F32, copy=False), level)
    for previous, rect in zip(layout.levels, layout.levels[1:]):
        _resize_within(flat, layout.cols, previous, rect)
    return tensor


def warm_up() -> None:
    """Compile the numba kernels now (a tiny pyramid) rather than inside the first request."""
    image = np.zeros((MIN_LEVEL_HEIGHT * 4, 24, 3), np.uint8)
    tiled_pyramid(image, tiled_layout(*image.shape[:2]), np.zeros(3, F32))
    # Decoded photos are read-only arrays, a type of their own to numba: compiled now too.
    image.flags.writeable = False
    tiled_pyramid(image, tiled_layout(*image.shape[:2]), np.zeros(3, F32))
