"""The gallery: enrolled identities and faces in SQL (SQLite or PostgreSQL), searched through an in-memory index.

`Gallery` ties the engine, sessions and index together; the service layer calls its methods. Each write method
is one transaction; once it has committed, this process's index has the change, and other processes pick it up
with `refresh()` (called by `search` and `identity_distances` unless told not to).

A database that cannot serve for now (unreachable, restarting, locked, disk full) makes a method raise
DatabaseUnavailable or InsufficientStorage (`db.outages`) instead of SQLAlchemy's error; a write that failed left
nothing in the index, and the first `refresh()` after the database is back replays what others wrote meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from app.errors import DatabaseUnavailable, InsufficientStorage, ShuttingDown, UnknownIdentity
from app.gallery import db, store
from app.gallery.index import (
    MAX_REPLAY,
    GalleryIndex,
    IdentityCandidate,
    IndexStats,
    SearchIndex,
    SyncReport,
    create_index,
)
from app.gallery.store import (
    DeletionReport,
    DeploymentSettingRecord,
    FaceRecord,
    IdentityRecord,
)
from app.vision.types import Box

if TYPE_CHECKING:
    from app.config import IndexSettings

log = logging.getLogger(__name__)
# Changes of other processes a write replays right after its own (more are left to the next search).
CATCH_UP_AFTER_WRITE = 1000
# SQLite: how long a deletion waits for readers of older snapshots before leaving the WAL to be cut later (see
# Gallery.scrub_log). A request's reads take milliseconds.
SCRUB_WAIT_MS = 1000
SCRUB_RETRY_SECONDS = 5.0  # and how often it is tried again after that

__all__ = [
    "DeletionReport",
    "DeploymentSettingRecord",
    "DuplicateFace",
    "DuplicateGuard",
    "Enrolment",
    "FaceRecord",
    "Gallery",
    "GalleryIndex",
    "IdentityCandidate",
    "IdentityRecord",
    "IndexState",
    "IndexStats",
    "SchemaOutOfDate",
    "SearchIndex",
    "SyncReport",
    "face_ids_digest",
]


class SchemaOutOfDate(RuntimeError):
    """The database is not at the migrations' head and `migrate=False` was asked for (run `facegate db upgrade`)."""


@dataclass(frozen=True, slots=True)
class DuplicateGuard:
    """See `Gallery.enroll_face`: no face within `threshold` as of change `checked_upto`."""

    threshold: float
    checked_upto: int


class DuplicateFace(Exception):
    """An enrolment's face is within the guard's threshold of a face added while it was being checked."""

    def __init__(self, face_id: str, identity_id: str, distance: float) -> None:
        super().__init__(f"face {face_id} of identity {identity_id} is at distance {distance:.4f}")
        self.face_id, self.identity_id, self.distance = face_id, identity_id, distance


@dataclass(frozen=True, slots=True)
class Enrolment:
    identity_id: str
    identity_created: bool  # True: a new identity was made for this face
    face: FaceRecord
    face_added: bool = True  # False: the identity already had this face (`same_face_within`), `face` is that one


@dataclass(frozen=True, slots=True)
class IndexState:
    """What this process's index holds, comparable with the database without showing any embedding."""

    stats: IndexStats
    face_ids_sha256: str  # see `face_ids_digest`


def face_ids_digest(face_ids: Iterable[str]) -> str:
    """SHA-256 (hex) of the sorted face ids joined by newlines: equal digests = the same set of faces."""
    return hashlib.sha256("\n".join(sorted(face_ids)).encode()).hexdigest()


class Gallery:
    """Engine + sessions + the index of `model_version`'s faces."""

    # The change log only serves other workers catching up (a lag over MAX_REPLAY reloads in full anyway): every
    # `prune_every` changes, the rows older than the last `keep_changes` are deleted, so it does not grow forever.
    prune_every = 10_000
    keep_changes = MAX_REPLAY

    def __init__(
        self,
        engine: Engine,
        model_version: str,
        index: IndexSettings | None = None,
        *,
        write_wait: float | None = None,
    ) -> None:
        """`write_wait`: seconds a write waits for this process's earlier writes (`_write_session`) before it is
        answered DatabaseUnavailable; None or 0: as long as they take."""
        self.engine = engine
        self.model_version = model_version
        # Every write transaction takes the gallery's write lock first, so a process's writes run one at a time
        # whatever it allows here. Only one of them waits for the lock on a pooled connection; the others wait for
        # their turn without one. While another session held the lock (`facegate reindex`, an operator's
        # transaction), each waiting write held a connection until the lock timeout: as many as the pool has left
        # reads (a search's replay, a key check, /readyz) waiting for a connection until a writer gave up.
        self._writer = threading.Lock()
        self._write_wait = write_wait or None
        self.index: SearchIndex = create_index(model_version, index, engine)  # settings None: exact
        self._sessions = db.make_session_factory(engine)
        # Commits in progress, and whether new ones are refused (stop_writes), under one condition.
        self._commits = threading.Condition()
        self._committing = 0
        self._writes_stopped = False
        self._scrub_timer: threading.Timer | None = None  # a WAL scrub retried later (scrub_log), under _commits

    @classmethod
    def open(
        cls,
        database_url: str,
        model_version: str,
        *,
        migrate: bool = True,
        index: IndexSettings | None = None,
        adopt: Sequence[str] = (),
        **engine_options: Any,
    ) -> Gallery:
        """Connect, apply the migrations (unless `migrate=False`: then the schema must already be at head), relabel
        the faces stored under `adopt` (earlier builds' versions of the same embeddings) as `model_version`, and
        load the index (`index`: which search backend, see app/gallery/index.py; None: exact)."""
        engine = db.make_engine(database_url, **engine_options)
        try:
            if migrate:
                db.upgrade(engine)
            else:
                current, head = db.schema_revision(engine), db.head_revision()
                if current != head:
                    raise SchemaOutOfDate(
                        f"database schema is at {current}, expected {head}: run `facegate db upgrade`"
                    )
            # A write waits for its turn at most as long as for the database's lock (the statement timeout bounds
            # that wait when the lock timeout is 0).
            waits = (engine_options.get("lock_timeout"), engine_options.get("statement_timeout"))
            gallery = cls(engine, model_version, index, write_wait=next((w for w in waits if w), None))
            with gallery._plain_session() as session, session.begin():
                named = store.fill_missing_name_keys(session)
            if named:
                log.info("%d identities written by a facegate from before name keys given theirs", named)
            adopted = gallery.adopt_versions(adopt)
            if adopted:
                log.info("%d faces made by an earlier build of %s relabelled (same embeddings)", adopted, model_version)
            gallery.load()
        except BaseException:
            engine.dispose()
            raise
        return gallery

    def adopt_versions(self, versions: Sequence[str]) -> int:
        """Faces stored under `versions` now carry this gallery's model version; how many (see `store.relabel_faces`)."""
        stale = [v for v in versions if v != self.model_version]
        if not stale:
            return 0
        with self._plain_session() as session, session.begin():
            return store.relabel_faces(session, old_versions=stale, new_version=self.model_version)

    def stop_writes(self) -> None:
        """Refuse every later commit (ShuttingDown; the transaction is rolled back) and wait for those under way.

        At shutdown, before the inference threads drain: the requests still running then were cut at the end of the
        shutdown timeout and already answered 503, so what their threads would still write must not be stored."""
        with self._commits:
            self._writes_stopped = True
            self._commits.wait_for(lambda: self._committing == 0)

    def close(self) -> None:
        self.stop_writes()
        with self._commits:
            if self._scrub_timer is not None:
                self._scrub_timer.cancel()
                self._scrub_timer = None
        self.engine.dispose()

    @property
    def backend(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self.engine.dialect.name

    # ----------------------------------------------------------------------------------- transactions

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises. Gallery changes written in it
        (through `store`) are applied to this process's index right after the commit (a failed commit applies
        nothing). Do not roll back a savepoint around store writes inside it."""
        with db.outages(), self._sessions() as session:
            committing = False
            try:
                with session.begin():
                    yield session
                    committing = self._start_commit()  # the block ends here: begin() commits
            except BaseException:
                store.take_pending_changes(session)
                raise
            finally:
                if committing:
                    self._end_commit()
            changes = store.take_pending_changes(session)
            self.index.apply(changes)
        missed = min((c.id for c in changes), default=0) - self.index.stats().last_change_id - 1
        if 0 < missed <= CATCH_UP_AFTER_WRITE:
            # Other processes committed changes before ours that this index had not replayed: replay them now, so
            # that an index that just changed holds every change up to its own (the facegate_gallery_faces gauge
            # shows the worker whose index changed last). A worker further behind (a bulk load elsewhere) is left
            # to its next search: a write is not held up by a reload.
            try:
                self.refresh()
            except (DatabaseUnavailable, InsufficientStorage):
                pass  # the write is committed: it is answered as such; the next search replays
            except Exception:
                log.exception("replaying other workers' changes after a write failed (the next search replays)")
        ids = [c.id for c in changes]
        if ids and max(ids) // self.prune_every > (min(ids) - 1) // self.prune_every:  # crossed a multiple
            self.prune_changes()

    @contextmanager
    def _write_session(self) -> Iterator[Session]:
        """`session()` for a write: it starts once this process's earlier writes are done (see `__init__`), or
        raises DatabaseUnavailable after `write_wait` seconds without its turn (they are held up by another
        session's lock, which this write would have waited for too)."""
        if not self._writer.acquire(timeout=self._write_wait or -1):
            raise DatabaseUnavailable(
                f"the database did not answer within {self._write_wait:g} s: this worker's earlier writes were "
                "waiting for the gallery's write lock, which another session held (an operator's transaction, a long "
                "write such as `facegate reindex`?); nothing was stored; retry in a few seconds",
                retry_after_seconds=db.RETRY_AFTER_SECONDS,
            )
        try:
            with self.session() as session:
                yield session
        finally:
            self._writer.release()

    @contextmanager
    def _plain_session(self) -> Iterator[Session]:
        """A session for reads (or a `begin()` of the caller's), its database's outages raised as typed errors."""
        with db.outages(), self._sessions() as session:
            yield session

    def _start_commit(self) -> bool:
        with self._commits:
            if self._writes_stopped:
                raise ShuttingDown("the server is shutting down: nothing more is written")
            self._committing += 1
        return True

    def _end_commit(self) -> None:
        with self._commits:
            self._committing -= 1
            self._commits.notify_all()

    def prune_changes(self) -> int:
        """Delete the change-log rows older than the last `keep_changes`; how many went."""
        with self._plain_session() as session, session.begin():
            return store.prune_changes(session, keep_last=self.keep_changes)

    def face_counts(self) -> dict[str, int]:
        """Stored faces per model version, as the database holds them now (the index knows its own version's)."""
        with self._plain_session() as session:
            return store.face_counts(session)

    def ping(self) -> None:
        """Raises if the database cannot be reached."""
        with db.outages(), self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    # ------------------------------------------------------------------------------------------- index

    def load(self) -> IndexStats:
        """Rebuild the index from the database."""
        with self._plain_session() as session:
            return self.index.load(session)

    def refresh(self) -> SyncReport:
        """Bring the index up to date with changes committed by other processes (one primary-key read if none)."""
        with self._plain_session() as session:
            return self.index.sync(session)

    def stats(self) -> IndexStats:
        return self.index.stats()

    def peek_stats(self) -> IndexStats | None:
        """The index's counts without waiting (None while it is busy): see `GalleryIndex.peek_stats`."""
        return self.index.peek_stats()

    def index_state(self, *, refresh: bool = True) -> IndexState:
        """The index's counts, replay position and a digest of its face ids, after replaying the change log
        (unless `refresh=False`), like a search. Stats and ids are read until they agree (a write committed in
        this process between the two reads changes both)."""
        if refresh:
            self.refresh()
        while True:
            before = self.index.stats()
            face_ids = self.index.face_ids()
            if self.index.stats() == before and len(face_ids) == before.size:
                return IndexState(before, face_ids_digest(face_ids))

    def search(self, queries: npt.ArrayLike, *, top_k: int, refresh: bool = True) -> list[list[IdentityCandidate]]:
        """Per query embedding, up to `top_k` nearest identities (nearest face each, squared L2), nearest first."""
        if refresh:
            self.refresh()
        with db.outages():  # the pgvector backend searches in the database
            return self.index.search(queries, top_k=top_k)

    def identity_distances(
        self, query: npt.ArrayLike, identity_id: str, *, refresh: bool = True
    ) -> tuple[list[str], npt.NDArray[np.float32]]:
        """Squared L2 from `query` to each searchable face of the identity, nearest first. Raises UnknownIdentity;
        empty when the identity exists but has no face of this model version."""
        if refresh:
            self.refresh()
        face_ids, distances = self.index.identity_distances(query, identity_id)
        if not face_ids:
            with self._plain_session() as session:
                if not store.identity_exists(session, identity_id=identity_id):
                    raise UnknownIdentity(f"unknown identity {identity_id!r}", identity_id=identity_id)
        return face_ids, distances

    # ----------------------------------------------------------------------------------------- writes

    def enroll_face(
        self,
        *,
        embedding: npt.ArrayLike,
        box: Box,
        score: float,
        identity_id: str | None = None,
        name: str | None = None,
        metadata: dict[str, Any] | None = None,
        image: bytes | None = None,
        base_embedding: npt.ArrayLike | None = None,
        unless_near: DuplicateGuard | None = None,
        same_face_within: float | None = None,
    ) -> Enrolment:
        """Add a face to `identity_id`, or to a new identity called `name` (exactly one of the two), in one
        transaction. `metadata` only with `name`. Raises UnknownIdentity.

        `unless_near`: the caller searched the gallery up to change `checked_upto` and found no face within
        `threshold`; under the write lock, the faces added since are compared too, and DuplicateFace is raised
        (nothing written) if one is that close. Two concurrent enrolments of one new face cannot both pass.

        `same_face_within` (with `identity_id`): when one of the identity's faces is within this squared distance
        (the same photo again: a client retrying a request whose answer it lost), nothing is written and that face
        is returned (`face_added` False). Checked under the write lock, so two concurrent retries add it once."""
        if (identity_id is None) == (name is None):
            raise ValueError("give exactly one of identity_id and name")
        if identity_id is not None and metadata is not None:
            raise ValueError("metadata can only be given with a new identity's name")
        with self._write_session() as session:
            if unless_near is not None:
                store.lock_gallery(session)
                near = store.nearest_added_since(
                    session, after=unless_near.checked_upto, embedding=embedding, model_version=self.model_version
                )
                if near is not None and near[2] <= unless_near.threshold:
                    raise DuplicateFace(*near)
            if identity_id is not None and same_face_within is not None:
                store.lock_gallery(session)
                same = _same_face(session, identity_id, embedding, self.model_version, same_face_within)
                if same is not None:
                    return Enrolment(identity_id, False, same, face_added=False)
            created = False
            if identity_id is None:
                assert name is not None
                identity_id = store.create_identity(session, name=name, metadata=metadata).id
                created = True
            face = store.add_face(
                session,
                identity_id=identity_id,
                embedding=embedding,
                model_version=self.model_version,
                box=box,
                score=score,
                image=image,
                base_embedding=base_embedding,
            )
        return Enrolment(identity_id, created, face)

    def bulk_enrol(
        self,
        *,
        names: Sequence[str],
        embeddings: npt.ArrayLike,
        boxes: Sequence[Box] | None = None,
        scores: Sequence[float] | None = None,
    ) -> list[FaceRecord]:
        """One new identity per name with one face each, in one transaction (seeding; see `store.bulk_enrol`)."""
        with self._write_session() as session:
            return store.bulk_enrol(
                session,
                names=names,
                embeddings=embeddings,
                model_version=self.model_version,
                boxes=boxes,
                scores=scores,
            )

    def create_identity(self, *, name: str, metadata: dict[str, Any] | None = None) -> IdentityRecord:
        with self._write_session() as session:
            return store.create_identity(session, name=name, metadata=metadata)

    def update_identity(
        self, identity_id: str, *, name: str | None = None, metadata: dict[str, Any] | None = None
    ) -> IdentityRecord:
        with self._write_session() as session:
            updated = store.update_identity(session, identity_id=identity_id, name=name, metadata=metadata)
        self.scrub_log()  # the old name and metadata
        return updated

    def delete_identity(self, identity_id: str) -> DeletionReport:
        with self._write_session() as session:
            report = store.delete_identity(session, identity_id=identity_id)
        self.scrub_log()
        return report

    def delete_face(self, identity_id: str, face_id: str) -> DeletionReport:
        with self._write_session() as session:
            report = store.delete_face(session, identity_id=identity_id, face_id=face_id)
        self.scrub_log()
        return report

    def purge_photos(self) -> int:
        """Drop every stored photo, keeping the faces (see `store.purge_photos`); how many went."""
        with self._write_session() as session:
            purged = store.purge_photos(session)
        if purged:
            self.scrub_log()
        return purged

    def scrub_log(self, *, retry: bool = False) -> bool:
        """SQLite: after data was erased, copy the WAL into the database file (where `secure_delete` zeroes the
        freed rows) and truncate the WAL, which otherwise keeps the erased rows' old pages until they happen to be
        overwritten. True when done; False when a reader still uses an older snapshot: the scrub is then tried again
        every SCRUB_RETRY_SECONDS on a timer until it is done (or the process stops; the WAL is cut at the next
        start too: `journal_size_limit` 0). A quiet gallery would otherwise keep a deleted person's rows in the WAL
        until its next deletion or restart. PostgreSQL: nothing to do here (dead tuples wait for VACUUM).

        The checkpoint waits for such a reader through the busy handler: up to SCRUB_WAIT_MS, not the connection's
        busy timeout (the lock timeout), which held a deletion's answer that long behind any long read (an index
        load, a calibration, `db copy`) after the deletion itself was committed."""
        if self.backend != "sqlite":
            return True
        with (
            db.outages(),
            self.engine.connect() as connection,
            db.sqlite_busy_timeout(connection, lambda busy_ms: min(busy_ms, SCRUB_WAIT_MS)),
        ):
            busy, _, _ = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        if busy:
            if not retry:  # once, not at every try
                log.info("SQLite WAL not truncated after an erasure: a reader is active (tried again shortly)")
            self._scrub_later()
        return not busy

    def _scrub_later(self) -> None:
        with self._commits:
            if self._scrub_timer is not None or self._writes_stopped:
                return  # one retry pending at a time; none once the gallery closes
            timer = threading.Timer(SCRUB_RETRY_SECONDS, self._retry_scrub)
            timer.name, timer.daemon = "facegate-wal-scrub", True
            self._scrub_timer = timer
        timer.start()

    def _retry_scrub(self) -> None:
        with self._commits:
            self._scrub_timer = None
            if self._writes_stopped:
                return
        try:
            self.scrub_log(retry=True)  # schedules the next try while a reader remains
        except Exception as error:  # the database is away: the next deletion or start scrubs
            log.warning("SQLite WAL scrub failed: %s", error)

    # ------------------------------------------------------------------------------------------ reads

    def get_identity(self, identity_id: str) -> IdentityRecord:
        with self.session() as session:
            return store.get_identity(session, identity_id=identity_id)

    def face_image(self, identity_id: str, face_id: str) -> bytes | None:
        """The face's stored photo, None when photos were not kept. Raises UnknownFace."""
        with self.session() as session:
            return store.face_image(session, identity_id=identity_id, face_id=face_id)

    def identity_names(self, identity_ids: Iterable[str]) -> dict[str, str]:
        with self.session() as session:
            return store.identity_names(session, identity_ids=identity_ids)

    def identities_named(self, name: str) -> dict[str, str]:
        with self.session() as session:
            return store.identities_named(session, name=name)

    def list_identities(
        self,
        *,
        offset: int = 0,
        limit: int = 100,
        name_contains: str | None = None,
        after: store.PageKey | None = None,
    ) -> store.IdentityListing:
        with self.session() as session:
            return store.list_identities(
                session, offset=offset, limit=limit, name_contains=name_contains, after=after
            )

    def get_setting(self, key: str) -> DeploymentSettingRecord | None:
        with self.session() as session:
            return store.get_setting(session, key=key)

    def set_setting(self, key: str, value: Any, *, source: str | None = None) -> DeploymentSettingRecord:
        with self._write_session() as session:
            return store.set_setting(session, key=key, value=value, source=source)

    def delete_setting(self, key: str) -> bool:
        """False when none was stored."""
        with self._write_session() as session:
            return store.delete_setting(session, key=key)


def _same_face(
    session: Session, identity_id: str, embedding: npt.ArrayLike, model_version: str, within: float
) -> store.FaceRecord | None:
    """The identity's face (of `model_version`) nearest to `embedding` if it is within `within`, else None."""
    face_ids, vectors = store.face_embeddings(session, identity_id=identity_id, model_version=model_version)
    if not face_ids:
        return None
    distances = ((vectors - np.asarray(embedding, np.float32)) ** 2).sum(axis=1)
    best = int(np.argmin(distances))
    if float(distances[best]) > within:
        return None
    return next(f for f in store.get_identity(session, identity_id=identity_id).faces if f.id == face_ids[best])
