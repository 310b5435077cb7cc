"""numpy's BLAS thread pool, capped once per service process.

OpenBLAS's worker threads busy-wait for the next call long after a matmul returns. In the service the exact
search's matmul (a gallery-sized matrix-vector product, memory-bound) is followed at once by the next photo's
ONNX Runtime calls, which then share the cores with spinning BLAS threads: on 2 cores /identify against 100k faces
took ~56 ms with OpenBLAS's default threads and ~40 ms with one, for a search 0.7 ms slower.
"""

from __future__ import annotations

import logging

from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)


def limit_blas_threads(threads: int) -> None:
    """Cap every BLAS library numpy loaded at `threads` (0 leaves their defaults) for the rest of the process."""
    if threads <= 0:
        return
    threadpool_limits(limits=threads, user_api="blas")
    log.info("numpy BLAS threads capped at %d", threads)
