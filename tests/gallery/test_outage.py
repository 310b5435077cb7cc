"""A database that goes away and comes back (a restart, a failover, a network cut), for real: the gallery reaches
PostgreSQL through a TCP proxy (tests/tcp_proxy.py) that the test cuts and restores, never the server itself. And
SQLite locked by another writer, or out of space."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from app.errors import DatabaseUnavailable, InsufficientStorage
from app.gallery import Gallery, bulk, db, synthetic
from app.vision.types import Box
from tests.gallery.conftest import MODEL, random_embeddings
from tests.tcp_proxy import TcpProxy, proxied

BOX = Box(0, 0, 99, 99)


@pytest.fixture
def cut_off(pg_schema_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy to the test's PostgreSQL schema and the URL through it. Connections are retried at once after a
    failure (`db.CONNECT_RETRY_SECONDS` 0), so that a restored proxy serves the next call."""
    monkeypatch.setattr(db, "CONNECT_RETRY_SECONDS", 0.0)
    with proxied(pg_schema_url) as pair:
        yield pair


@pytest.fixture
def galleries() -> Iterator[list[Gallery]]:
    opened: list[Gallery] = []
    yield opened
    for gallery in opened:
        gallery.close()


def _open(galleries: list[Gallery], url: str, **options: Any) -> Gallery:
    gallery = Gallery.open(url, MODEL, **options)
    galleries.append(gallery)
    return gallery


def _identity_names(gallery: Gallery) -> set[str]:
    with gallery.engine.connect() as connection:
        return set(connection.execute(text("SELECT name FROM identities")).scalars())


@pytest.mark.postgres
def test_a_lost_server_is_database_unavailable_and_the_next_call_after_it_is_back_works(
    cut_off: tuple[TcpProxy, str], galleries: list[Gallery]
) -> None:
    proxy, url = cut_off
    gallery = _open(galleries, url)
    vectors = random_embeddings(np.random.default_rng(0), 2)
    ada = gallery.enroll_face(embedding=vectors[0], box=BOX, score=1.0, name="Ada")
    proxy.cut()
    calls = {
        "read": lambda: gallery.get_identity(ada.identity_id),
        "replay": gallery.refresh,
        "search": lambda: gallery.search(vectors[:1], top_k=1),
        "write": lambda: gallery.enroll_face(embedding=vectors[1], box=BOX, score=1.0, name="Bob"),
        "ping": gallery.ping,
    }
    for what, call in calls.items():
        with pytest.raises(DatabaseUnavailable) as raised:
            call()
        assert raised.value.message == "the database cannot be reached; retry in a few seconds", what
        assert raised.value.details == {"retry_after_seconds": db.RETRY_AFTER_SECONDS}
    assert gallery.index.face_ids() == {ada.face.id}  # the failed enrolment left nothing
    proxy.restore()
    assert gallery.get_identity(ada.identity_id).name == "Ada"
    gallery.enroll_face(embedding=vectors[1], box=BOX, score=1.0, name="Bob")
    assert gallery.stats().size == 2


@pytest.mark.postgres
def test_the_pool_reconnects_after_the_server_dropped_every_connection(
    cut_off: tuple[TcpProxy, str], galleries: list[Gallery]
) -> None:
    """No call while the server was away: the pool still holds the dead connections, and its pre-ping replaces
    them, so the first call afterwards works."""
    proxy, url = cut_off
    gallery = _open(galleries, url)
    ada = gallery.enroll_face(
        embedding=random_embeddings(np.random.default_rng(1), 1)[0], box=BOX, score=1.0, name="Ada"
    )
    assert gallery.engine.pool.checkedin() >= 1  # type: ignore[attr-defined]
    proxy.cut()
    proxy.restore()
    assert gallery.get_identity(ada.identity_id).name == "Ada"


@pytest.mark.postgres
def test_an_enrolment_whose_commit_is_lost_stores_nothing(
    cut_off: tuple[TcpProxy, str], pg_schema_url: str, galleries: list[Gallery]
) -> None:
    proxy, url = cut_off
    gallery = _open(galleries, url)
    vectors = random_embeddings(np.random.default_rng(2), 2)
    ada = gallery.enroll_face(embedding=vectors[0], box=BOX, score=1.0, name="Ada")
    gallery.refresh()  # its own writes are replayed too (skipped): the position moves past them
    head = gallery.stats().last_change_id

    cuts: list[None] = []

    @event.listens_for(gallery.engine, "commit")
    def _cut_before_the_commit(_connection: Any) -> None:  # the COMMIT never reaches the server
        if not cuts:
            cuts.append(None)
            proxy.cut()

    with pytest.raises(DatabaseUnavailable):
        gallery.enroll_face(embedding=vectors[1], box=BOX, score=1.0, name="half-written")
    assert gallery.index.face_ids() == {ada.face.id} and gallery.stats().last_change_id == head
    proxy.restore()
    other = _open(galleries, pg_schema_url)  # another worker, straight to the server
    assert _identity_names(other) == {"Ada"}
    assert gallery.refresh().applied == 0 and gallery.stats().last_change_id == head  # the log has no trace of it
    assert gallery.index.face_ids() == {ada.face.id}


@pytest.mark.postgres
def test_a_worker_cut_off_catches_up_with_what_others_wrote_meanwhile(
    cut_off: tuple[TcpProxy, str], pg_schema_url: str, galleries: list[Gallery]
) -> None:
    proxy, url = cut_off
    cut, other = _open(galleries, url), _open(galleries, pg_schema_url)
    vectors = random_embeddings(np.random.default_rng(3), 3)
    ada = other.enroll_face(embedding=vectors[0], box=BOX, score=1.0, name="Ada")
    bob = other.enroll_face(embedding=vectors[1], box=BOX, score=1.0, name="Bob")
    assert cut.search(vectors[:1], top_k=1)[0][0].face_id == ada.face.id
    proxy.cut()
    cyd = other.enroll_face(embedding=vectors[2], box=BOX, score=1.0, name="Cyd")
    other.delete_identity(ada.identity_id)
    with pytest.raises(DatabaseUnavailable):
        cut.search(vectors[2:], top_k=1)
    proxy.restore()
    assert cut.search(vectors[2:], top_k=1)[0][0].face_id == cyd.face.id
    assert cut.index.face_ids() == other.index.face_ids() == {bob.face.id, cyd.face.id}


@pytest.mark.postgres
def test_a_read_only_standby_refuses_writes_as_unavailable(pg_schema_url: str, galleries: list[Gallery]) -> None:
    """After a failover, a client may reach a standby still read-only: its writes are refused for now, not a bug."""
    primary = _open(galleries, pg_schema_url)
    ada = primary.create_identity(name="Ada")
    url = make_url(pg_schema_url)
    options = f"{url.query['options']} -cdefault_transaction_read_only=on"
    standby = _open(galleries, url.update_query_dict({"options": options}).render_as_string(False), migrate=False)
    assert standby.get_identity(ada.id).name == "Ada"
    with pytest.raises(DatabaseUnavailable, match="read-only"):
        standby.create_identity(name="Bob")
    assert _identity_names(primary) == {"Ada"}


@pytest.mark.postgres
def test_a_silent_server_fails_within_the_connect_timeout_then_at_once(
    pg_schema_url: str, galleries: list[Gallery]
) -> None:
    """A server that accepts connections and never answers (hung, or a failover address nobody holds yet) held a
    call for psycopg's default 130 s. Now the connect timeout (3 s) ends it, and for CONNECT_RETRY_SECONDS after
    that the next calls fail at once instead of each waiting as long."""
    with proxied(pg_schema_url) as (proxy, url):
        gallery = _open(galleries, url)
        proxy.silence()  # the pool's connections are dropped: the next call has to connect
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            gallery.ping()
        assert time.monotonic() - started < 10
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            gallery.refresh()
        assert time.monotonic() - started < 1
        proxy.restore()
        time.sleep(db.CONNECT_RETRY_SECONDS + 0.1)
        gallery.ping()


@pytest.mark.postgres
def test_postgres_connections_have_timeouts_unless_the_url_sets_them(pg_schema_url: str) -> None:
    url = make_url(pg_schema_url)
    for query, expected in (({}, b"3"), ({"connect_timeout": "7"}, b"7")):
        engine = db.make_engine(url.update_query_dict(query).render_as_string(hide_password=False))
        try:
            with engine.connect() as connection:
                pgconn = connection.connection.dbapi_connection.pgconn  # type: ignore[union-attr]
                options = {option.keyword: option.val for option in pgconn.info}
        finally:
            engine.dispose()
        assert options[b"connect_timeout"] == expected
        assert (options[b"keepalives_idle"], options[b"tcp_user_timeout"]) == (b"30", b"30000")


@pytest.mark.postgres
def test_a_server_that_stalls_whole_is_database_unavailable_soon_after_its_statement_timeout(
    cut_off: tuple[TcpProxy, str], galleries: list[Gallery], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that stops answering altogether (host paused, storage hung, a pooler whose backend died) does not
    enforce its own statement timeout, and the TCP connection stays up: a statement, or the pool's pre-ping of an
    idle connection, waited for ever. Now the connection is closed STALL_GRACE_SECONDS after the statement timeout,
    and the call is database_unavailable; once the server answers again, so does the gallery."""
    monkeypatch.setattr(db, "STALL_GRACE_SECONDS", 0.5)
    proxy, url = cut_off
    gallery = _open(galleries, url, statement_timeout=0.5)
    vectors = random_embeddings(np.random.default_rng(6), 2)
    ada = gallery.enroll_face(embedding=vectors[0], box=BOX, score=1.0, name="Ada")
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as raised, gallery.session() as session:
        session.execute(text("SELECT 1"))
        proxy.freeze()  # mid-transaction: the next statement is never answered
        session.execute(text("SELECT count(*) FROM faces"))
    assert time.monotonic() - started < 5
    assert raised.value.message.startswith("the database did not answer within 1 s, not even with its own statement")
    assert raised.value.details == {"retry_after_seconds": db.RETRY_AFTER_SECONDS}
    for what, call in {
        "read": lambda: gallery.get_identity(ada.identity_id),  # a pooled connection's pre-ping, then a new one
        "write": lambda: gallery.enroll_face(embedding=vectors[1], box=BOX, score=1.0, name="Bob"),
    }.items():
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            call()
        assert time.monotonic() - started < 8, what  # the pre-ping's 1 s, then libpq's 3 s connect timeout
    proxy.restore()
    assert gallery.get_identity(ada.identity_id).name == "Ada" and _identity_names(gallery) == {"Ada"}


@pytest.mark.postgres
def test_a_server_that_stalls_right_after_accepting_a_connection_is_database_unavailable(
    cut_off: tuple[TcpProxy, str], galleries: list[Gallery], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new connection's first statements (reading and setting its timeouts, before the pool hands it out) run
    outside SQLAlchemy's statement events: a server that stalled just after the handshake held the request for ever.
    They are watched as a statement is."""
    monkeypatch.setattr(db, "STALL_GRACE_SECONDS", 0.5)
    proxy, url = cut_off
    gallery = _open(galleries, url, statement_timeout=0.5)
    ada = gallery.enroll_face(embedding=random_embeddings(np.random.default_rng(7), 1)[0], box=BOX, score=1.0, name="Ada")
    gallery.engine.dispose()  # the next call connects anew

    stalls = [True]

    def stall_once(_dbapi_connection: Any, _record: Any) -> None:
        if stalls and stalls.pop():
            proxy.freeze()  # connected: the handshake is done, the timeouts are not read yet

    event.listen(gallery.engine, "connect", stall_once, insert=True)  # before the engine's own
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        call = pool.submit(gallery.get_identity, ada.identity_id)
        try:
            with pytest.raises(DatabaseUnavailable) as raised:
                call.result(timeout=10)
            assert time.monotonic() - started < 5
            assert raised.value.message.startswith("the database did not answer within 1 s"), raised.value.message
        finally:
            proxy.restore()
    assert gallery.get_identity(ada.identity_id).name == "Ada"


@pytest.mark.postgres
def test_a_process_forked_after_the_stall_watch_started_is_watched_too(
    cut_off: tuple[TcpProxy, str], galleries: list[Gallery], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch's thread starts at the first watched statement; a child forked after it (gunicorn --preload's
    workers, a multiprocessing pool) has no such thread, and its statements to a stalled server waited for ever."""
    monkeypatch.setattr(db, "STALL_GRACE_SECONDS", 0.5)
    proxy, url = cut_off
    parent = _open(galleries, url, statement_timeout=0.5)
    assert _identity_names(parent) == set()  # a watched statement: the watch thread runs in this process
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own engine, a statement once the server has stalled, then its verdict
        code = 3
        try:
            signal.alarm(20)  # hanging is failing: the parent sees the signal
            engine = db.make_engine(url, statement_timeout=0.5)  # as a gallery's (no migration: less to go wrong)
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
                os.write(ready_w, b"r")
                os.read(go_r, 1)
                try:
                    connection.execute(text("SELECT count(*) FROM faces"))
                    code = 2
                except sa_exc.OperationalError:
                    code = 0  # the watch shut the connection down
        finally:
            os._exit(code)
    try:
        assert os.read(ready_r, 1) == b"r"
        proxy.freeze()
        os.write(go_w, b"g")
        _, status = os.waitpid(pid, 0)
    finally:
        proxy.restore()
        for descriptor in (ready_r, ready_w, go_r, go_w):
            os.close(descriptor)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's stalled statement was not cut"


@pytest.mark.postgres
def test_a_stalled_statement_is_told_from_long_work_and_from_the_servers_own_timeout(
    pg_schema_url: str, galleries: list[Gallery], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch never cuts a working server's statement: one of a transaction without a statement timeout (an
    index load, a copy) runs as long as it takes, and one the server cancels at its timeout is told as such."""
    monkeypatch.setattr(db, "STALL_GRACE_SECONDS", 0.2)
    gallery = _open(galleries, pg_schema_url, statement_timeout=0.3)
    with gallery.session() as session:
        db.without_statement_timeout(session.connection())
        assert session.execute(text("SELECT 7 FROM pg_sleep(1.2)")).scalar_one() == 7  # 1.2 s > 0.3 + 0.2: not cut
    with pytest.raises(DatabaseUnavailable) as raised, gallery.session() as session:  # the same pooled connection
        session.execute(text("SELECT pg_sleep(3)"))
    assert raised.value.message.startswith("the database did not answer within 0.3 s (a lock held"), raised.value.message


def test_sqlite_locked_past_the_busy_timeout_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, galleries: list[Gallery]
) -> None:
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)  # read when a connection opens
    path = tmp_path / "g.db"
    gallery = _open(galleries, f"sqlite:///{path}")
    ada = gallery.create_identity(name="Ada")
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(DatabaseUnavailable, match="locked by another writer for 0.2 s") as raised:
            gallery.update_identity(ada.id, name="Bob")
        assert raised.value.details == {"retry_after_seconds": db.RETRY_AFTER_SECONDS}
        writer.execute("ROLLBACK")
    finally:
        writer.close()
    assert gallery.update_identity(ada.id, name="Bob").name == "Bob"


def test_sqlite_waits_for_another_writer_up_to_the_lock_timeout(tmp_path: Path, galleries: list[Gallery]) -> None:
    """The lock timeout is SQLite's busy timeout too (it was a fixed 30 s whatever the setting): a request waits
    that long for another process's write (a second worker's, `facegate reindex`), then 503 with nothing stored;
    0 waits as long as it takes (SQLite's own busy timeout of 0 would not wait at all)."""
    path = tmp_path / "g.db"
    bounded = _open(galleries, f"sqlite:///{path}", lock_timeout=0.3)
    patient = _open(galleries, f"sqlite:///{path}", lock_timeout=0)
    ada = bounded.create_identity(name="Ada")
    writer = sqlite3.connect(path, isolation_level=None)
    renamed: list[str] = []
    try:
        writer.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as raised:
            bounded.update_identity(ada.id, name="Bob")
        assert 0.25 < time.monotonic() - started < 5
        assert raised.value.message.startswith("the SQLite database stayed locked by another writer for 0.3 s")
        assert raised.value.details == {"retry_after_seconds": db.RETRY_AFTER_SECONDS}
        waiting = threading.Thread(target=lambda: renamed.append(patient.update_identity(ada.id, name="Cy").name))
        waiting.start()
        waiting.join(timeout=1.5)
        assert waiting.is_alive() and not renamed  # still waiting, where SQLite's 0 would have failed at once
        writer.execute("ROLLBACK")
        waiting.join(timeout=30)
    finally:
        writer.close()
    assert renamed == ["Cy"] and bounded.get_identity(ada.id).name == "Cy"


def test_sqlite_migrations_wait_for_another_writer_whatever_the_lock_timeout(
    tmp_path: Path, galleries: list[Gallery]
) -> None:
    """A worker migrating holds SQLite's write lock; another worker starting waits for it past its lock timeout
    rather than fail its start-up, and its requests keep the lock timeout afterwards."""
    path = tmp_path / "g.db"
    writer = sqlite3.connect(path, isolation_level=None)
    opened: list[Gallery] = []
    try:
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute("BEGIN IMMEDIATE")  # the first worker, migrating
        worker = threading.Thread(target=lambda: opened.append(_open(galleries, f"sqlite:///{path}", lock_timeout=0.2)))
        worker.start()
        worker.join(timeout=1.5)
        assert worker.is_alive() and not opened  # still waiting, well past its lock timeout
        writer.execute("COMMIT")
        worker.join(timeout=60)
        assert len(opened) == 1
        ada = opened[0].create_identity(name="Ada")
        writer.execute("BEGIN IMMEDIATE")
        with pytest.raises(DatabaseUnavailable, match="locked by another writer for 0.2 s"):
            opened[0].update_identity(ada.id, name="Bob")
        writer.execute("ROLLBACK")
    finally:
        writer.close()


def test_sqlite_out_of_space_is_insufficient_storage(tmp_path: Path, galleries: list[Gallery]) -> None:
    gallery = _open(galleries, f"sqlite:///{tmp_path / 'g.db'}")
    ada = gallery.create_identity(name="Ada")

    @event.listens_for(gallery.engine, "connect")
    def _full(dbapi_connection: Any, _record: Any) -> None:  # the file may not grow: SQLite's "disk is full"
        pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
        dbapi_connection.execute(f"PRAGMA max_page_count={pages}")

    gallery.engine.dispose()
    with pytest.raises(InsufficientStorage, match="disk of the SQLite database is full"):
        gallery.update_identity(ada.id, metadata={"notes": "x" * 60_000})
    assert gallery.get_identity(ada.id).metadata == {}


def _schema_of(url: str) -> str:
    return str(make_url(url).query["options"]).removeprefix("-csearch_path=")


@pytest.fixture
def other_session(postgres_server: str, pg_schema_url: str) -> Iterator[Any]:
    """A second PostgreSQL session on the test's schema (an operator's psql, another process), autocommit off."""
    import psycopg

    with psycopg.connect(postgres_server, options=f"-csearch_path={_schema_of(pg_schema_url)}") as connection:
        yield connection
        connection.rollback()


@pytest.mark.postgres
def test_a_lock_held_by_another_session_is_database_unavailable_after_the_lock_timeout(
    pg_schema_url: str, other_session: Any, galleries: list[Gallery]
) -> None:
    """PostgreSQL waited for another session's lock as long as it was held (an operator's LOCK TABLE, a transaction
    left open, `facegate reindex` holding the write lock): the caller's thread with it. Now a statement gives up
    after the lock timeout, and its transaction stores nothing."""
    gallery = _open(galleries, pg_schema_url, lock_timeout=0.3)
    vectors = random_embeddings(np.random.default_rng(3), 2)
    ada = gallery.enroll_face(embedding=vectors[0], box=BOX, score=1.0, name="Ada")
    other_session.execute("UPDATE gallery_state SET last_change_id = last_change_id")  # the gallery's write lock
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as raised:
        gallery.enroll_face(embedding=vectors[1], box=BOX, score=1.0, name="Bob")
    assert time.monotonic() - started < 5
    assert raised.value.message.startswith(
        "the database did not answer within 0.3 s: another session held a lock this request needed"
    ), raised.value.message
    assert raised.value.details == {"retry_after_seconds": db.RETRY_AFTER_SECONDS}
    other_session.execute("LOCK TABLE identities IN ACCESS EXCLUSIVE MODE")  # reads wait too (an ALTER TABLE)
    with pytest.raises(DatabaseUnavailable):
        gallery.get_identity(ada.identity_id)
    other_session.rollback()
    assert _identity_names(gallery) == {"Ada"} and gallery.index.face_ids() == {ada.face.id}  # nothing half-written
    gallery.enroll_face(embedding=vectors[1], box=BOX, score=1.0, name="Bob")
    assert _identity_names(gallery) == {"Ada", "Bob"}


@pytest.mark.postgres
def test_writes_waiting_for_the_write_lock_leave_connections_to_reads(
    pg_schema_url: str, other_session: Any, galleries: list[Gallery]
) -> None:
    """While another session held the gallery's write lock (`facegate reindex`, an operator's transaction), every
    write request held a pooled connection as it waited for it: as many writes as the pool has connections left
    none to reads, so a read (a search's replay, a key check, /readyz) waited until a writer gave up, the lock
    timeout. Now the writes of one process wait for the lock on one connection, the others without one."""
    pool = 3
    gallery = _open(galleries, pg_schema_url, lock_timeout=3.0, pool_size=pool, max_overflow=0)
    ada = gallery.enroll_face(embedding=random_embeddings(np.random.default_rng(5), 1)[0], box=BOX, score=1.0, name="Ada")
    other_session.execute("UPDATE gallery_state SET last_change_id = last_change_id")  # the gallery's write lock
    with ThreadPoolExecutor(pool + 2) as writers:
        renames = [writers.submit(gallery.update_identity, ada.identity_id, name=f"Ada {i}") for i in range(pool + 2)]
        time.sleep(0.5)  # every writer waits: for the lock, or for its turn
        started = time.monotonic()
        assert gallery.get_identity(ada.identity_id).name == "Ada"
        assert time.monotonic() - started < 1.0  # not the lock timeout, 3 s
        for rename in renames:
            with pytest.raises(DatabaseUnavailable) as raised:
                rename.result(timeout=30)
            assert "lock" in raised.value.message, raised.value.message
    other_session.rollback()
    assert gallery.update_identity(ada.identity_id, name="Ada L.").name == "Ada L."


@pytest.mark.postgres
def test_a_deadlock_with_an_operators_transaction_is_database_unavailable_and_stores_nothing(
    pg_schema_url: str, other_session: Any, galleries: list[Gallery]
) -> None:
    """An operator's transaction locks the faces table, then waits for the gallery's write lock, which an enrolment
    holds while it waits for the faces table: PostgreSQL ends one of the two (40P01). The request's was a 500; it is
    database_unavailable, worth retrying, and its transaction stored nothing."""
    gallery = _open(galleries, pg_schema_url)
    vectors = random_embeddings(np.random.default_rng(4), 2)
    ada = gallery.enroll_face(embedding=vectors[0], box=BOX, score=1.0, name="Ada")
    # The request's server process checks for the deadlock first (1 s), so it is the one rolled back.
    other_session.execute("SET deadlock_timeout = '20s'")
    other_session.execute("LOCK TABLE faces IN EXCLUSIVE MODE")  # reads go on; the enrolment's INSERT waits
    failures: list[BaseException] = []

    def enrol() -> None:
        try:
            gallery.enroll_face(embedding=vectors[1], box=BOX, score=1.0, name="Bob")
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            failures.append(error)

    request = threading.Thread(target=enrol)
    request.start()
    deadline = time.monotonic() + 10
    while not _waiting_for_a_lock(other_session, "faces") and time.monotonic() < deadline:
        time.sleep(0.05)
    other_session.execute("UPDATE gallery_state SET last_change_id = last_change_id")  # waits for the request
    request.join(timeout=30)
    assert not request.is_alive() and len(failures) == 1
    failure = failures[0]
    assert isinstance(failure, DatabaseUnavailable), repr(failure)
    assert failure.message.startswith("a deadlock with another session's transaction"), failure.message
    assert failure.details == {"retry_after_seconds": db.RETRY_AFTER_SECONDS}
    other_session.rollback()
    assert _identity_names(gallery) == {"Ada"} and gallery.index.face_ids() == {ada.face.id}  # nothing half-written
    gallery.enroll_face(embedding=vectors[1], box=BOX, score=1.0, name="Bob")  # the retry passes
    assert _identity_names(gallery) == {"Ada", "Bob"}


def _waiting_for_a_lock(session: Any, table: str) -> bool:
    """Whether a session of this database waits for a lock on `table` (of the session's schema)."""
    row = session.execute(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass", (table,)
    ).fetchone()
    return bool(row[0])


@pytest.mark.postgres
def test_migrations_wait_for_another_workers_lock_whatever_the_lock_timeout(
    pg_schema_url: str, other_session: Any, galleries: list[Gallery]
) -> None:
    """A worker migrating holds the migration lock; the others wait their turn rather than fail their start-up."""
    _open(galleries, pg_schema_url)
    other_session.execute(
        "SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))", (db._PG_MIGRATION_LOCK,)
    )
    opened: list[Gallery] = []
    worker = threading.Thread(target=lambda: opened.append(_open(galleries, pg_schema_url, lock_timeout=0.2)))
    worker.start()
    worker.join(timeout=1.5)
    assert worker.is_alive() and not opened  # still waiting, well past its lock timeout
    other_session.rollback()
    worker.join(timeout=30)
    assert len(opened) == 1


@pytest.mark.postgres
def test_a_statement_the_server_cancels_is_database_unavailable(pg_schema_url: str, galleries: list[Gallery]) -> None:
    url = make_url(pg_schema_url)
    options = f"{url.query['options']} -cstatement_timeout=50"  # the operator's own limit, in the URL
    gallery = _open(galleries, url.update_query_dict({"options": options}).render_as_string(hide_password=False))
    with pytest.raises(DatabaseUnavailable) as raised, gallery.session() as session:
        session.execute(text("SELECT pg_sleep(1)"))
    assert raised.value.message.startswith("the database cancelled the statement")


@pytest.mark.postgres
def test_a_statement_past_the_statement_timeout_is_database_unavailable_and_stores_nothing(
    pg_schema_url: str, other_session: Any, galleries: list[Gallery]
) -> None:
    """With no lock timeout, a statement waiting for another session's lock (or one that does not finish) ran for
    ever, holding the caller's thread: the statement timeout cuts it, for reads and writes, and the write's
    transaction is rolled back whole (the new identity is not stored without its face, nor the face indexed)."""
    gallery = _open(galleries, pg_schema_url, lock_timeout=0, statement_timeout=0.5)
    vectors = random_embeddings(np.random.default_rng(5), 2)
    ada = gallery.enroll_face(embedding=vectors[0], box=BOX, score=1.0, name="Ada")
    other_session.execute("LOCK TABLE faces IN ACCESS EXCLUSIVE MODE")  # an ALTER TABLE, a VACUUM FULL
    calls = {
        "write": lambda: gallery.enroll_face(embedding=vectors[1], box=BOX, score=1.0, name="Bob"),
        "read": lambda: gallery.get_identity(ada.identity_id),
    }
    for what, call in calls.items():
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as raised:
            call()
        assert time.monotonic() - started < 8, what
        assert raised.value.message.startswith("the database did not answer within 0.5 s"), raised.value.message
        assert raised.value.details == {"retry_after_seconds": db.RETRY_AFTER_SECONDS}
    other_session.rollback()
    assert _identity_names(gallery) == {"Ada"} and gallery.index.face_ids() == {ada.face.id}
    gallery.refresh()  # the log holds Ada's change alone: the refused enrolment logged nothing either
    assert gallery.index.face_ids() == {ada.face.id} and gallery.stats().last_change_id == 1
    gallery.enroll_face(embedding=vectors[1], box=BOX, score=1.0, name="Bob")
    assert _identity_names(gallery) == {"Ada", "Bob"}


def _given_up(engine: Engine, statement: str) -> sa_exc.DBAPIError:
    """The error of `statement`, which the server cancels."""
    with pytest.raises(sa_exc.DBAPIError) as raised, engine.connect() as connection:
        connection.execute(text(statement))
    return raised.value


@pytest.mark.postgres
def test_outage_error_tells_the_servers_timeouts_with_their_length(
    pg_schema_url: str, other_session: Any, galleries: list[Gallery]
) -> None:
    """The server's own errors (55P03 lock_not_available, 57014 query_canceled) are database_unavailable, and the
    message says how long the request waited. A timeout the URL sets is the operator's: it wins over facegate's."""
    _open(galleries, pg_schema_url)  # migrated
    engine = db.make_engine(pg_schema_url, lock_timeout=0.1, statement_timeout=0.4)
    url = make_url(pg_schema_url)
    operators = url.update_query_dict({"options": f"{url.query['options']} -c statement_timeout=50"})
    operators_engine = db.make_engine(operators.render_as_string(hide_password=False), statement_timeout=10)
    try:
        slow = _given_up(engine, "SELECT pg_sleep(5)")
        assert getattr(slow.orig, "sqlstate", None) == "57014"
        typed = db.outage_error(slow)
        assert isinstance(typed, DatabaseUnavailable) and typed.details == {"retry_after_seconds": db.RETRY_AFTER_SECONDS}
        assert typed.message.startswith("the database did not answer within 0.4 s (a lock held by another session")
        other_session.execute("LOCK TABLE identities IN ACCESS EXCLUSIVE MODE")
        locked = _given_up(engine, "SELECT count(*) FROM identities")
        assert getattr(locked.orig, "sqlstate", None) == "55P03"
        typed = db.outage_error(locked)
        assert isinstance(typed, DatabaseUnavailable)
        assert typed.message.startswith("the database did not answer within 0.1 s: another session held a lock")
        other_session.rollback()
        started = time.monotonic()
        typed = db.outage_error(_given_up(operators_engine, "SELECT pg_sleep(5)"))
        assert time.monotonic() - started < 3  # the URL's 50 ms, not the engine's 10 s
        assert isinstance(typed, DatabaseUnavailable)
        assert typed.message.startswith("the database did not answer within 0.05 s"), typed.message
    finally:
        engine.dispose()
        operators_engine.dispose()


@pytest.mark.postgres
def test_migrations_and_the_index_load_are_not_cut_by_the_statement_timeout(
    pg_schema_url: str, galleries: list[Gallery]
) -> None:
    """A worker's start-up migrates and reads every face into its index: minutes at 1M faces, which a timeout sized
    for requests' statements (here 1 ms) would cut, leaving the worker unable to start. Both run with none."""
    engine = db.make_engine(pg_schema_url, lock_timeout=0.001, statement_timeout=0.001)
    seen: list[tuple[str, str]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _timeout_in_force(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if not statement.startswith("SET LOCAL"):
            seen.append((statement, cursor.connection.execute("SHOW statement_timeout").fetchone()[0]))

    try:
        db.upgrade(engine)
        migrations = [(statement, value) for statement, value in seen if statement.startswith(("CREATE", "ALTER"))]
        assert migrations and all(value == "0" for _, value in migrations), migrations
        seeded = Gallery.open(pg_schema_url, MODEL)  # no limits: faces written in bulk
        galleries.append(seeded)
        data = synthetic.gallery(20_000, seed=1)
        with db.make_session_factory(seeded.engine).begin() as session:
            bulk.copy_synthetic_gallery(session, embeddings=data.embeddings, owners=data.owners, model_version=MODEL)
        gallery = Gallery(engine, MODEL)
        seen.clear()
        assert gallery.load().size == 20_000  # reading 20,000 faces takes far more than 1 ms
        assert seen and all(value == "0" for _, value in seen), seen
    finally:
        engine.dispose()
