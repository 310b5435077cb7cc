"""Five face landmarks with dlib's regression-tree cascade (models/dist/shape_predictor_5.npz), in numpy.

Reproduces `dlib.shape_predictor(img, rect)` exactly (../shared/docs/dlib-models.md, section 8.2): float32 shape
arithmetic, a similarity fit per cascade, feature pixels rounded half up and read as grey (R+G+B)//3 (0 outside the
image), trees evaluated in order and their leaves added one by one in float32. The 500 trees of a cascade are walked
together as array operations, and several boxes of one image are predicted together.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from app.errors import ModelUnavailable
from app.vision.dlib_linalg import Mat, matmul, pinv
from app.vision.types import Box, Image, Landmarks

NUM_PARTS = 5


@dataclass(frozen=True)
class _Cascade:
    """One cascade's tables, laid out for whole-cascade array operations.

    Every tree is complete with S = 2^depth - 1 splits. Splits are padded to S + 1 per tree (a split that never goes
    left), so that a tree's S + 1 split outcomes pack into one integer whose value a lookup table maps to the leaf
    the walk from the root ends in.
    """

    pairs: npt.NDArray[np.intp]  # (2*T*(S+1),) feature index of every split's first pixel, then of its second
    thresh: npt.NDArray[np.int16]  # (T*(S+1),) floor(thresh): for an integer d, d > t iff d > floor(t)
    leaves: npt.NDArray[np.float32]  # (T*(S+1), 2P)
    anchors: npt.NDArray[np.intp]  # (2F,) where each feature's anchor x, then y, sits in a flat (2P,) shape
    deltas: npt.NDArray[np.float32]  # (2, F): dx, dy
    deltas_turned: npt.NDArray[np.float32]  # (2, F): -dy, dx (so that M d = a * deltas + b * deltas_turned)


@dataclass(frozen=True)
class _Model:
    initial: npt.NDArray[np.float32]  # (2P,)
    # (2P, 2): [a, b] of the similarity fit from the initial shape to a shape (flat, float64) is shape @ fit.
    fit: npt.NDArray[np.float64]
    cascades: tuple[_Cascade, ...]
    trees: int
    depth: int
    leaf_of_code: npt.NDArray[np.intp]  # (2^(S+1),) packed split outcomes -> leaf index within the tree


def _leaf_table(depth: int) -> npt.NDArray[np.intp]:
    """For every packing of a complete tree's split outcomes (bit i = split i goes left), the leaf reached."""
    splits = (1 << depth) - 1
    codes = np.arange(1 << (splits + 1), dtype=np.intp)
    node = np.zeros_like(codes)
    for _ in range(depth):
        left = (codes >> node) & 1
        node = 2 * node + 2 - left
    return node - splits


def _fit_matrix(initial: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Least-squares similarity from the initial shape, as a linear map of the target shape.

    Umeyama's fit restricted to rotations (dlib prevents reflections) has this closed form in 2-D: with the source
    points centred (d_i) and sigma = sum |d_i|^2, the 2x2 part is [[a, -b], [b, a]] with
    a = sum(x_i dx_i + y_i dy_i) / sigma and b = sum(y_i dx_i - x_i dy_i) / sigma, (x_i, y_i) the target points
    (their mean drops out because the d_i sum to zero). It equals dlib's SVD route up to the last bits of a double,
    far below the float32 resolution the predictor casts it to.
    """
    pts = initial.astype(np.float64).reshape(-1, 2)
    d = pts - pts.mean(axis=0)
    sigma = float((d * d).sum())
    if not sigma > 0:
        raise ModelUnavailable("the shape predictor's initial shape is degenerate (all points equal)")
    fit = np.zeros((pts.size, 2), dtype=np.float64)
    fit[0::2, 0] = d[:, 0] / sigma  # a: x_i * dx_i
    fit[1::2, 0] = d[:, 1] / sigma  #    y_i * dy_i
    fit[1::2, 1] = d[:, 0] / sigma  # b: y_i * dx_i
    fit[0::2, 1] = -d[:, 1] / sigma  #   -x_i * dy_i
    return fit


def _load(path: Path) -> _Model:
    if not path.is_file():
        raise ModelUnavailable(f"model file {path.name} is missing: run `make models`", path=str(path))
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"{path.name} is not a readable .npz file: {exc}") from exc
    try:
        initial = np.asarray(arrays["initial_shape"], dtype=np.float32).reshape(2 * NUM_PARTS)
        idx1, idx2 = arrays["split_idx1"], arrays["split_idx2"]
        thresh, leaves = arrays["split_thresh"], arrays["leaves"]
        anchors, deltas = arrays["anchor_idx"], arrays["deltas"]
        c, t, s = idx1.shape
        f = anchors.shape[1]
        ok = (
            idx2.shape == thresh.shape == (c, t, s)
            and leaves.shape == (c, t, s + 1, 2 * NUM_PARTS)
            and anchors.shape == (c, f)
            and deltas.shape == (c, f, 2)
            and 0 < s < 16
            and (s + 1) & s == 0
            and int(max(idx1.max(), idx2.max())) < f
            and 0 <= int(anchors.min())
            and int(anchors.max()) < NUM_PARTS
            and not np.isnan(thresh).any()
        )
    except (KeyError, ValueError) as exc:
        raise ModelUnavailable(f"{path.name} is not a facegate shape predictor ({exc}): run `make models`") from exc
    if not ok:
        raise ModelUnavailable(f"{path.name} has inconsistent array shapes: run `make models`")

    def padded(a: npt.NDArray[np.generic], fill: float) -> npt.NDArray[np.generic]:
        return np.concatenate([a, np.full((t, 1), fill, dtype=a.dtype)], axis=1).reshape(-1)

    # Grey differences lie in [-255, 255]: clipping the thresholds to [-256, 256] changes no comparison.
    thresh_int = np.floor(np.clip(thresh, -256, 256)).astype(np.int16)
    cascades = tuple(
        _Cascade(
            pairs=np.concatenate([padded(idx1[k], 0), padded(idx2[k], 0)]).astype(np.intp),
            thresh=padded(thresh_int[k], 256).astype(np.int16),  # the padding split never goes left
            leaves=np.ascontiguousarray(leaves[k].reshape(t * (s + 1), 2 * NUM_PARTS), dtype=np.float32),
            anchors=np.concatenate([2 * anchors[k], 2 * anchors[k] + 1]).astype(np.intp),
            deltas=np.ascontiguousarray(deltas[k].T, dtype=np.float32),
            deltas_turned=np.ascontiguousarray(np.stack([-deltas[k, :, 1], deltas[k, :, 0]]), dtype=np.float32),
        )
        for k in range(c)
    )
    depth = (s + 1).bit_length() - 1
    return _Model(
        initial=initial,
        fit=_fit_matrix(initial),
        cascades=cascades,
        trees=t,
        depth=depth,
        leaf_of_code=_leaf_table(depth),
    )


class LandmarkPredictor:
    """dlib's 5-point shape predictor; the .npz file is read on first use or at `load()` (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._model: _Model | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Read the model now (raises ModelUnavailable if the file is missing or malformed)."""
        self._get()

    def _get(self) -> _Model:
        model = self._model
        if model is None:
            with self._lock:
                if self._model is None:
                    self._model = _load(self.path)
                model = self._model
        return model

    def predict(self, image: Image, box: Box) -> Landmarks:
        """The 5 landmarks of the face in `box`.

        image: H x W x 3 uint8 RGB (a H x W grey image is read as is).
        box: the face's detection box, inclusive integer corners; it may extend beyond the image.
        Returns int64 (5, 2) of (x, y) image pixels in the model's order (types.py), exactly what dlib returns.
        """
        points: Landmarks = self.predict_many(image, [box])[0]
        return points

    def predict_many(self, image: Image, boxes: Sequence[Box]) -> npt.NDArray[np.int64]:
        """The landmarks of several faces of one image, computed together: int64 (N, 5, 2)."""
        model = self._get()
        if image.ndim == 3:
            if image.shape[2] != 3:
                raise ValueError(f"expected an H x W x 3 RGB image, got shape {image.shape}")
        elif image.ndim != 2:
            raise ValueError(f"expected an H x W x 3 RGB image, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image, got {image.dtype}")
        n = len(boxes)
        if n == 0:
            return np.zeros((0, NUM_PARTS, 2), dtype=np.int64)
        return _predict(model, image, boxes)


# Packs 8 bytes that are each 0 or 1 into the top byte of a uint64 product, first byte as the lowest bit.
_PACK = np.uint64(0x0102040810204080)
_SHIFT = np.uint64(56)
_BYTE = np.uint64(8)


def _predict(model: _Model, image: Image, boxes: Sequence[Box]) -> npt.NDArray[np.int64]:
    n = len(boxes)
    h, w = image.shape[:2]
    pixels = image.reshape(h * w, -1)
    rgb = pixels.shape[1] == 3
    to_image = _to_image_maps(boxes)  # (N, 2, 3)
    m_u = to_image[:, :, 0:1]  # (N, 2, 1): coefficients of u for x and y
    m_v = to_image[:, :, 1:2]
    offset = to_image[:, :, 2:3]
    bounds = np.array([[w], [h]], dtype=np.uintp)

    trees = model.trees
    slots = 1 << model.depth  # splits per tree, padded
    splits = trees * slots
    leaf_base = np.arange(trees, dtype=np.intp) * slots
    shape = np.broadcast_to(model.initial, (n, 2 * NUM_PARTS)).copy()  # (N, 2P) float32, x0 y0 x1 y1 ...

    for cascade in model.cascades:
        ab = (shape.astype(np.float64) @ model.fit).astype(np.float32)  # (N, 2): M = [[a, -b], [b, a]]
        a = ab[:, 0:1, None]
        b = ab[:, 1:2, None]
        # float32 in dlib's order, x and y at once: (m00 dx + m01 dy) + anchor_x, (m10 dx + m11 dy) + anchor_y
        features = a * cascade.deltas + b * cascade.deltas_turned  # (N, 2, F)
        features += shape.take(cascade.anchors, axis=1).reshape(n, 2, -1)
        uv = features.astype(np.float64)
        # dlib: point p = tform_to_img(q), i.e. (m00 u + m01 v) + b0, rounded half up (floor(x + 0.5))
        xy = np.floor(((m_u * uv[:, 0:1] + m_v * uv[:, 1:2]) + offset) + 0.5).astype(np.intp)
        inside = (xy.view(np.uintp) < bounds).all(axis=1)  # (N, F); negative values wrap to huge ones
        where = np.where(inside, xy[:, 1] * w + xy[:, 0], 0)
        if rgb:
            colour = pixels.take(where, axis=0).astype(np.int16)  # (N, F, 3)
            values = (colour[..., 0] + colour[..., 1] + colour[..., 2]) // 3
        else:
            values = pixels[:, 0].take(where).astype(np.int16)
        feats = np.where(inside, values, np.int16(0))  # (N, F), out-of-image pixels read 0

        # Every split of every tree at once (the difference of two integers is exact in float32, so integer maths
        # is the same), each tree's outcomes packed into an integer that the table maps to the leaf reached.
        pair = feats.take(cascade.pairs, axis=1)
        left = (pair[:, :splits] - pair[:, splits:]) > cascade.thresh  # (N, T*slots) bool
        if slots == 16:
            packed = (left.view(np.uint8).view(np.uint64) * _PACK) >> _SHIFT  # (N, T*2): 8 outcomes each
            codes = packed[:, 0::2] | (packed[:, 1::2] << _BYTE)
        else:
            codes = np.packbits(left.reshape(n, trees, slots), axis=2, bitorder="little").reshape(n, trees)
        leaf = model.leaf_of_code.take(codes)  # (N, T)
        increments = cascade.leaves.take(leaf_base + leaf, axis=0)  # (N, T, 2P)
        # dlib adds the trees' leaves one at a time in float32: reducing over a non-contiguous axis adds row after
        # row in order (no pairwise summation), which the parity tests check.
        increments[:, 0] += shape
        shape = np.add.reduce(increments, axis=1, dtype=np.float32)

    uv = shape.reshape(n, NUM_PARTS, 2).transpose(0, 2, 1).astype(np.float64)  # (N, 2, P)
    xy = np.floor(((m_u * uv[:, 0:1] + m_v * uv[:, 1:2]) + offset) + 0.5)
    return xy.transpose(0, 2, 1).astype(np.int64)


@functools.cache
def _unit_corners_pinv() -> Mat:
    """pinv of the box-normalised corners (0,0), (1,0), (1,1) as dlib's find_affine_transform lays them out."""
    return pinv([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])


def _to_image_maps(boxes: Sequence[Box]) -> npt.NDArray[np.float64]:
    """dlib's unnormalizing_tform of each box as [[m00, m01, b0], [m10, m11, b1]], (N, 2, 3).

    Mathematically x = left + u (right - left); dlib fits it from the box corners (as float32) with
    find_affine_transform, whose SVD-based pinv is off in the last bits (e.g. m00 = 199.99999999999997,
    b0 = 300.0000000000003), which decides the rounding of a point lying exactly on a half pixel. The same
    computation is done here, so such points round as in dlib.
    """
    unit = _unit_corners_pinv()
    maps = []
    for box in boxes:
        left, top, right, bottom = (float(np.float32(v)) for v in (box.left, box.top, box.right, box.bottom))
        maps.append(matmul([[left, right, right], [top, top, bottom]], unit))
    return np.array(maps, dtype=np.float64)
