"""Convert dlib's `shape_predictor_5_face_landmarks.dat` into plain numpy arrays (.npz).

File layout: ../shared/docs/dlib-models.md, section 8.1. The cascade is stored as

    version 1, initial_shape (2P x 1 float matrix),
    forests: vector (cascades) of vector (trees) of {splits: vector of (idx1, idx2, thresh), leaves: vector of 2P x 1},
    anchor_idx: vector (cascades) of vector of unsigned,
    deltas: vector (cascades) of vector of 2-D float points.

The output keeps every value exactly (all floats were written from float32) in dense arrays, which requires every
tree to be complete with the same depth and every cascade to have the same number of trees and feature pixels;
anything else is refused with `FormatError`, as is a file with bytes left over.

    initial_shape (2P,)        float32  x0, y0, x1, y1, ... in box-normalised coordinates
    split_idx1    (C, T, S)    uint16   feature index of each split's first pixel (breadth-first node order)
    split_idx2    (C, T, S)    uint16   feature index of each split's second pixel
    split_thresh  (C, T, S)    float32  the split goes left (child 2i+1) when f[idx1] - f[idx2] > thresh
    leaves        (C, T, S+1, 2P) float32  shape increment of each leaf
    anchor_idx    (C, F)       int32    landmark each feature pixel hangs off
    deltas        (C, F, 2)    float32  offset of each feature pixel from its anchor (initial-shape coordinates)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.serialization import FormatError, Reader

VERSION = 1
NUM_PARTS = 5


def _float32_vector(reader: Reader, length: int, what: str) -> npt.NDArray[np.float32]:
    """A `matrix<float,0,1>` of the given length, kept exactly as float32."""
    rows = abs(reader.int())
    cols = abs(reader.int())
    if (rows, cols) != (length, 1):
        raise FormatError(f"{what}: expected a {length}x1 matrix, got {rows}x{cols} at byte {reader.pos}")
    return np.array([reader.float() for _ in range(length)], dtype=np.float32)


def _count(reader: Reader, what: str) -> int:
    n = reader.int()
    if n < 0:
        raise FormatError(f"{what}: negative count {n} at byte {reader.pos}")
    return n


def _unsigned(reader: Reader, what: str) -> int:
    v = reader.int()
    if v < 0:
        raise FormatError(f"{what}: negative value {v} at byte {reader.pos}")
    return v


def parse(data: bytes) -> dict[str, npt.NDArray[Any]]:
    """Parse the whole file into the arrays described in the module docstring."""
    reader = Reader(data)
    reader.expect_int(VERSION, "shape_predictor")

    rows = abs(reader.int())
    cols = abs(reader.int())
    if cols != 1 or rows != 2 * NUM_PARTS:
        raise FormatError(f"initial_shape: expected {2 * NUM_PARTS}x1, got {rows}x{cols}")
    initial_shape = np.array([reader.float() for _ in range(rows)], dtype=np.float32)
    dims = rows

    num_cascades = _count(reader, "forests")
    if num_cascades == 0:
        raise FormatError("no cascades")
    idx1: list[list[list[int]]] = []
    idx2: list[list[list[int]]] = []
    thresh: list[list[list[float]]] = []
    leaves: list[list[npt.NDArray[np.float32]]] = []
    num_trees = num_splits = -1
    for c in range(num_cascades):
        trees = _count(reader, f"cascade {c}")
        if num_trees < 0:
            num_trees = trees
        if trees != num_trees or trees == 0:
            raise FormatError(f"cascade {c} has {trees} trees, expected {num_trees} (> 0)")
        c_idx1: list[list[int]] = []
        c_idx2: list[list[int]] = []
        c_thresh: list[list[float]] = []
        c_leaves: list[npt.NDArray[np.float32]] = []
        for t in range(trees):
            splits = _count(reader, f"cascade {c} tree {t} splits")
            if num_splits < 0:
                num_splits = splits
            # A complete binary tree has 2^d - 1 splits; prediction walks exactly d levels.
            if splits != num_splits or (splits + 1) & splits:
                raise FormatError(f"cascade {c} tree {t}: {splits} splits, expected a complete tree of {num_splits}")
            t_idx1, t_idx2, t_thresh = [], [], []
            for _ in range(splits):
                t_idx1.append(_unsigned(reader, "split idx1"))
                t_idx2.append(_unsigned(reader, "split idx2"))
                t_thresh.append(reader.float())
            n_leaves = _count(reader, f"cascade {c} tree {t} leaves")
            if n_leaves != splits + 1:
                raise FormatError(f"cascade {c} tree {t}: {n_leaves} leaves for {splits} splits")
            c_leaves.append(np.stack([_float32_vector(reader, dims, "leaf") for _ in range(n_leaves)]))
            c_idx1.append(t_idx1)
            c_idx2.append(t_idx2)
            c_thresh.append(t_thresh)
        idx1.append(c_idx1)
        idx2.append(c_idx2)
        thresh.append(c_thresh)
        leaves.append(c_leaves)

    if _count(reader, "anchor_idx") != num_cascades:
        raise FormatError("anchor_idx: cascade count differs from forests")
    anchors: list[list[int]] = []
    num_features = -1
    for c in range(num_cascades):
        n = _count(reader, f"anchor_idx {c}")
        if num_features < 0:
            num_features = n
        if n != num_features:
            raise FormatError(f"anchor_idx {c}: {n} features, expected {num_features}")
        anchors.append([_unsigned(reader, "anchor index") for _ in range(n)])

    if _count(reader, "deltas") != num_cascades:
        raise FormatError("deltas: cascade count differs from forests")
    deltas: list[list[tuple[float, float]]] = []
    for c in range(num_cascades):
        n = _count(reader, f"deltas {c}")
        if n != num_features:
            raise FormatError(f"deltas {c}: {n} features, expected {num_features}")
        deltas.append([(reader.float(), reader.float()) for _ in range(n)])

    if not reader.at_end:
        raise FormatError(f"{len(data) - reader.pos} bytes left over after byte {reader.pos}")

    arrays: dict[str, npt.NDArray[Any]] = {
        "initial_shape": initial_shape,
        "split_idx1": np.array(idx1, dtype=np.int64),
        "split_idx2": np.array(idx2, dtype=np.int64),
        "split_thresh": np.array(thresh, dtype=np.float32),
        "leaves": np.array(leaves, dtype=np.float32),
        "anchor_idx": np.array(anchors, dtype=np.int64),
        "deltas": np.array(deltas, dtype=np.float32),
    }
    if not 0 < num_features <= np.iinfo(np.uint16).max + 1:
        raise FormatError(f"{num_features} feature pixels per cascade (expected 1..65536)")
    for name in ("split_idx1", "split_idx2"):
        if arrays[name].size and int(arrays[name].max()) >= num_features:
            raise FormatError(f"{name} refers to a feature beyond the {num_features} of a cascade")
    if int(arrays["anchor_idx"].max()) >= NUM_PARTS:
        raise FormatError(f"anchor_idx refers to a landmark beyond the {NUM_PARTS} of the model")
    arrays["split_idx1"] = arrays["split_idx1"].astype(np.uint16)
    arrays["split_idx2"] = arrays["split_idx2"].astype(np.uint16)
    arrays["anchor_idx"] = arrays["anchor_idx"].astype(np.int32)
    return arrays


def convert(source: Path, dest: Path) -> dict[str, Any]:
    """Parse `source` (every byte) and write the arrays to `dest` as an uncompressed .npz.

    `dest` is written through a file object so that numpy keeps its exact name (build.py passes `*.npz.tmp`).
    Returns extra manifest fields: the number of cascades, trees per cascade and feature pixels per cascade.
    """
    arrays = parse(Path(source).read_bytes())
    with Path(dest).open("wb") as f:
        np.savez(f, allow_pickle=False, **arrays)
    cascades, trees, _ = arrays["split_idx1"].shape
    return {"cascades": int(cascades), "trees": int(trees), "features": int(arrays["anchor_idx"].shape[1])}
