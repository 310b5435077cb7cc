"""Approximate search for large galleries: a faiss inverted-file index (IVF-Flat) over `GalleryIndex`'s rows.

Why IVF and not HNSW: measured on the 2 shared cores here with face-like synthetic embeddings (bench/gallery_scale.py),
an IVF of 1M faces trains and fills in about 5 s, so it is simply rebuilt at start-up (nothing to persist), while
usearch's HNSW took 90 s for 200k faces and found the exact top-1 less often at equal latency.

How it stays right:
- The IVF's ids are the storage rows of `GalleryIndex`; adds are appended to their cell, removals leave the IVF
  (`remove_ids`), and a compaction (rows renumbered) or a load builds a new IVF. A search uses the IVF and the
  storage as they were at its snapshot, and drops rows the snapshot cannot see or that were removed.
- The IVF only proposes the `candidates` nearest faces; their exact squared L2 is recomputed from the float32
  matrix, then faces are grouped by identity (nearest face each), so distances equal a 1:1 comparison. A query whose
  candidates hold fewer than `top_k` identities is searched exactly.
- Below `min_size` searchable faces there is no IVF: exact search is as fast there. The IVF is retrained when the
  gallery has doubled since it was trained (cells stay balanced as it grows).
- From `background_above` faces on (start-up with a large gallery, or a retrain), the IVF is trained and filled
  on a background thread while exact search keeps answering; when it is done, the adds and removals that happened
  meanwhile are applied to it under the state lock, and it takes over. Start-up is then the time to read the rows.
- faiss is not safe for a search running while its index changes: each IVF has a readers-writer lock.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from app.gallery.index import GalleryIndex, IdentityCandidate, _Snapshot, background_done, rank_faces, row_faces
from app.vision.types import EMBEDDING_DIM

try:
    import faiss
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "FACEGATE_INDEX__BACKEND=approximate needs faiss-cpu: pip install 'facegate[ann]'"
    ) from error

MAX_AUTO_NLIST = 1024
MIN_NLIST = 16
TRAIN_POINTS_PER_CELL = 64  # k-means sample: enough for balanced cells, small enough to train 1M faces in seconds
TRAIN_ITERATIONS = 10
RETRAIN_GROWTH = 2.0
BACKGROUND_ABOVE = 200_000  # faces: from here on the IVF is built on a thread (1M: ~5 s quiet, more under load)

log = logging.getLogger(__name__)


FAISS_MIN_POINTS_PER_CELL = 39  # faiss's ClusteringParameters.min_points_per_centroid default


def auto_nlist(size: int) -> int:
    """A power of two near sqrt(size), between 16 and 1024 (1M faces: 1024 cells of ~1000)."""
    if size <= 0:
        return MIN_NLIST
    return int(min(MAX_AUTO_NLIST, max(MIN_NLIST, 2 ** round(math.log2(math.sqrt(size))))))


class _ReadWriteLock:
    """Many readers or one writer (writers are not starved: a waiting writer blocks new readers)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class _Ivf:
    index: faiss.IndexIVFFlat
    quantizer: faiss.IndexFlatL2  # kept referenced: the IVF does not own it from Python
    trained_on: int  # searchable faces when it was trained
    lock: _ReadWriteLock

    @property
    def nlist(self) -> int:
        return int(self.index.nlist)


def _remove_ids(index: faiss.IndexIVFFlat, ids: npt.NDArray[np.int64]) -> None:
    """`remove_ids`, then zero what each shortened inverted list left past its end. faiss moves a list's last entry
    into a removed one's place and only shortens the list, so a removed face that was last in its list (or whose
    place a later removal took) kept its vector in the IVF's memory until the list grew again or the IVF was rebuilt."""
    lists = index.invlists
    assert lists is not None  # an IVF-Flat always has its inverted lists
    before = [lists.list_size(cell) for cell in range(index.nlist)]
    # faiss's Python wrapper takes an id array where its stubs say IDSelector
    index.remove_ids(ids)  # type: ignore[arg-type]
    code_size = int(lists.code_size)
    for cell, size in enumerate(before):
        left = lists.list_size(cell)
        if left < size:  # shortened in place: the storage up to the old size is still allocated
            faiss.rev_swig_ptr(lists.get_codes(cell), size * code_size)[left * code_size :] = 0


class ApproximateIndex(GalleryIndex):
    """`GalleryIndex` whose searches go through an IVF once the gallery has `min_size` faces."""

    backend = "approximate"

    def __init__(
        self,
        model_version: str,
        *,
        min_size: int = 50_000,
        nlist: int = 0,
        nprobe: int = 256,
        candidates: int = 64,
        background_above: int = BACKGROUND_ABOVE,
    ) -> None:
        if min_size < 1 or nlist < 0 or nprobe < 1 or candidates < 1:
            raise ValueError("min_size, nprobe and candidates must be >= 1, nlist >= 0")
        self.min_size = min_size
        self.nlist = nlist
        self.nprobe = nprobe
        self.candidates = candidates
        self.background_above = background_above
        self._ivf: _Ivf | None = None
        self._generation = 0  # bumped by every reset: a background build of an older storage is thrown away
        self._building: threading.Thread | None = None
        super().__init__(model_version)

    # ------------------------------------------------------------------------------------- structure

    @property
    def ivf_cells(self) -> int:
        """Cells of the current IVF (0: none, searches are exact)."""
        with self._lock:
            return 0 if self._ivf is None else self._ivf.nlist

    def ivf_bytes(self) -> int:
        """Memory of the IVF itself: its copy of the vectors, their ids and the centroids."""
        with self._lock:
            ivf = self._ivf
        if ivf is None:
            return 0
        stored = int(ivf.index.ntotal)
        return stored * (EMBEDDING_DIM * 4 + 8) + ivf.nlist * EMBEDDING_DIM * 4

    def wait_until_built(self, timeout: float | None = None) -> bool:
        """Wait for a background build to finish (True: none is running any more)."""
        with self._lock:
            thread = self._building
        return background_done(thread, timeout)

    def _on_reset(self) -> None:
        self._ivf = None
        self._generation = getattr(self, "_generation", 0) + 1

    def _needs_build(self) -> bool:
        alive = len(self._rows)
        return alive >= self.min_size and (self._ivf is None or alive >= self._ivf.trained_on * RETRAIN_GROWTH)

    def _on_appended(self, start: int, end: int) -> None:
        if self._needs_build():
            if len(self._rows) < self.background_above:
                self._ivf = self._build(self._alive_rows(), self._vectors)
                return
            if self._building is None:
                self._start_background_build()
            # The running build takes these rows in when it finishes; meanwhile the current IVF (a retrain) or
            # exact search (none yet) answers.
        if self._ivf is None:
            return
        rows = np.arange(start, end, dtype=np.int64)
        alive_rows = rows[np.isfinite(self._norms[start:end])]
        if len(alive_rows):
            with self._ivf.lock.write():
                self._ivf.index.add_with_ids(self._vectors[alive_rows], alive_rows)

    def _on_removed(self, rows: list[int]) -> None:
        if self._ivf is not None:
            with self._ivf.lock.write():
                _remove_ids(self._ivf.index, np.asarray(rows, dtype=np.int64))

    def _alive_rows(self) -> npt.NDArray[np.int64]:
        rows = np.fromiter(self._rows.values(), dtype=np.int64, count=len(self._rows))
        rows.sort()
        return rows

    def _start_background_build(self) -> None:
        """Build from the rows alive now, off the state lock (held here); see `_finish_background_build`."""
        rows, vectors, n, generation = self._alive_rows(), self._vectors, self._n, self._generation

        def run() -> None:
            ivf = None
            try:
                # Rows below `n` of this array never change (storage is append-only; growing copies to a new array).
                ivf = self._build(rows, vectors)
            except Exception:
                log.exception("building the IVF failed: searches stay exact")
            with self._lock:
                self._building = None
                if ivf is not None and generation == self._generation:
                    self._finish_background_build(ivf, rows, n)
                if self._needs_build() and len(self._rows) >= self.background_above:
                    self._start_background_build()  # the storage was reset meanwhile, or has doubled again

        self._building = threading.Thread(target=run, name="facegate-ivf-build", daemon=True)
        self._building.start()
        log.info("building the IVF of %d faces in the background; exact search answers meanwhile", len(rows))

    def _finish_background_build(self, ivf: _Ivf, rows: npt.NDArray[np.int64], n: int) -> None:
        """Bring a finished IVF up to date with the adds and removals since it started, and switch to it."""
        added = np.arange(n, self._n, dtype=np.int64)
        added = added[np.isfinite(self._norms[n : self._n])]
        if len(added):
            ivf.index.add_with_ids(self._vectors[added], added)
        removed = rows[~np.isfinite(self._norms[rows])]
        if len(removed):
            _remove_ids(ivf.index, removed)
        self._ivf = ivf
        log.info("IVF ready: %d faces in %d cells", ivf.index.ntotal, ivf.nlist)

    def _build(self, rows: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32]) -> _Ivf:
        """Train a new IVF on a sample of `rows` of `vectors` and fill it with all of them."""
        nlist = self.nlist or auto_nlist(len(rows))
        nlist = max(1, min(nlist, len(rows)))
        rng = np.random.default_rng(0)  # same cells for the same gallery
        sample_size = min(len(rows), nlist * TRAIN_POINTS_PER_CELL)
        sample = np.sort(rng.choice(rows, size=sample_size, replace=False))
        quantizer = faiss.IndexFlatL2(EMBEDDING_DIM)
        index = faiss.IndexIVFFlat(quantizer, EMBEDDING_DIM, nlist, faiss.METRIC_L2)
        index.cp.niter = TRAIN_ITERATIONS
        index.cp.max_points_per_centroid = TRAIN_POINTS_PER_CELL
        index.cp.seed = 1234
        index.cp.verbose = False
        # faiss writes its own line to stderr (past the logging, so past FACEGATE_LOG__FORMAT=json) when a cell gets
        # fewer than 39 training points: a small FACEGATE_INDEX__MIN_SIZE or a large NLIST. Said here instead.
        index.cp.min_points_per_centroid = 1
        if sample_size < FAISS_MIN_POINTS_PER_CELL * nlist:
            log.info(
                "IVF: %d faces for %d cells (%.1f per cell, faiss suggests at least %d): cells are coarse until the "
                "gallery grows; FACEGATE_INDEX__NLIST sets fewer",
                sample_size,
                nlist,
                sample_size / nlist,
                FAISS_MIN_POINTS_PER_CELL,
            )
        index.train(np.ascontiguousarray(vectors[sample]))
        index.nprobe = min(self.nprobe, nlist)
        index.add_with_ids(np.ascontiguousarray(vectors[rows]), rows)
        return _Ivf(index, quantizer, len(rows), _ReadWriteLock())

    def _snapshot_extra(self) -> _Ivf | None:
        return self._ivf

    # ---------------------------------------------------------------------------------------- search

    def _search(self, snap: _Snapshot, q: npt.NDArray[np.float32], top_k: int) -> list[list[IdentityCandidate]]:
        ivf: _Ivf | None = snap.extra
        k = max(self.candidates, 4 * top_k)
        if ivf is None or snap.alive <= k:
            return super()._search(snap, q, top_k)
        with ivf.lock.read():
            _, found = ivf.index.search(q, k)
        results = []
        for i in range(len(q)):
            ranked = self._rank(snap, q[i], found[i], top_k)
            results.append(ranked if ranked is not None else super()._search(snap, q[i : i + 1], top_k)[0])
        return results

    @staticmethod
    def _rank(
        snap: _Snapshot, query: npt.NDArray[np.float32], rows: npt.NDArray[np.int64], top_k: int
    ) -> list[IdentityCandidate] | None:
        """The IVF's candidate rows ranked by identity with exact distances; None when they hold fewer than
        `top_k` identities (the caller searches exactly)."""
        rows = rows[(rows >= 0) & (rows < snap.n)]  # -1: fewer found; >= n: added after the snapshot
        rows = rows[np.isfinite(snap.norms[rows])]  # removed after the IVF returned them
        if len(rows) == 0:
            return None
        distances = ((snap.vectors[rows] - query) ** 2).sum(axis=1, dtype=np.float32)
        # Identities, not faces: with fewer identities than top_k, or many faces each, every search was exact.
        if np.unique(snap.codes[rows]).size < min(top_k, snap.identities):
            return None
        ranked = rank_faces(distances, snap.codes[rows], snap.identity_ids.__getitem__, row_faces(snap, rows), top_k)
        if len(ranked) == top_k and float(distances.max()) <= ranked[-1].distance:
            return None  # the candidates end tied with the last identity kept: faces left out may be as near
        return ranked
