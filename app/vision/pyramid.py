"""The MMOD detector's input: dlib's tiled image pyramid and its bilinear resize, reproduced bit for bit.

dlib's `input_rgb_image_pyramid<pyramid_down<6>>` shrinks the photo by 5/6 per level and packs all levels
into one image (the larger levels one under another, the smaller ones to the right of the lower part),
so that the fully convolutional network scans every scale in one pass. Each level is resized from the
previous level's already-normalised float plane with dlib's `resize_image`, whose SIMD arithmetic
(float32 column positions accumulated four at a time, float32 weights) is replayed here with numpy so
that the tensor is identical to dlib's. See docs/dlib-models.md sections 9.3 and 9.7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

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


def _rows(n_in: int, n_out: int) -> _Rows:
    scale = _scale(n_in, n_out)
    steps = np.full(n_out + 1, scale)
    steps[0] = -scale
    y = np.cumsum(steps)[1:]  # y += y_scale per row, accumulated in double (cumsum is sequential)
    top = np.floor(y).astype(np.intp)
    frac = y - top
    return _Rows(top, np.minimum(top + 1, n_in - 1), frac, frac.astype(F32), (1.0 - frac).astype(F32))


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
    return _Cols(
        left.astype(np.intp),
        frac,
        F32(1) - frac,
        tail_left,
        np.minimum(tail_left + 1, n_in - 1),
        x - tail_left,
    )


@dataclass(frozen=True, slots=True)
class _Source:
    """A C x height x width plane inside a flat C x N buffer: (c, y, x) is flat[c, origin + y * stride + x]."""

    flat: npt.NDArray[np.float32]
    origin: int
    stride: int
    height: int
    width: int

    @staticmethod
    def of(planes: npt.NDArray[Any]) -> _Source:
        planes = np.ascontiguousarray(planes, dtype=F32)
        channels, height, width = planes.shape
        return _Source(planes.reshape(channels, -1), 0, width, height, width)

    def take(self, rows: npt.NDArray[np.intp], cols: npt.NDArray[np.intp]) -> Plane:
        return np.take(self.flat, self.origin + rows[:, None] * self.stride + cols[None, :], axis=1)


BLOCK_VALUES = 1 << 16  # values per channel handled at once: keeps the scratch arrays in cache


def _blend_into(src: _Source, dst: Plane, rows: _Rows, cols: _Cols) -> None:
    """The four-column SIMD path into dst (C x h x n, may be a view): float32 weights and the float32 sum
    ((w_tl*TL + w_tr*TR) + w_bl*BL) + w_br*BR, a block of rows at a time. Flat-index gathers into
    contiguous scratch (fancy indexing on the last axis is several times slower), all in place."""
    channels, height, n = dst.shape
    block = max(1, min(height, BLOCK_VALUES // n))
    top = src.origin + rows.top * src.stride  # flat offset of each output row's top source row
    down = ((rows.bottom - rows.top) * src.stride)[:, None] - 1  # tr -> bl: 0 or 1 row down, one column left
    index_buf = np.empty(block * n, np.intp)
    gathered_buf = np.empty(channels * block * n, F32)
    weight_buf = np.empty(block * n, F32)
    for r0 in range(0, height, block):
        r1 = min(height, r0 + block)
        size = (r1 - r0) * n
        index = index_buf[:size].reshape(r1 - r0, n)
        gathered = gathered_buf[: channels * size].reshape(channels, r1 - r0, n)
        weight = weight_buf[:size].reshape(r1 - r0, n)
        out = dst[:, r0:r1]
        inv_y, fy = rows.inv32[r0:r1, None], rows.frac32[r0:r1, None]
        np.add(top[r0:r1, None], cols.left[None, :], out=index)  # top-left corners
        corners = ((inv_y, cols.inv, 0), (inv_y, cols.frac, 1), (fy, cols.inv, down[r0:r1]), (fy, cols.frac, 1))
        for k, (wy, wx, step) in enumerate(corners):  # tl, tr, bl, br
            if k:
                index += step
            np.take(src.flat, index, axis=1, out=gathered, mode="wrap")  # indices are in range by construction
            np.multiply(wy, wx, out=weight)
            if k == 0:
                np.multiply(gathered, weight, out=out)
            else:
                gathered *= weight
                out += gathered


def _resize_into(src: _Source, dst: Plane) -> None:
    """dlib's resize_image on float planes, bit-exact: src resized into dst (C x height x width view)."""
    height, width = dst.shape[1:]
    if dst.size == 0 or src.height * src.width == 0:
        return
    rows, cols = _rows(src.height, height), _cols(src.width, width)
    n = len(cols.left)
    if n:
        _blend_into(src, dst[:, :, :n], rows, cols)
    if n < width:
        # Scalar tail: horizontal blends in float32, vertical blend in double, rounded to float.
        fx = cols.tail_frac.astype(F32)
        inv_x = F32(1) - fx
        upper = inv_x * src.take(rows.top, cols.tail_left) + fx * src.take(rows.top, cols.tail_right)
        lower = inv_x * src.take(rows.bottom, cols.tail_left) + fx * src.take(rows.bottom, cols.tail_right)
        fy = rows.frac[:, None]
        dst[:, :, n:] = ((1.0 - fy) * upper + fy * lower).astype(F32)


def resize_plane(src: Plane, height: int, width: int) -> Plane:
    """dlib's resize_image on float planes (C x h x w float32 -> C x height x width), bit-exact."""
    out = np.zeros((src.shape[0], height, width), F32)
    _resize_into(_Source.of(src), out)
    return out


def resize_rgb(image: Image, height: int, width: int) -> Image:
    """dlib's resize_image on 8-bit RGB (H x W x 3 -> height x width x 3): the same arithmetic, truncated."""
    out = np.zeros((height, width, 3), np.uint8)
    if out.size == 0 or image.size == 0:
        return out
    rows, cols = _rows(image.shape[0], height), _cols(image.shape[1], width)
    n = len(cols.left)
    if n:
        planes = np.empty((3, height, n), F32)
        _blend_into(_Source.of(image.transpose(2, 0, 1)), planes, rows, cols)
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
    np.subtract(image.transpose(2, 0, 1), means[:, None, None], out=level, dtype=F32)
    level /= F32(256)
    previous = first
    for rect in layout.levels[1:]:
        src = _Source(flat, previous.top * layout.cols + previous.left, layout.cols, previous.height, previous.width)
        _resize_into(src, planes[:, rect.top : rect.bottom + 1, rect.left : rect.right + 1])
        previous = rect
    return tensor
