"""models.shape_predictor: dlib's .dat cascade -> .npz arrays.

Unit tests write small predictor files in dlib's serialization format; one test converts the real packaged file
(about 3 s). Whether the converted numbers are right is shown by the landmark parity tests (tests/vision).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.serialization import FormatError
from models.shape_predictor import convert, parse


def _int(v: int) -> bytes:
    magnitude = abs(v)
    size = max(1, (magnitude.bit_length() + 7) // 8)
    return bytes([size | (0x80 if v < 0 else 0)]) + magnitude.to_bytes(size, "little")


def _float(v: float) -> bytes:
    """dlib's portable float: mantissa then exponent (exact for the dyadic values used here)."""
    if v == 0:
        return _int(0) + _int(0)
    exponent = 0
    while v != int(v):
        v *= 2
        exponent -= 1
    return _int(int(v)) + _int(exponent)


def _column(values: list[float]) -> bytes:
    return _int(-len(values)) + _int(-1) + b"".join(_float(v) for v in values)


def _predictor_file(
    *, cascades: int = 2, trees: int = 3, splits: int = 3, features: int = 4, leaf_count: int | None = None
) -> bytes:
    """A complete predictor in dlib's layout (section 8.1) with recognisable values."""
    out = [_int(1), _column([0.5, 0.25, 0.75, 0.25, 0.125, 0.375, 0.875, 0.375, 0.5, 0.75])]
    out.append(_int(cascades))
    for c in range(cascades):
        out.append(_int(trees))
        for t in range(trees):
            out.append(_int(splits))
            for s in range(splits):
                out += [_int((c + t + s) % features), _int((c + 2 * s + 1) % features), _float(-2.5 + s)]
            leaves = splits + 1 if leaf_count is None else leaf_count
            out.append(_int(leaves))
            for leaf in range(leaves):
                out.append(_column([(c * 100 + t * 10 + leaf) / 1024] * 10))
    out.append(_int(cascades))
    for c in range(cascades):
        out.append(_int(features) + b"".join(_int((c + f) % 5) for f in range(features)))
    out.append(_int(cascades))
    for c in range(cascades):
        out.append(_int(features) + b"".join(_float(f / 8) + _float(-c / 4) for f in range(features)))
    return b"".join(out)


class TestParse:
    def test_arrays_and_values(self) -> None:
        arrays = parse(_predictor_file())
        assert arrays["initial_shape"].dtype == np.float32
        assert arrays["initial_shape"].tolist() == [0.5, 0.25, 0.75, 0.25, 0.125, 0.375, 0.875, 0.375, 0.5, 0.75]
        assert arrays["split_idx1"].shape == (2, 3, 3) and arrays["split_idx1"].dtype == np.uint16
        assert arrays["split_idx1"][1, 2, 0] == 3 and arrays["split_idx2"][1, 0, 2] == (1 + 4 + 1) % 4
        assert arrays["split_thresh"][0, 0].tolist() == [-2.5, -1.5, -0.5]
        assert arrays["leaves"].shape == (2, 3, 4, 10) and arrays["leaves"].dtype == np.float32
        assert arrays["leaves"][1, 2, 3, 0] == (100 + 20 + 3) / 1024
        assert arrays["anchor_idx"].tolist() == [[0, 1, 2, 3], [1, 2, 3, 4]]
        assert arrays["deltas"].shape == (2, 4, 2) and arrays["deltas"].dtype == np.float32
        assert arrays["deltas"][1, 3].tolist() == [3 / 8, -1 / 4]

    def test_trailing_bytes_are_refused(self) -> None:
        with pytest.raises(FormatError, match="left over"):
            parse(_predictor_file() + b"\x00")

    def test_truncated_file_is_refused(self) -> None:
        data = _predictor_file()
        with pytest.raises(FormatError):
            parse(data[:-1])

    def test_wrong_version_is_refused(self) -> None:
        with pytest.raises(FormatError):
            parse(_int(2) + _predictor_file()[2:])

    def test_incomplete_tree_is_refused(self) -> None:
        with pytest.raises(FormatError):
            parse(_predictor_file(splits=2, leaf_count=3))  # not a complete binary tree
        with pytest.raises(FormatError):
            parse(_predictor_file(splits=3, leaf_count=3))  # leaves do not match splits


def test_convert_writes_the_exact_destination(tmp_path: Path) -> None:
    source = tmp_path / "small.dat"
    source.write_bytes(_predictor_file())
    dest = tmp_path / "out.npz.tmp"
    extra = convert(source, dest)
    assert extra == {"cascades": 2, "trees": 3, "features": 4}
    assert dest.is_file() and not (tmp_path / "out.npz.tmp.npz").exists()
    with np.load(dest) as z:
        assert sorted(z.files) == sorted(
            ["initial_shape", "split_idx1", "split_idx2", "split_thresh", "leaves", "anchor_idx", "deltas"]
        )


def test_converts_the_packaged_model(tmp_path: Path) -> None:
    from models.build import source_dir

    source = source_dir() / "shape_predictor_5_face_landmarks.dat"
    dest = tmp_path / "shape_predictor_5.npz.tmp"
    assert convert(source, dest) == {"cascades": 15, "trees": 500, "features": 800}
    with np.load(dest) as z:
        assert z["initial_shape"].shape == (10,)
        assert z["split_idx1"].shape == z["split_idx2"].shape == z["split_thresh"].shape == (15, 500, 15)
        assert z["leaves"].shape == (15, 500, 16, 10)
        assert z["anchor_idx"].shape == (15, 800) and int(z["anchor_idx"].max()) == 4
        assert z["deltas"].shape == (15, 800, 2)
        assert int(z["split_idx1"].max()) < 800 and int(z["split_idx2"].max()) < 800
        assert np.isfinite(z["leaves"]).all() and np.isfinite(z["split_thresh"]).all()
        # the mean shape lies inside the unit box, eyes above the nose
        initial = z["initial_shape"].reshape(5, 2)
        assert (initial > 0).all() and (initial < 1).all() and initial[4, 1] > initial[:4, 1].max()
