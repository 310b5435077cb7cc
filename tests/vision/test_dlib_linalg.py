"""vision.dlib_linalg: dlib's SVD and pinv reproduced bit for bit.

The expected bits were printed by a C++ program compiled against dlib 20.0.1's headers (the same code as the
dlib-bin oracle): pinv of the chip corners for size 150 and dlib's unnormalizing_tform for two boxes.
"""

from __future__ import annotations

import numpy as np
import pytest

from app.vision.dlib_linalg import matmul, pinv, svd4


@pytest.mark.parametrize("shape", [(2, 2), (3, 3), (3, 2)])
def test_svd_reconstructs(shape: tuple[int, int]) -> None:
    a = np.random.default_rng(sum(shape)).standard_normal(shape)
    u, q, v = svd4(a.tolist())
    u_, q_, v_ = np.array(u), np.array(q), np.array(v)
    assert np.allclose(u_ @ np.diag(q_) @ v_.T, a, atol=1e-14)
    assert np.allclose(v_.T @ v_, np.eye(shape[1]), atol=1e-14)
    assert (q_ >= 0).all()


def test_pinv_of_chip_corners_matches_dlib_bits() -> None:
    got = pinv([[0.0, 149.0, 0.0], [0.0, 0.0, 149.0], [1.0, 1.0, 1.0]])
    expected = [
        ["-0x1.b7d6c3dda3389p-8", "-0x1.b7d6c3dda3389p-8", "0x1.ffffffffffffdp-1"],
        ["0x1.b7d6c3dda338ap-8", "0x0p+0", "0x1.8p-66"],
        ["0x1p-61", "0x1.b7d6c3dda338ap-8", "0x1p-65"],
    ]
    assert got == [[float.fromhex(v) for v in row] for row in expected]


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        (
            (300, 200, 500, 400),
            # m00, m01, b0, m10, m11, b1: the exact map is 200, 0, 300, 0, 200, 200
            ["0x1.8fffffffffff8p+7", "0x1.8p-42", "0x1.2c00000000003p+8"]
            + ["-0x1p-43", "0x1.9000000000006p+7", "0x1.9000000000004p+7"],
        ),
        (
            (-37, 12, 89, 140),
            ["0x1.f7ffffffffffep+6", "0x1.4p-44", "-0x1.27ffffffffffep+5"]
            + ["-0x1p-47", "0x1.0000000000001p+7", "0x1.800000000000ap+3"],
        ),
    ],
)
def test_unnormalizing_transform_matches_dlib_bits(box: tuple[int, int, int, int], expected: list[str]) -> None:
    left, top, right, bottom = map(float, box)
    unit = pinv([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    (m00, m01, b0), (m10, m11, b1) = matmul([[left, right, right], [top, top, bottom]], unit)
    assert [m00, m01, b0, m10, m11, b1] == [float.fromhex(v) for v in expected]
