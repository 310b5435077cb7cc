"""The in-memory search index: every face of one model version as a float32 matrix, kept in step with the
database by replaying the change log (`gallery_changes`).

Storage is append-only, so a search works on a snapshot without holding the lock: a new face is written past the
rows any snapshot can see; a removed face keeps its row but its squared norm becomes +inf (the norms array is
copied, never changed in place), which puts it at infinite distance. Half-dead storage is compacted.

Keeping several processes in step:
- `sync(session)` replays the changes after the last one seen (ids are gap-free and committed in id order, see
  `tables.py`); a gap (log pruned) or a database behind us means a full `load`.
- `apply(changes)` is called by the process that committed them, right after its commit, so that its own writes
  are searchable at once. Changes at or below the replay position are skipped (the replay already has them and
  anything later); a face removed here is remembered until the replay passes its removal, so that a replay batch
  read before that removal cannot bring the face back.

Search backends (`SearchIndex` is what `Gallery` relies on; `create_index` picks one from the settings):
- `GalleryIndex` (exact, the default): every face compared, |q|^2 + |g|^2 - 2 q.g as one float32 matmul, which
  short-lists; the answer is ranked on the exact float32 distance (`rank_faces`).
- `ApproximateIndex` (app/gallery/ann.py): the same storage and replay plus a faiss IVF over it, for large galleries.
- `PgvectorIndex` (app/gallery/pgvector.py): the same bookkeeping, nearest faces found inside PostgreSQL.
Every backend ranks its candidate faces with `rank_faces`: exact distances, identities nearest first, equal
distances ordered by identity id (an identity's equally near faces by face id), so a ranking depends neither on
the order faces were enrolled in nor on the backend. Subclasses follow the storage through three hooks (`_on_reset`, `_on_appended`, `_on_removed`), called with the
state lock held, and answer searches in `_search`.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from sqlalchemy.orm import Session

from app.gallery import bulk, db, store
from app.gallery.store import Change, ChangeOp
from app.matching.distances import EXPANSION_ERROR
from app.vision.types import EMBEDDING_DIM

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from app.config import IndexSettings

# A replay further behind than this is done as a full load instead.
MAX_REPLAY = 50_000
_MIN_CAPACITY = 1024
_COMPACT_MIN_DEAD = 1024


@dataclass(frozen=True, slots=True)
class IdentityCandidate:
    identity_id: str
    face_id: str  # the identity's nearest face
    distance: float  # squared L2


@dataclass(frozen=True, slots=True)
class IndexStats:
    model_version: str
    size: int  # searchable faces
    identities: int  # identities with at least one searchable face
    stale: int  # stored faces of another model version: not searchable until re-enrolled
    last_change_id: int  # replay position


@dataclass(frozen=True, slots=True)
class SyncReport:
    applied: int  # change-log entries replayed
    reloaded: bool  # a full load was done instead


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    """Changes after < id <= head, read from the log in one consistent query."""

    after: int
    head: int
    changes: tuple[Change, ...]


@dataclass(frozen=True, slots=True)
class _Snapshot:
    vectors: npt.NDArray[np.float32]  # (n, 128)
    norms: npt.NDArray[np.float32]  # (n,), +inf for removed rows
    codes: npt.NDArray[np.int32]  # (n,) identity code per row
    face_ids: list[str]  # row -> face id (read only below n)
    identity_ids: list[str]  # code -> identity id
    code_of: dict[str, int]  # identity id -> code
    n: int
    alive: int  # searchable faces
    identities: int  # identities with a searchable face
    max_norm: float  # at least every searchable face's squared norm (the short-list's error bound)
    extra: Any = None  # a backend's own structure as it was at the snapshot (see `_snapshot_extra`)


class SearchIndex(Protocol):
    """What `Gallery` (and checks) use of an index; every backend keeps the change-log replay of `GalleryIndex`."""

    model_version: str
    backend: str  # 'exact', 'approximate' or 'pgvector'

    def load(self, session: Session) -> IndexStats: ...
    def sync(self, session: Session) -> SyncReport: ...
    def fetch(self, session: Session) -> ChangeBatch | None: ...
    def replay(self, batch: ChangeBatch) -> bool: ...
    def apply(self, changes: Iterable[Change]) -> None: ...
    def stats(self) -> IndexStats: ...
    def peek_stats(self) -> IndexStats | None: ...
    def face_ids(self) -> set[str]: ...
    def contains(self, face_id: str) -> bool: ...
    def search(self, queries: npt.ArrayLike, *, top_k: int) -> list[list[IdentityCandidate]]: ...
    def identity_distances(
        self, query: npt.ArrayLike, identity_id: str
    ) -> tuple[list[str], npt.NDArray[np.float32]]: ...


def create_index(model_version: str, settings: IndexSettings | None = None, engine: Engine | None = None) -> SearchIndex:
    """The index the settings ask for (None: exact). The approximate backend needs the `ann` extra (faiss-cpu);
    pgvector needs `engine` on a PostgreSQL server that has the extension (raises PgvectorUnavailable otherwise)."""
    from app.config import IndexBackend

    if settings is None or settings.backend is IndexBackend.EXACT:
        return GalleryIndex(model_version)
    if settings.backend is IndexBackend.APPROXIMATE:
        from app.gallery.ann import ApproximateIndex

        return ApproximateIndex(
            model_version,
            min_size=settings.min_size,
            nlist=settings.nlist,
            nprobe=settings.nprobe,
            candidates=settings.candidates,
        )
    if settings.backend is IndexBackend.PGVECTOR:
        from app.gallery.pgvector import PgvectorIndex

        if engine is None:
            raise ValueError("the pgvector index needs the gallery's engine")
        return PgvectorIndex(
            model_version,
            engine,
            candidates=settings.candidates,
            ef_search=settings.pgvector_ef_search,
            build_memory=settings.pgvector_build_memory,
            m=settings.pgvector_m,
            ef_construction=settings.pgvector_ef_construction,
        )
    raise ValueError(f"unknown index backend {settings.backend!r}")


class GalleryIndex:
    """Faces of `model_version`, searchable by squared L2 (exact search). Thread-safe."""

    backend = "exact"

    def __init__(self, model_version: str) -> None:
        self.model_version = model_version
        self._lock = threading.Lock()  # guards the state below
        self._sync_lock = threading.RLock()  # one database replay at a time
        self._reset(0)

    # ------------------------------------------------------------------------------------------ state

    def _reset(self, capacity: int) -> None:
        capacity = max(capacity, _MIN_CAPACITY)
        self._vectors = np.zeros((capacity, EMBEDDING_DIM), dtype=np.float32)
        self._norms = np.full(capacity, np.inf, dtype=np.float32)
        self._codes = np.zeros(capacity, dtype=np.int32)
        self._face_ids: list[str] = []
        self._rows: dict[str, int] = {}  # alive face id -> row
        self._n = 0
        self._max_norm = 0.0  # never lowered by a removal: an upper bound is all the search needs
        self._identity_ids: list[str] = []
        self._code_of: dict[str, int] = {}
        self._alive_per_code: dict[int, int] = {}
        self._stale: dict[str, str] = {}  # face id -> identity id, faces of another model version
        self._last_seen = 0
        self._pending_removed: dict[str, int] = {}  # face id -> change id of a local removal not yet replayed
        self._on_reset()

    # Hooks for backends that keep a structure over the storage rows (called with `_lock` held).

    def _on_reset(self) -> None:
        """The storage was emptied (a load or a compaction follows with `_on_appended`)."""

    def _on_appended(self, start: int, end: int) -> None:
        """Rows start..end-1 were appended (vectors in `_vectors[start:end]`)."""

    def _on_removed(self, rows: list[int]) -> None:
        """These rows were removed (their norms are +inf from now on)."""

    def _snapshot_extra(self) -> Any:
        return None

    def _snapshot(self) -> _Snapshot:
        with self._lock:
            n = self._n
            return _Snapshot(
                self._vectors[:n],
                self._norms[:n],
                self._codes[:n],
                self._face_ids,
                self._identity_ids,
                self._code_of,
                n,
                len(self._rows),
                len(self._alive_per_code),
                self._max_norm,
                self._snapshot_extra(),
            )

    @property
    def size(self) -> int:
        """Searchable faces."""
        with self._lock:
            return len(self._rows)

    @property
    def identities(self) -> int:
        """Identities with at least one searchable face."""
        with self._lock:
            return len(self._alive_per_code)

    @property
    def stale(self) -> int:
        """Stored faces made by another model version (excluded from search)."""
        with self._lock:
            return len(self._stale)

    @property
    def last_change_id(self) -> int:
        with self._lock:
            return self._last_seen

    def stats(self) -> IndexStats:
        with self._lock:
            return self._stats_locked()

    def peek_stats(self) -> IndexStats | None:
        """`stats` if the state is free now, else None: for callers on the event loop (metrics), which must not wait
        while a load, a replay or an approximate index's build holds the lock (seconds on a large gallery)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._stats_locked()
        finally:
            self._lock.release()

    def _stats_locked(self) -> IndexStats:
        return IndexStats(
            self.model_version, len(self._rows), len(self._alive_per_code), len(self._stale), self._last_seen
        )

    def contains(self, face_id: str) -> bool:
        with self._lock:
            return face_id in self._rows

    def face_ids(self) -> set[str]:
        """Every searchable face id (for checks; O(n))."""
        with self._lock:
            return set(self._rows)

    # ---------------------------------------------------------------------------------------- database

    def load(self, session: Session) -> IndexStats:
        """Rebuild from every stored face. Faces of another model version are counted as stale and left out."""
        with self._sync_lock:
            # Reading 1M faces takes longer than a request's statement may (at start-up, or a worker that fell
            # behind the pruned log): not cut by the statement timeout, which would leave the worker unable to start.
            db.without_statement_timeout(session.connection())
            head = store.last_change_id(session)
            face_ids, identity_ids, versions, embeddings = bulk.read_faces(session)  # a later snapshot than `head`
            self.replace_all(face_ids, identity_ids, embeddings, last_change_id=head, model_versions=versions)
            return self.stats()

    def replace_all(
        self,
        face_ids: list[str],
        identity_ids: list[str],
        embeddings: npt.NDArray[np.float32],
        *,
        last_change_id: int,
        model_versions: list[str] | None = None,
    ) -> None:
        """Replace the whole content with these faces as of change `last_change_id` (`load`'s second half; benches
        fill large indexes with it). Faces of another model version (None: all are this one) count as stale."""
        if not (len(face_ids) == len(identity_ids) == len(embeddings)):
            raise ValueError("face_ids, identity_ids and embeddings must have the same length")
        with self._lock:
            pending = {f: c for f, c in self._pending_removed.items() if c > last_change_id}
            self._reset(len(face_ids) * 5 // 4)
            self._pending_removed = pending
            self._last_seen = last_change_id
            if not pending and (model_versions is None or model_versions.count(self.model_version) == len(face_ids)):
                self._append_many(list(face_ids), list(identity_ids), embeddings)
                return
            current = []
            for i, face_id in enumerate(face_ids):
                if face_id in pending:
                    continue  # removed by this process after `head`; its 'remove' is still to be replayed
                if model_versions is None or model_versions[i] == self.model_version:
                    current.append(i)
                else:
                    self._stale[face_id] = identity_ids[i]
            self._append_many([face_ids[i] for i in current], [identity_ids[i] for i in current], embeddings[current])

    def sync(self, session: Session) -> SyncReport:
        """Replay the changes committed since the last one seen; cheap (one primary-key read) when there are none.
        A gap in the log (pruned past our position) or a database behind us means a full load."""
        with self._sync_lock:
            batch = self.fetch(session)
            if batch is None:
                self._reload(session)
                return SyncReport(0, True)
            if not batch.changes:
                return SyncReport(0, False)
            if not self.replay(batch):
                self._reload(session)
                return SyncReport(0, True)
            return SyncReport(len(batch.changes), False)

    def _reload(self, session: Session) -> None:
        """`sync`'s full load (a gap in the log); a backend may leave catching up its own structure to later."""
        self.load(session)

    def fetch(self, session: Session) -> ChangeBatch | None:
        """Read the changes after the replay position (the first half of `sync`). None: replaying cannot bring
        the index up to date (log pruned, database reset, or too far behind): load instead."""
        head = store.last_change_id(session)
        after = self.last_change_id
        if head == after:
            return ChangeBatch(after, head, ())
        if head < after or head - after > MAX_REPLAY:
            return None
        changes = tuple(store.changes_after(session, after=after, upto=head))
        if [c.id for c in changes] != list(range(after + 1, head + 1)):
            return None
        return ChangeBatch(after, head, changes)

    def replay(self, batch: ChangeBatch) -> bool:
        """Apply a fetched batch (the second half of `sync`). Changes already replayed are skipped; False (nothing
        done) if the batch starts past the replay position."""
        with self._lock:
            if batch.after > self._last_seen:
                return False
            self._apply_locked([c for c in batch.changes if c.id > self._last_seen])
            self._last_seen = max(self._last_seen, batch.head)
            self._pending_removed = {f: c for f, c in self._pending_removed.items() if c > self._last_seen}
            return True

    def apply(self, changes: Iterable[Change]) -> None:
        """Apply changes this process has just committed (from `store.take_pending_changes`)."""
        with self._lock:
            ahead = [c for c in changes if c.id > self._last_seen]
            for change in ahead:
                if change.op is ChangeOp.REMOVE:
                    self._pending_removed[change.face_id] = max(change.id, self._pending_removed.get(change.face_id, 0))
            self._apply_locked(ahead)

    def _apply_locked(self, changes: list[Change]) -> None:
        """Idempotent: adding a present face or removing an absent one does nothing."""
        start = 0
        while start < len(changes):
            # Runs of adds are appended in one go; removes are batched too (one copy of the norms per run).
            op = changes[start].op
            end = start
            while end < len(changes) and changes[end].op is op:
                end += 1
            run = changes[start:end]
            if op is ChangeOp.ADD:
                self._add_run(run)
            else:
                self._remove_run(run)
            start = end

    def _add_run(self, run: list[Change]) -> None:
        fresh: dict[str, Change] = {}
        for change in run:
            if change.embedding is None or change.face_id in self._rows or change.face_id in self._pending_removed:
                continue  # removed since (a 'remove' follows), already here, or removed by this process
            if change.model_version != self.model_version:
                self._stale[change.face_id] = change.identity_id
                continue
            fresh[change.face_id] = change
        if fresh:
            changes = list(fresh.values())
            self._append_many(
                [c.face_id for c in changes],
                [c.identity_id for c in changes],
                np.stack([np.asarray(c.embedding, dtype=np.float32) for c in changes]),
            )

    def _remove_run(self, run: list[Change]) -> None:
        rows = []
        for change in run:
            self._stale.pop(change.face_id, None)
            row = self._rows.pop(change.face_id, None)
            if row is None:
                continue
            rows.append(row)
            code = int(self._codes[row])
            left = self._alive_per_code[code] - 1
            if left:
                self._alive_per_code[code] = left
            else:
                del self._alive_per_code[code]
        if not rows:
            return
        norms = self._norms.copy()  # snapshots hold the old array
        norms[rows] = np.inf
        self._norms = norms
        # A deleted face's embedding must not stay in the worker's memory until a compaction (which a large
        # gallery may never reach): its row is zeroed. A search still running on an older snapshot computes a
        # distance of |q|^2 + its old norm for it, never a match.
        self._vectors[rows] = 0.0
        self._on_removed(rows)
        dead = self._n - len(self._rows)
        if dead >= _COMPACT_MIN_DEAD and dead * 2 > self._n:
            self._compact()

    def _append_many(self, face_ids: list[str], identity_ids: list[str], vectors: npt.NDArray[np.float32]) -> None:
        count = len(face_ids)
        if count == 0:
            return
        needed = self._n + count
        if needed > len(self._vectors):
            capacity = max(needed, len(self._vectors) * 2)
            vectors_new = np.zeros((capacity, EMBEDDING_DIM), dtype=np.float32)
            vectors_new[: self._n] = self._vectors[: self._n]
            norms_new = np.full(capacity, np.inf, dtype=np.float32)
            norms_new[: self._n] = self._norms[: self._n]
            codes_new = np.zeros(capacity, dtype=np.int32)
            codes_new[: self._n] = self._codes[: self._n]
            self._vectors, self._norms, self._codes = vectors_new, norms_new, codes_new
        # Written for a million faces at start-up: C-level loops (setdefault, zip, update) rather than per-face Python
        # statements. New identities get the next codes in order of first appearance (`_identity_ids` and
        # `_code_of` always have the same length).
        code_of = self._code_of
        known = len(code_of)
        codes = np.fromiter(
            (code_of.setdefault(identity_id, len(code_of)) for identity_id in identity_ids), dtype=np.int32, count=count
        )
        if len(code_of) > known:
            self._identity_ids.extend(itertools.islice(code_of, known, None))
        present, counts = np.unique(codes, return_counts=True)
        alive = self._alive_per_code
        for code, added in zip(present.tolist(), counts.tolist()):
            alive[code] = alive.get(code, 0) + added
        rows = slice(self._n, needed)
        block = np.ascontiguousarray(vectors, dtype=np.float32)
        self._vectors[rows] = block
        self._norms[rows] = np.einsum("ij,ij->i", block, block)
        self._max_norm = max(self._max_norm, float(self._norms[rows].max()))
        self._codes[rows] = codes
        self._rows.update(zip(face_ids, range(self._n, needed)))
        self._face_ids.extend(face_ids)
        start, self._n = self._n, needed
        self._on_appended(start, needed)

    def _compact(self) -> None:
        """Drop removed rows (and identities without faces): new arrays, so running searches are unaffected."""
        order = sorted(self._rows.items(), key=lambda item: item[1])
        rows = np.fromiter((row for _, row in order), dtype=np.int64, count=len(order))
        face_ids = [face_id for face_id, _ in order]
        identity_ids = [self._identity_ids[int(code)] for code in self._codes[rows]]
        vectors = self._vectors[rows]
        stale, last_seen, pending = self._stale, self._last_seen, self._pending_removed
        self._reset(len(face_ids) * 5 // 4)
        self._stale, self._last_seen, self._pending_removed = stale, last_seen, pending
        self._append_many(face_ids, identity_ids, vectors)

    # ------------------------------------------------------------------------------------------ search

    def search(self, queries: npt.ArrayLike, *, top_k: int) -> list[list[IdentityCandidate]]:
        """For each query (m, 128): up to `top_k` identities, nearest first, each with its nearest face.

        |q|^2 + |g|^2 - 2 q.g in float32 (clipped at 0) short-lists; identities and their nearest faces are chosen
        and ranked on sum((g - q)^2) in float32, the distance reported, equal to a direct 1:1 comparison (ties:
        `rank_faces`).
        """
        q = _as_queries(queries)
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        snap = self._snapshot()
        if snap.alive == 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        return self._search(snap, q, top_k)

    def _search(self, snap: _Snapshot, q: npt.NDArray[np.float32], top_k: int) -> list[list[IdentityCandidate]]:
        """Exact search of valid, non-empty queries against a non-empty snapshot."""
        distances = q @ snap.vectors.T
        distances *= -2.0
        distances += snap.norms[np.newaxis, :]
        distances += np.einsum("ij,ij->i", q, q)[:, np.newaxis]
        np.maximum(distances, 0.0, out=distances)
        return [self._top_identities(snap, q[i], distances[i], min(top_k, snap.alive)) for i in range(len(q))]

    @staticmethod
    def _top_identities(
        snap: _Snapshot, query: npt.NDArray[np.float32], row: npt.NDArray[np.float32], top_k: int
    ) -> list[IdentityCandidate]:
        """`row` (the expansion) short-lists a window of the k nearest faces, ranked on their exact distances; the
        window is widened until it holds `top_k` identities and every face outside it is provably farther."""
        n = snap.n
        k = min(n, max(4 * top_k, top_k + 32))
        # A face's expansion is within `slack` of its exact distance (`EXPANSION_ERROR`).
        slack = EXPANSION_ERROR * (float(query @ query) + snap.max_norm)
        while True:
            window = np.argpartition(row, k - 1)[:k] if k < n else np.arange(n)
            edge = float(row[window].max())  # every face outside the window is at least this far by the expansion
            window = window[np.isfinite(row[window])]
            distances = ((snap.vectors[window] - query) ** 2).sum(axis=1, dtype=np.float32)
            ranked = rank_faces(
                distances,
                snap.codes[window],
                snap.identity_ids.__getitem__,
                row_faces(snap, window),
                top_k,
            )
            exhausted = k >= n or not math.isfinite(edge)  # nothing searchable outside the window
            if exhausted or (len(ranked) >= top_k and ranked[-1].distance < edge - slack):
                return ranked
            k = min(n, k * 4)

    def identity_distances(self, query: npt.ArrayLike, identity_id: str) -> tuple[list[str], npt.NDArray[np.float32]]:
        """Squared L2 from `query` (128,) to each searchable face of the identity: (face ids, distances), nearest
        first. Empty when the identity has no face of this model version (or does not exist)."""
        q = _as_queries(query).reshape(EMBEDDING_DIM)
        snap = self._snapshot()
        code = snap.code_of.get(identity_id)
        if code is None or snap.n == 0:
            return [], np.zeros(0, dtype=np.float32)
        rows = np.flatnonzero((snap.codes == code) & np.isfinite(snap.norms))
        distances = ((snap.vectors[rows] - q) ** 2).sum(axis=1, dtype=np.float32)
        order = np.argsort(distances, kind="stable")
        return [snap.face_ids[int(r)] for r in rows[order]], distances[order]


def rank_faces(
    distances: npt.NDArray[np.float32],
    codes: npt.NDArray[np.integer[Any]],
    identity_of: Callable[[int], str],
    face_of: Callable[[int], str],
    top_k: int,
) -> list[IdentityCandidate]:
    """Candidate faces -> up to `top_k` identities, nearest first, each with its nearest face.

    Entry j is a face: its exact distance `distances[j]` and identity code `codes[j]`; `identity_of(code)` and
    `face_of(j)` give the ids, asked only of the faces kept. Equal distances are ordered by identity id, and an
    identity's equally near faces by face id, so the answer depends on neither the candidates' order (insertion
    order, an IVF's or PostgreSQL's order) nor the backend.
    """
    if distances.size == 0:
        return []
    order = np.lexsort((distances, codes))  # by identity, then distance
    c, d = codes[order], distances[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])  # each identity's nearest face
    if starts.size > top_k:  # the top_k nearest identities, and any tied with the last of them
        nearest = d[starts]
        starts = starts[nearest <= np.partition(nearest, top_k - 1)[top_k - 1]]
    picked = []
    for p in starts.tolist():
        q = p + 1
        while q < c.size and c[q] == c[p] and d[q] == d[p]:
            q += 1
        face = min(face_of(int(j)) for j in order[p:q])
        picked.append(IdentityCandidate(identity_of(int(c[p])), face, float(d[p])))
    picked.sort(key=lambda candidate: (candidate.distance, candidate.identity_id))
    return picked[:top_k]


def row_faces(snap: _Snapshot, rows: npt.NDArray[np.int64]) -> Callable[[int], str]:
    """`rank_faces`'s face_of for candidates that are storage rows of `snap`."""
    return lambda j: snap.face_ids[int(rows[j])]


def _as_queries(queries: npt.ArrayLike) -> npt.NDArray[np.float32]:
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q.reshape(1, -1)
    if q.ndim != 2 or q.shape[1] != EMBEDDING_DIM:
        raise ValueError(f"queries must have shape (m, {EMBEDDING_DIM}), got {np.shape(queries)}")
    if not np.all(np.isfinite(q)):
        raise ValueError("queries have non-finite values")
    return np.ascontiguousarray(q)


def background_done(thread: threading.Thread | None, timeout: float | None = None) -> bool:
    """Wait up to `timeout` seconds for a backend's background thread (None: none was started); True when none is
    running any more."""
    if thread is not None:
        thread.join(timeout)
        return not thread.is_alive()
    return True
