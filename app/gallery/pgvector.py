"""Search inside PostgreSQL with pgvector (FACEGATE_INDEX__BACKEND=pgvector), when the server has the extension.

No migration of the main chain: the extension, the `face_vectors` table (face id, identity id, model version,
`vector(128)`), its HNSW index (`vector_l2_ops`, with the settings' m and ef_construction; one built with others
is replaced by the next mirror's full copy) and `face_vectors_state` (the change-log id mirrored so far) are
created when this backend starts, under an advisory lock. A server without pgvector makes start-up fail with
`PgvectorUnavailable`, which says so; nothing falls back silently.

`face_vectors` follows `faces` through the same change log the in-memory indexes replay: before a search (and at
load) the first worker to get the state row's lock copies the new adds and applies the removes, REPLAY_CHUNK per
transaction. A gap in the log, a first start or other HNSW build parameters copy every face instead (binary COPY
into a new table, its HNSW index built over all rows, then swapped in with the changes made meanwhile), one worker
at a time; the old table serves until the swap. A search that finds the row taken does not wait, and one that
finds more than INLINE_CHANGES to apply, or a full copy needed, leaves the work to a thread: all are answered by
the in-memory exact search.

PostgreSQL proposes the `candidates` nearest faces (HNSW with `hnsw.ef_search` = index.pgvector_ef_search, at least
2 x candidates; iterative scans from pgvector 0.8 so that the model-version filter cannot starve the result); they
are ranked by identity with exact float32 distances, as in the approximate backend. The process keeps `GalleryIndex`'s
bookkeeping (counts, replay position, 1:1 distances), so `stats()` and `identity_distances()` stay in memory.
A deletion leaves `face_vectors` in its own transaction, made by any process, whatever backend it runs
(`store._forget_vectors`), without waiting for a worker's replay: the replay of its REMOVE then finds no row, and a
full copy under way applies it to the new table when it swaps it in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, Engine, TextClause, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.gallery import bulk, db, store
from app.gallery.index import (
    MAX_REPLAY,
    GalleryIndex,
    IdentityCandidate,
    IndexStats,
    _Snapshot,
    background_done,
    rank_faces,
)
from app.gallery.store import Change, ChangeOp
from app.vision.types import EMBEDDING_DIM

logger = logging.getLogger(__name__)

_PG_SETUP_LOCK = 0x66677663  # "fgvc", with the schema's hash
_BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_BINARY_TRAILER = (-1).to_bytes(2, "big", signed=True)
_PG_EXTENSION_LOCK = 0x66677665  # "fgve": the database's CREATE EXTENSION, whatever the schema
_PG_COPY_LOCK = 0x66677670  # "fgvp": one worker copies every face at a time
_NEXT = "face_vectors_next"  # the table a full copy builds, swapped in for face_vectors
INLINE_CHANGES = 100  # changes a search applies itself (~2.6 ms an add at 100k faces); more: a thread
REPLAY_CHUNK = 1_000  # changes applied per transaction: a deletion waits for one chunk at most (~2.6 s at 100k)
_ATTEMPTS = 3  # full copies tried in a row while bulk loads keep moving the log past replay
_COPY_CHUNK = 50_000
MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search


class _Left(Enum):
    """What a replay left to do."""

    NOTHING = "up to date"
    CHANGES = "more changes than it was to apply"
    EVERYTHING = "every face to copy"


class _LogMovedOn(Exception):
    """While every face was copied, the change log moved past what can be applied to the copy."""


class PgvectorUnavailable(RuntimeError):
    """The pgvector backend was asked for, but the database is not PostgreSQL or the server lacks the extension."""


def require_extension(connection: Connection) -> str:
    """The pgvector version the PostgreSQL server offers; raises PgvectorUnavailable when it has none."""
    available = connection.execute(
        text("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
    ).scalar()
    if available is None:
        raise PgvectorUnavailable(
            "the PostgreSQL server has no pgvector extension (FACEGATE_INDEX__BACKEND=pgvector): install "
            "it on the server, or choose FACEGATE_INDEX__BACKEND=exact or approximate"
        )
    return str(available)


def enable_extension(connection: Connection) -> None:
    """`CREATE EXTENSION IF NOT EXISTS vector` in the connection's transaction; raises PgvectorUnavailable when the
    server has no pgvector or this role may not enable it (superuser, once per database: pgvector is not a trusted
    extension). `serve` tries it before starting workers, in a transaction it rolls back."""
    require_extension(connection)
    # One database-wide lock (the set-up lock is per schema): galleries of two schemas enabling it at once made the
    # second's CREATE fail on pg_extension's unique name, read as a missing privilege.
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_EXTENSION_LOCK})
    try:
        with connection.begin_nested():
            connection.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
    except DBAPIError as error:
        raise PgvectorUnavailable(
            "pgvector is installed on the server but could not be enabled in this database (CREATE EXTENSION "
            f"vector needs a privileged role once): {type(error.orig).__name__}"
        ) from None


class PgvectorIndex(GalleryIndex):
    """`GalleryIndex` whose nearest-face search runs in PostgreSQL (pgvector HNSW)."""

    backend = "pgvector"

    def __init__(
        self,
        model_version: str,
        engine: Engine,
        *,
        candidates: int = 64,
        ef_search: int = MAX_EF_SEARCH,
        build_memory: str = "1GB",
        m: int = 16,
        ef_construction: int = 64,
    ) -> None:
        if engine.dialect.name != "postgresql":
            raise PgvectorUnavailable(
                f"FACEGATE_INDEX__BACKEND=pgvector needs PostgreSQL, the gallery is on {engine.dialect.name}"
            )
        if candidates < 1:
            raise ValueError("candidates must be >= 1")
        self.engine = engine
        self.candidates = candidates
        self.ef_search = ef_search
        self.build_memory = build_memory
        self.build_options = {"m": m, "ef_construction": ef_construction}  # pgvector's HNSW build parameters
        self._mirrored = -1  # change-log id the table was seen to mirror (it only moves forward)
        self._copy_lock = threading.Lock()
        self._copying: threading.Thread | None = None  # catching up for a search or a deletion
        super().__init__(model_version)
        # The schema pgvector's type and operators live in (quoted), set by `_prepare`.
        self.vector_schema = ""
        self.extension_version = self._prepare()
        self._iterative_scan = _version_tuple(self.extension_version) >= (0, 8)
        self.nearest_faces = nearest_faces(self.vector_schema)

    # ----------------------------------------------------------------------------------------- set-up

    def _prepare(self) -> str:
        """Create the extension, table, index and state row if missing; returns the extension's version."""
        with self.engine.begin() as connection:
            db.without_timeouts(connection)  # another worker may be building the index: wait for it; then build it
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key, hashtext(current_schema()))"), {"key": _PG_SETUP_LOCK}
            )
            enable_extension(connection)
            # The extension is created once per database, in the schema of the gallery that came first: another
            # gallery's schema (or a search_path without it) does not see its type, so it is always named with it.
            self.vector_schema, version = connection.execute(
                text(
                    "SELECT quote_ident(n.nspname), e.extversion FROM pg_extension e"
                    " JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'"
                )
            ).one()
            connection.execute(text(_table_ddl("face_vectors", self.vector_schema)))
            built_with = connection.execute(
                text(
                    "SELECT c.reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE c.relname = 'ix_face_vectors_embedding' AND n.nspname = current_schema()"
                )
            ).first()
            # Other build parameters asked for: the next mirror copies every face and builds anew (the index in
            # place serves searches meanwhile).
            rebuild = built_with is not None and _options(built_with[0]) != self.build_options
            if not rebuild:
                connection.execute(self._create_hnsw("face_vectors"))
            connection.execute(
                text("CREATE TABLE IF NOT EXISTS face_vectors_state (id integer PRIMARY KEY, last_change_id bigint NOT NULL)")
            )
            # -1: never mirrored, the first worker copies every face.
            connection.execute(text("INSERT INTO face_vectors_state VALUES (1, -1) ON CONFLICT (id) DO NOTHING"))
            if rebuild:
                connection.execute(text("UPDATE face_vectors_state SET last_change_id = -1 WHERE id = 1"))
        return str(version)

    def _create_hnsw(self, table: str) -> TextClause:
        o = self.build_options  # integers, validated by the settings
        return text(
            f"CREATE INDEX IF NOT EXISTS ix_{table}_embedding ON {table}"
            f" USING hnsw (embedding {self.vector_schema}.vector_l2_ops)"
            f" WITH (m = {int(o['m'])}, ef_construction = {int(o['ef_construction'])})"
        )

    # ---------------------------------------------------------------------------------------- mirror

    def load(self, session: Session) -> IndexStats:
        stats = super().load(session)
        self.mirror()
        return stats

    def _reload(self, session: Session) -> None:
        # A gap found by a search or a probe (another process's bulk load or relabelling, a pruned log): the memory is
        # reloaded, but face_vectors, which then needs every face copied, is left to the next search's
        # `mirror(wait=False)` (a thread): waiting for it here held this worker's every search for the whole copy.
        GalleryIndex.load(self, session)

    def mirror(self, *, wait: bool = True) -> int | None:
        """Bring `face_vectors` up to the change log's head; returns the changes applied (-1: copied in full).

        Changes are applied under the state row's lock, REPLAY_CHUNK per transaction, so that a deletion waits
        seconds at most for its turn. Copying every face (the first start, a gap in the log past MAX_REPLAY:
        another process's bulk load, or other HNSW build parameters) builds a new table beside the old one and
        takes the row only to swap them. Start-up and the background thread wait (`wait`: for the row, for
        another worker's copy, for their own work); a search does not: it gets None while another worker holds the
        row, or when more than INLINE_CHANGES are to be applied or every face copied, which then runs on a
        thread."""
        if not wait:
            try:
                applied, left = self._replay(wait=False, most=INLINE_CHANGES)
            except DBAPIError as error:
                if getattr(error.orig, "sqlstate", None) != db.PG_LOCK_NOT_AVAILABLE:
                    raise
                return None
            if left is _Left.NOTHING:
                return applied
            self._catch_up_in_background()
            return None
        total = 0
        for _ in range(_ATTEMPTS):
            left = _Left.CHANGES
            while left is _Left.CHANGES:
                applied, left = self._replay(wait=True, most=REPLAY_CHUNK, partly=True)
                total += applied
            if left is _Left.NOTHING:
                return total
            copied = self._copy_all()
            if copied is not None:
                return copied
        raise RuntimeError(
            f"face_vectors could not catch up with the change log in {_ATTEMPTS} full copies: faces are being "
            "bulk-loaded faster than they can be copied"
        )

    def _replay(self, *, wait: bool, most: int, partly: bool = False) -> tuple[int, _Left]:
        """Apply the changes after the table's position under the state row's lock (NOWAIT unless `wait`): all of
        them when they are at most `most`, else the first `most` if `partly`, else none. Returns the changes
        applied and what is left."""
        with Session(self.engine) as session, session.begin():
            quick = session.execute(text("SELECT last_change_id FROM face_vectors_state WHERE id = 1")).scalar_one()
            if int(quick) == store.last_change_id(session):
                self._mirrored = int(quick)
                return 0, _Left.NOTHING  # up to date: no lock taken, searches of several workers do not queue here
            connection = session.connection()
            if wait:
                db.without_timeouts(connection)
            lock = "SELECT last_change_id FROM face_vectors_state WHERE id = 1 FOR UPDATE" + ("" if wait else " NOWAIT")
            mirrored = int(session.execute(text(lock)).scalar_one())
            if not wait:
                db.without_timeouts(connection)  # the row is ours: `most` changes take what they take
            head = store.last_change_id(session)
            applied: list[Change] | None = None
            if not _replayable(mirrored, head):
                left = _Left.EVERYTHING
            elif head - mirrored > most and not partly:
                left = _Left.CHANGES
            else:
                upto = min(head, mirrored + most)
                applied = _changes_between(session, mirrored, upto)
                left = _Left.EVERYTHING if applied is None else _Left.NOTHING if upto == head else _Left.CHANGES
            if applied is None:
                return 0, left
            _apply_changes(connection, applied, "face_vectors")
            session.execute(text("UPDATE face_vectors_state SET last_change_id = :upto WHERE id = 1"), {"upto": upto})
        self._mirrored = upto
        return len(applied), left

    def _copy_all(self) -> int | None:
        """Copy every face into a new table with its HNSW index, then swap it in (-1). None: nothing done, replay
        again (another worker copied meanwhile, or the log moved past what can be replayed during the copy).

        One worker at a time (an advisory lock; the others wait for it at start-up). The faces are read after the
        head of the log, so the copy holds at least the faces up to it; the changes committed meanwhile are applied
        to the new table, the last of them under the state row's lock with the old table locked against writes (a
        deletion's own rows), and the swap commits with them: no change is lost between the two tables."""
        try:
            with Session(self.engine) as session, session.begin():
                connection = session.connection()
                db.without_timeouts(connection)  # minutes at 1M faces, after another worker's copy perhaps
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key, hashtext(current_schema()))"), {"key": _PG_COPY_LOCK}
                )
                mirrored = int(
                    session.execute(text("SELECT last_change_id FROM face_vectors_state WHERE id = 1")).scalar_one()
                )
                start = store.last_change_id(session)
                if _changes_between(session, mirrored, start) is not None:
                    return None  # another worker's copy ended while this one waited for the lock
                face_ids, identity_ids, versions, embeddings = bulk.read_faces(session)
                connection.execute(text(_table_ddl(_NEXT, self.vector_schema)))
                _copy_vectors(connection, face_ids, identity_ids, versions, embeddings, table=_NEXT)
                del face_ids, identity_ids, versions, embeddings
                connection.execute(text(f"ANALYZE {_NEXT}"))
                # Built once over all rows (faster than row by row), in memory: pgvector's build slows ~3x once its
                # graph outgrows maintenance_work_mem (server default 64 MB, ~60k faces).
                connection.execute(
                    text("SELECT set_config('maintenance_work_mem', :memory, true)"), {"memory": self.build_memory}
                )
                connection.execute(self._create_hnsw(_NEXT))
                # The changes made during the copy, applied before the state row is taken (deletions wait for it):
                # under it, only the last few. A few rounds at most, should changes come faster than they apply.
                for _ in range(_ATTEMPTS):
                    head = store.last_change_id(session)
                    if head - start <= INLINE_CHANGES:
                        break
                    changes = _changes_between(session, start, head)
                    if changes is None:
                        raise _LogMovedOn
                    _apply_changes(connection, changes, _NEXT)
                    start = head
                session.execute(text("SELECT 1 FROM face_vectors_state WHERE id = 1 FOR UPDATE"))
                connection.execute(text("LOCK TABLE face_vectors IN EXCLUSIVE MODE"))  # searches still read it
                head = store.last_change_id(session)
                changes = _changes_between(session, start, head)
                if changes is None:
                    raise _LogMovedOn
                _apply_changes(connection, changes, _NEXT)
                connection.execute(text("DROP TABLE face_vectors"))
                connection.execute(text(f"ALTER TABLE {_NEXT} RENAME TO face_vectors"))
                connection.execute(text(f"ALTER INDEX {_NEXT}_pkey RENAME TO face_vectors_pkey"))
                connection.execute(text(f"ALTER INDEX ix_{_NEXT}_embedding RENAME TO ix_face_vectors_embedding"))
                session.execute(text("UPDATE face_vectors_state SET last_change_id = :head WHERE id = 1"), {"head": head})
        except _LogMovedOn:
            logger.info("the change log moved on too far while face_vectors was copied: copying again")
            return None
        self._mirrored = head
        logger.info("face_vectors: every face copied (%d changes applied after the copy)", len(changes))
        return -1

    def _catch_up_in_background(self) -> None:
        """Bring `face_vectors` up to date on a thread (one at a time); searches answer from memory meanwhile."""
        with self._copy_lock:
            if self._copying is not None and self._copying.is_alive():
                return

            def run() -> None:
                try:
                    self.mirror()
                except Exception:
                    logger.exception("bringing face_vectors up to date failed (retried at the next search)")

            self._copying = threading.Thread(target=run, name="facegate-pgvector-mirror", daemon=True)
            self._copying.start()
        logger.info("face_vectors is far behind the change log: brought up to date in the background")

    def wait_until_mirrored(self, timeout: float | None = None) -> bool:
        """Wait for the background thread bringing the table up to date (True: none is running any more)."""
        with self._copy_lock:
            thread = self._copying
        return background_done(thread, timeout)

    # ---------------------------------------------------------------------------------------- search

    def search_settings(self, connection: Connection, k: int) -> None:
        """This transaction's planner settings for `nearest_faces` with `k` candidates.

        The HNSW index is forced (enable_seqscan off): with the model-version filter the planner may otherwise
        estimate few matching rows and scan the whole table, exact but ~100x slower at 100k faces (measured:
        148 ms against 9 ms). Iterative scans (pgvector >= 0.8) keep the filter from starving the result; without
        them a short answer falls back to the in-memory exact search."""
        settings = {"enable_seqscan": "off", "hnsw.ef_search": str(min(MAX_EF_SEARCH, max(self.ef_search, 2 * k)))}
        if self._iterative_scan:
            settings["hnsw.iterative_scan"] = "relaxed_order"
        # one round trip: a search is a handful of milliseconds, each statement ~0.3 ms more
        params: dict[str, str] = {}
        for i, (name, value) in enumerate(settings.items()):
            params[f"n{i}"], params[f"v{i}"] = name, value
        calls = ", ".join(f"set_config(:n{i}, :v{i}, true)" for i in range(len(settings)))
        connection.execute(text(f"SELECT {calls}"), params)

    def _search(self, snap: _Snapshot, q: npt.NDArray[np.float32], top_k: int) -> list[list[IdentityCandidate]]:
        k = max(self.candidates, 4 * top_k)
        if snap.alive <= k:
            return super()._search(snap, q, top_k)
        # The table may lack changes this process already knows of; while another worker brings it up to date,
        # the in-memory exact search answers (slower at 1M faces, but right and without queueing).
        if self._mirrored < self.last_change_id and self.mirror(wait=False) is None:
            return super()._search(snap, q, top_k)
        results: list[list[IdentityCandidate]] = []
        with self.engine.begin() as connection:
            self.search_settings(connection, k)
            for query in q:
                rows = connection.execute(
                    self.nearest_faces, {"model": self.model_version, "query": _vector_text(query), "k": k}
                ).all()
                # Identities with a searchable face (`code_of` keeps deleted ones: every search was exact then).
                ranked = _rank(rows, query, top_k, min(top_k, snap.identities))
                results.append(ranked if ranked is not None else super()._search(snap, query[None, :], top_k)[0])
        return results


def _options(reloptions: Sequence[str] | None) -> dict[str, int]:
    """An HNSW index's build parameters from pg_class.reloptions (["m=16", ...]; None: pgvector's defaults)."""
    options = {"m": 16, "ef_construction": 64}
    for item in reloptions or ():
        key, _, value = item.partition("=")
        options[key] = int(value)
    return options


def nearest_faces(schema: str) -> TextClause:
    """The `:k` faces of model `:model` nearest to `:query`, with pgvector's operator and type named by `schema`
    (quoted), where the extension lives: an unqualified `<->` is not found from another schema's search_path."""
    return text(
        "SELECT face_id, identity_id, embedding::real[] AS embedding FROM face_vectors WHERE model_version = :model"
        f" ORDER BY embedding OPERATOR({schema}.<->) CAST(:query AS {schema}.vector) LIMIT :k"
    )


def _replayable(mirrored: int, head: int) -> bool:
    """Whether the log's head can be reached by applying changes (not: never mirrored, a database reset or more
    than MAX_REPLAY changes behind)."""
    return mirrored == head or (0 <= mirrored < head and head - mirrored <= MAX_REPLAY)


def _changes_between(session: Session, mirrored: int, head: int) -> list[Change] | None:
    """The changes after `mirrored` up to `head`; None where they cannot be replayed (`_replayable`, or the log
    pruned past `mirrored` or skipped by a bulk load): every face must be copied."""
    if mirrored == head:
        return []
    if not _replayable(mirrored, head):
        return None
    changes = store.changes_after(session, after=mirrored, upto=head)
    return changes if [c.id for c in changes] == list(range(mirrored + 1, head + 1)) else None


def _apply_changes(connection: Connection, changes: list[Change], table: str) -> None:
    """In log order, run by run: a face removed and added again (`facegate reindex`) ends up present."""
    start = 0
    while start < len(changes):
        end = start
        while end < len(changes) and changes[end].op is changes[start].op:
            end += 1
        run = changes[start:end]
        if run[0].op is ChangeOp.ADD:
            _upsert_vectors(connection, [c for c in run if c.embedding is not None], table)
        else:
            connection.execute(text(f"DELETE FROM {table} WHERE face_id = ANY(:ids)"), {"ids": [c.face_id for c in run]})
        start = end


def _table_ddl(table: str, schema: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {table} ("
        " face_id varchar(32) PRIMARY KEY,"
        " identity_id varchar(32) NOT NULL,"
        " model_version varchar(128) NOT NULL,"
        f" embedding {schema}.vector({EMBEDDING_DIM}) NOT NULL)"
    )


def _upsert_vectors(connection: Connection, adds: list[Change], table: str) -> None:
    """Insert or replace these faces' rows of `table` (an add carries the face's current embedding)."""
    adds = list({c.face_id: c for c in adds}.values())  # one row per face (the last add wins) for ON CONFLICT
    if not adds:
        return
    connection.execute(text("CREATE TEMPORARY TABLE IF NOT EXISTS face_vectors_new (LIKE face_vectors) ON COMMIT DROP"))
    connection.execute(text("TRUNCATE face_vectors_new"))
    _copy_vectors(
        connection,
        [c.face_id for c in adds],
        [c.identity_id for c in adds],
        [str(c.model_version) for c in adds],
        np.stack([np.asarray(c.embedding, dtype=np.float32) for c in adds]),
        table="face_vectors_new",
    )
    connection.execute(
        text(
            f"INSERT INTO {table} SELECT * FROM face_vectors_new ON CONFLICT (face_id) DO UPDATE SET"
            " identity_id = EXCLUDED.identity_id, model_version = EXCLUDED.model_version, embedding = EXCLUDED.embedding"
        )
    )


def _rank(rows: Sequence[Any], query: npt.NDArray[np.float32], top_k: int, needed: int) -> list[IdentityCandidate] | None:
    if not rows:
        return None
    vectors = np.asarray([row.embedding for row in rows], dtype=np.float32)
    distances = ((vectors - query) ** 2).sum(axis=1, dtype=np.float32)
    code_of: dict[str, int] = {}
    codes = np.fromiter((code_of.setdefault(row.identity_id, len(code_of)) for row in rows), np.int64, len(rows))
    if len(code_of) < needed:
        return None
    identity_ids = list(code_of)
    return rank_faces(distances, codes, identity_ids.__getitem__, lambda j: str(rows[j].face_id), top_k)


def _vector_text(vector: npt.NDArray[np.float32]) -> str:
    return "[" + ",".join(f"{float(v):.9g}" for v in vector) + "]"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def _copy_vectors(
    connection: Connection,
    face_ids: list[str],
    identity_ids: list[str],
    versions: list[str],
    embeddings: npt.NDArray[np.float32],
    *,
    table: str = "face_vectors",
) -> None:
    """Binary COPY: rows built as one numpy record array per chunk and model version (fixed-width fields)."""
    raw = connection.connection.driver_connection
    by_version: dict[str, list[int]] = {}
    for i, version in enumerate(versions):
        by_version.setdefault(version, []).append(i)
    with raw.cursor() as cursor:  # type: ignore[union-attr]
        for version, indices in by_version.items():
            model = version.encode()
            record = np.dtype(
                [
                    ("fields", ">i2"),
                    ("face_len", ">i4"),
                    ("face", "S32"),
                    ("identity_len", ">i4"),
                    ("identity", "S32"),
                    ("model_len", ">i4"),
                    ("model", f"S{len(model)}"),
                    ("vector_len", ">i4"),
                    ("dim", ">i2"),
                    ("unused", ">i2"),
                    ("vector", ">f4", (EMBEDDING_DIM,)),
                ]
            )
            for first in range(0, len(indices), _COPY_CHUNK):
                part = indices[first : first + _COPY_CHUNK]
                rows = np.zeros(len(part), dtype=record)
                rows["fields"] = 4
                rows["face_len"] = 32
                rows["face"] = [face_ids[i].encode() for i in part]
                rows["identity_len"] = 32
                rows["identity"] = [identity_ids[i].encode() for i in part]
                rows["model_len"] = len(model)
                rows["model"] = model
                rows["vector_len"] = 4 + 4 * EMBEDDING_DIM
                rows["dim"] = EMBEDDING_DIM
                rows["vector"] = embeddings[part]
                with cursor.copy(
                    f"COPY {table} (face_id, identity_id, model_version, embedding) FROM STDIN WITH (FORMAT BINARY)"
                ) as copy:
                    copy.write(_BINARY_HEADER + rows.tobytes() + _BINARY_TRAILER)
