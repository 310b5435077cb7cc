"""Aligned face chips from 5 landmarks, bit-identical to `dlib.get_face_chip(img, shape, size=150, padding=0.25)`.

The maths is dlib's `get_face_chip_details` + `extract_image_chip` (../shared/docs/dlib-models.md, section 5):

1. a least-squares similarity (Umeyama, no reflection) from dlib's 5-point mean face, padded, to the landmarks
   gives the chip's angle, scale and rectangle in the photo;
2. the rotated rectangle's bounding box, grown by a margin and clipped to the photo, is cropped (rounded half away
   from zero);
3. when the chip is much smaller than the rectangle, the crop is reduced 2:1 (dlib's 5x5 integer filter) as many
   times as needed and the level whose rectangle is just above the chip's area is sampled;
4. each chip pixel is sampled bilinearly (double precision, truncated to uint8, black where any of the four
   neighbours is outside the source).

Arithmetic follows dlib's order of operations, including dlib's own SVD for the similarity fit and for the
chip-to-source affine map (`vision.dlib_linalg`), so the chips are the same bit for bit (tests compare with
dlib.get_face_chip and dlib.get_face_chip_details). `face_chips` extracts each face on its own (see there).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from app.vision.dlib_linalg import Mat, matmul, pinv, svd4, transpose
from app.vision.types import CHIP_PADDING, CHIP_SIZE, Chips, Image

# dlib's mean face for the 5-point model, in a unit square (x, y), in the model's landmark order.
MEAN_FACE_5 = (
    (0.8595674595992, 0.2134981538014),
    (0.6460604764104, 0.2289674387677),
    (0.1205750620789, 0.2137274526848),
    (0.3340850613712, 0.2290642403242),
    (0.4901123135679, 0.6277975316475),
)

# A 2:1 pyramid level maps a point p of the level above to p/2 - (1.25, 0.75).
_PYR_OFFSET_X = 1.25
_PYR_OFFSET_Y = 0.75


@dataclass(frozen=True, slots=True)
class _Rect:
    """dlib's drectangle: real-valued, inclusive corners; empty when left > right or top > bottom."""

    left: float
    top: float
    right: float
    bottom: float

    @property
    def empty(self) -> bool:
        return self.top > self.bottom or self.left > self.right

    @property
    def area(self) -> float:
        if self.empty:
            return 0.0
        return (self.right - self.left + 1) * (self.bottom - self.top + 1)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.left + self.right) / 2.0, (self.top + self.bottom) / 2.0)

    def down(self) -> _Rect:
        """The rectangle one 2:1 pyramid level down."""
        return _Rect(
            self.left / 2.0 - _PYR_OFFSET_X,
            self.top / 2.0 - _PYR_OFFSET_Y,
            self.right / 2.0 - _PYR_OFFSET_X,
            self.bottom / 2.0 - _PYR_OFFSET_Y,
        )


@dataclass(frozen=True, slots=True)
class ChipTransform:
    """Where a chip comes from in the photo: dlib's `chip_details` for one face.

    rect: (left, top, right, bottom), real-valued inclusive corners of the unrotated chip rectangle in photo pixels.
    angle: rotation of the chip in radians (image coordinates, y down); scale: photo pixels per chip pixel.
    """

    rect: tuple[float, float, float, float]
    angle: float
    scale: float
    size: int

    def to_image(self, points: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map chip pixel coordinates (..., 2) as (x, y) to photo coordinates (ignoring pyramid resampling)."""
        pts = np.asarray(points, dtype=np.float64)
        left, top, right, bottom = self.rect
        cx, cy = (left + right) / 2.0, (top + bottom) / 2.0
        step = (right - left) / (self.size - 1) if self.size > 1 else 0.0
        # unrotated position in the rectangle, relative to its centre, then rotated about the centre
        rx = left + pts[..., 0] * step - cx
        ry = top + pts[..., 1] * step - cy
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        return np.stack([cos * rx - sin * ry + cx, sin * rx + cos * ry + cy], axis=-1)


@functools.cache
def _chip_corners_pinv(size: int) -> Mat:
    """pinv of the chip corners (0,0), (size-1,0), (0,size-1) as dlib's find_affine_transform lays them out.

    dlib maps chip pixels to the source with find_affine_transform (Q pinv(P), pinv by its own SVD); a textbook
    formula agrees only to ~1e-16, enough to move a sample lying within 1e-13 of a pixel boundary across it (seen
    as a 1-level difference on ~0.5 % of chips), so dlib's computation is reproduced exactly.
    """
    return pinv([[0.0, float(size - 1), 0.0], [0.0, 0.0, float(size - 1)], [1.0, 1.0, 1.0]])


def _similarity(
    from_pts: Sequence[tuple[float, float]], to_pts: Sequence[tuple[float, float]]
) -> tuple[Mat, tuple[float, float]]:
    """dlib's find_similarity_transform (Umeyama, reflections prevented): (M 2x2, t) with to ~ M from + t."""
    n = len(from_pts)
    mfx = mfy = mtx = mty = 0.0
    for (fx, fy), (tx, ty) in zip(from_pts, to_pts, strict=True):
        mfx += fx
        mfy += fy
        mtx += tx
        mty += ty
    mfx /= n
    mfy /= n
    mtx /= n
    mty /= n
    sigma_from = 0.0
    cov = [[0.0, 0.0], [0.0, 0.0]]
    for (fx, fy), (tx, ty) in zip(from_pts, to_pts, strict=True):
        dfx, dfy, dtx, dty = fx - mfx, fy - mfy, tx - mtx, ty - mty
        sigma_from += dfx * dfx + dfy * dfy
        cov[0][0] += dtx * dfx
        cov[0][1] += dtx * dfy
        cov[1][0] += dty * dfx
        cov[1][1] += dty * dfy
    sigma_from /= n
    inverse_n = 1.0 / n  # `cov /= n` on a dlib matrix multiplies by the reciprocal (the means divide: vectors)
    cov = [[c * inverse_n for c in row] for row in cov]
    u, d, v = svd4(cov)
    s = [1.0, 1.0]
    det_cov = cov[0][0] * cov[1][1] - cov[0][1] * cov[1][0]
    det_u = u[0][0] * u[1][1] - u[0][1] * u[1][0]
    det_v = v[0][0] * v[1][1] - v[0][1] * v[1][0]
    if det_cov < 0 or (det_cov == 0 and det_u * det_v < 0):
        if d[1] < d[0]:
            s[1] = -1.0
        else:
            s[0] = -1.0
    us = [[u[i][k] * s[k] for k in range(2)] for i in range(2)]  # u * diag(s): exact sign flips
    r = matmul(us, transpose(v))
    c = 1.0 / sigma_from * (d[0] * s[0] + d[1] * s[1]) if sigma_from != 0 else 1.0
    m = [[c * r[0][0], c * r[0][1]], [c * r[1][0], c * r[1][1]]]
    # dlib's expression templates evaluate `c * r * mean_from` as c * (r * mean_from)
    t = (mtx - c * (r[0][0] * mfx + r[0][1] * mfy), mty - c * (r[1][0] * mfx + r[1][1] * mfy))
    return m, t


def chip_transform(landmarks: npt.ArrayLike, *, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> ChipTransform:
    """dlib's get_face_chip_details for 5 landmarks (int (5, 2), x/y photo pixels): the chip's rectangle and angle."""
    pts = np.asarray(landmarks)
    if pts.shape != (5, 2):
        raise ValueError(f"expected 5 landmarks as a (5, 2) array, got shape {pts.shape}")
    if size < 1 or padding < 0:
        raise ValueError(f"size must be >= 1 and padding >= 0, got {size}, {padding}")
    # dlib's arithmetic: (padding + p) / (2 padding + 1) is a matrix expression, and dlib divides a floating-point
    # matrix by a scalar by multiplying with its reciprocal; then * size
    inverse = 1.0 / (2 * padding + 1)
    from_pts = [((padding + x) * inverse * size, (padding + y) * inverse * size) for x, y in MEAN_FACE_5]
    to_pts = [(float(x), float(y)) for x, y in pts.tolist()]
    m, t = _similarity(from_pts, to_pts)
    px, py = m[0][0], m[1][0]  # M * (1, 0)
    angle = math.atan2(py, px)
    scale = math.sqrt(px * px + py * py)
    half = size / 2.0
    cx = (m[0][0] * half + m[0][1] * half) + t[0]
    cy = (m[1][0] * half + m[1][1] * half) + t[1]
    extent = size * scale - 1  # centered_drect: width-- then +- width/2
    return ChipTransform(
        rect=(cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2), angle=angle, scale=scale, size=size
    )


def _round_half_away(v: float) -> int:
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def _rotate(cx: float, cy: float, x: float, y: float, cos: float, sin: float) -> tuple[float, float]:
    """dlib's rotate_point: rot(p - centre) + centre."""
    dx, dy = x - cx, y - cy
    return (cos * dx - sin * dy) + cx, (sin * dx + cos * dy) + cy


def pyramid_down(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """dlib's pyramid_down<2> on an 8-bit H x W x C image: 5x5 binomial filter, every other pixel, integer maths.

    Output is ((H-3)//2, (W-3)//2, C), pixel (r, c) centred on input (2r+2, 2c+2); empty when H or W is <= 8.
    """
    h, w = image.shape[:2]
    if h <= 8 or w <= 8:
        return np.zeros((0, 0) + image.shape[2:], dtype=np.uint8)
    oh, ow = (h - 3) // 2, (w - 3) // 2
    v = image.astype(np.uint16)  # every intermediate fits: 255 * 16 * 16 = 65280
    end = 2 * ow
    tmp = v[:, 0:end:2] + v[:, 4 : end + 4 : 2]
    tmp += 4 * (v[:, 1 : end + 1 : 2] + v[:, 3 : end + 3 : 2])
    tmp += 6 * v[:, 2 : end + 2 : 2]
    end = 2 * oh
    out = tmp[0:end:2] + tmp[4 : end + 4 : 2]
    out += 4 * (tmp[1 : end + 1 : 2] + tmp[3 : end + 3 : 2])
    out += 6 * tmp[2 : end + 2 : 2]
    return (out >> 8).astype(np.uint8)


def _sample_bilinear(
    source: npt.NDArray[np.uint8], xs: npt.NDArray[np.float64], ys: npt.NDArray[np.float64]
) -> npt.NDArray[np.uint8]:
    """dlib's interpolate_bilinear at every (x, y); black where the 2x2 neighbourhood leaves the source."""
    h, w, channels = source.shape
    out_shape = xs.shape + (channels,)
    if h < 2 or w < 2:
        return np.zeros(out_shape, dtype=np.uint8)
    x0 = np.floor(xs)
    y0 = np.floor(ys)
    ok = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < w) & (y0 + 1 < h)
    lr = xs - x0
    tb = ys - y0
    # clipped indices keep every gather inside the source; the pixels that needed clipping are blacked out below
    i00 = (np.clip(y0, 0, h - 2).astype(np.intp) * w + np.clip(x0, 0, w - 2).astype(np.intp)).reshape(-1)
    # channels first (planar), so that gathers move single bytes and the per-pixel weights broadcast along long
    # contiguous rows
    planes = np.ascontiguousarray(np.moveaxis(source, 2, 0)).reshape(channels, h * w)
    n = i00.size
    index = np.concatenate([i00, i00 + 1, i00 + w, i00 + (w + 1)])
    corners = np.stack([plane.take(index) for plane in planes]).astype(np.float64)  # (C, 4N)
    tl, tr, bl, br = corners[:, :n], corners[:, n : 2 * n], corners[:, 2 * n : 3 * n], corners[:, 3 * n :]
    lr = lr.reshape(-1)
    tb = tb.reshape(-1)
    lr1 = 1 - lr
    value = (1 - tb) * (lr1 * tl + lr * tr) + tb * (lr1 * bl + lr * br)  # dlib's expression, in its order
    out = np.ascontiguousarray(value.astype(np.uint8).T).reshape(out_shape)  # truncation, as static_cast
    out[~ok] = 0
    return out


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one chip is extracted: the crop box (inclusive, photo pixels; None when it is empty), the pyramid level
    sampled (-1 = the crop itself), and the level's rectangle in that level's coordinates."""

    box: tuple[int, int, int, int] | None
    level: int
    rect: _Rect


def _plan(height: int, width: int, details: ChipTransform) -> _Plan:
    """Steps 1-4 of dlib's extract_image_chips for one chip."""
    chip_area = details.size * details.size
    rect = _Rect(*details.rect)

    # 1. pyramid depth and the crop margin it needs
    depth = 0
    grow = 2.0
    r = rect.down()
    while r.area > chip_area:
        r = r.down()
        depth += 1
        grow = grow * 2 + 2

    # 2. crop box: bounding box of the rotated rectangle, grown, clipped to the photo, rounded half away from zero
    cos, sin = math.cos(details.angle), math.sin(details.angle)
    cx, cy = rect.center
    corners = [
        _rotate(cx, cy, x, y, cos, sin)
        for x, y in ((rect.left, rect.top), (rect.right, rect.top), (rect.left, rect.bottom), (rect.right, rect.bottom))
    ]
    xs = [p[0] for p in corners]
    ys = [p[1] for p in corners]
    left, top, right, bottom = (
        _round_half_away(v)
        for v in (
            max(min(xs) - grow, 0.0),
            max(min(ys) - grow, 0.0),
            min(max(xs) + grow, float(width - 1)),
            min(max(ys) + grow, float(height - 1)),
        )
    )
    if left > right or top > bottom:
        return _Plan(None, -1, rect)  # the chip lies wholly outside the photo

    # 4. the level whose rectangle is the smallest one still larger than the chip (never deeper than step 1 built)
    level = -1
    r = _Rect(rect.left - left, rect.top - top, rect.right - left, rect.bottom - top)
    while r.down().area > chip_area and level + 1 < depth:
        level += 1
        r = r.down()
    return _Plan((left, top, right, bottom), level, r)


def _extract(image: Image, details: ChipTransform) -> npt.NDArray[np.uint8]:
    """dlib's extract_image_chip for one chip (the crop box and pyramid are this face's own)."""
    size = details.size
    plan = _plan(image.shape[0], image.shape[1], details)
    if plan.box is None:
        return np.zeros((size, size, image.shape[2]), dtype=np.uint8)
    left, top, right, bottom = plan.box
    source = image[top : bottom + 1, left : right + 1]
    # 3. only the levels up to the one sampled are needed
    for _ in range(plan.level + 1):
        source = pyramid_down(source)

    # 5. affine map chip (col, row) -> source through the rotated corners of the level's rectangle
    r = plan.rect
    cos, sin = math.cos(details.angle), math.sin(details.angle)
    cx, cy = r.center
    p0 = _rotate(cx, cy, r.left, r.top, cos, sin)
    p1 = _rotate(cx, cy, r.right, r.top, cos, sin)
    p2 = _rotate(cx, cy, r.left, r.bottom, cos, sin)
    # dlib's find_affine_transform from the chip corners to P0, P1, P2: m = Q pinv(P), 2 x 3
    q = [[p0[0], p1[0], p2[0]], [p0[1], p1[1], p2[1]], [1.0, 1.0, 1.0]][:2]
    (m00, m01, b0), (m10, m11, b1) = matmul(q, _chip_corners_pinv(size))
    grid = np.arange(size, dtype=np.float64)
    col = grid[None, :]
    row = grid[:, None]
    sx = (m00 * col + m01 * row) + b0
    sy = (m10 * col + m11 * row) + b1

    # 6. bilinear sampling, truncated, black outside
    return _sample_bilinear(source, sx, sy)


def face_chip(
    image: Image, landmarks: npt.ArrayLike, *, size: int = CHIP_SIZE, padding: float = CHIP_PADDING
) -> npt.NDArray[np.uint8]:
    """The aligned chip of one face, as dlib.get_face_chip(image, shape, size, padding).

    image: H x W x 3 uint8 RGB. landmarks: the 5 integer landmarks (5, 2) from `LandmarkPredictor.predict`.
    Returns uint8 (size, size, 3). Parts of the chip outside the photo are black.
    """
    _check_image(image)
    return _extract(image, chip_transform(landmarks, size=size, padding=padding))


def face_chips(
    image: Image,
    landmarks_list: Sequence[npt.ArrayLike],
    *,
    size: int = CHIP_SIZE,
    padding: float = CHIP_PADDING,
) -> Chips:
    """The chips of several faces of one photo: uint8 (N, size, size, 3).

    Each face is extracted on its own, with its own crop box and pyramid, exactly as `face_chip` (and dlib's
    single-face `get_face_chip` / `compute_face_descriptor(img, shape)`). dlib's multi-face calls
    (`get_face_chips`, `compute_face_descriptor(img, [shapes])`) instead share one crop box for all faces, which
    can shift the pyramid's sampling grid of large faces by a pixel; per-face extraction is chosen so that a
    face's chip (and embedding) never depends on the other faces in the photo.
    """
    _check_image(image)
    out = np.zeros((len(landmarks_list), size, size, 3), dtype=np.uint8)
    for i, landmarks in enumerate(landmarks_list):
        out[i] = _extract(image, chip_transform(landmarks, size=size, padding=padding))
    return out


def _check_image(image: Image) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {image.dtype} {image.shape}")
