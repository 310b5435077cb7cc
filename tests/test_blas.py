"""The service caps numpy's BLAS threads (app/blas.py): spinning BLAS threads slowed the next photo's detector."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from app.blas import limit_blas_threads


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.fixture
def restore_blas() -> Iterator[None]:
    with threadpool_limits(limits=None):  # whatever the test sets is undone when it ends
        yield


def test_numpy_links_a_blas_library() -> None:
    np.ones((4, 4), np.float32) @ np.ones((4, 4), np.float32)  # loads the BLAS library if it was not yet
    assert _blas_threads()  # otherwise the cap below would silently do nothing


@pytest.mark.usefixtures("restore_blas")
def test_cap_applies_to_every_blas_library() -> None:
    limit_blas_threads(1)
    assert set(_blas_threads()) == {1}


@pytest.mark.usefixtures("restore_blas")
def test_zero_leaves_the_library_default() -> None:
    before = _blas_threads()
    limit_blas_threads(0)
    assert _blas_threads() == before
