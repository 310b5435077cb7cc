"""Engine, sessions and migrations of the gallery database (SQLite file or PostgreSQL through psycopg 3).

Migrations run under a lock, so that several workers starting at once apply them exactly once:
PostgreSQL: a transaction-level advisory lock keyed on the schema; SQLite: `BEGIN IMMEDIATE` (the database's
write lock) around the whole upgrade.

Outages: `outage_error` tells a database that cannot serve for now (unreachable, restarting, a read-only standby,
locked, disk full) from a failure of facegate's own, and `outages()` raises the former as the typed errors of
app/errors.py, which the API answers with 503 / 507 instead of a 500.

Bounded waits: an engine made with `lock_timeout` / `statement_timeout` (the server's, from the settings) sets them
on each PostgreSQL connection, so that a request stuck behind another session's lock or in a statement that does not
finish is answered 503 instead of holding its thread for ever; on SQLite `lock_timeout` is the busy timeout. Work
that legitimately takes long lifts them for its own transaction: `without_timeouts` (waiting for another worker's
migration or index build) or `without_statement_timeout` (reading or writing the whole gallery: index load,
reindex, copy, bulk load).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from app.config import REPO_ROOT
from app.errors import DatabaseUnavailable, FacegateError, InsufficientStorage

MIGRATIONS_DIR = REPO_ROOT / "migrations"
# SQLite's busy timeout for an engine made without a lock timeout (maintenance commands, tests).
SQLITE_BUSY_TIMEOUT_MS = 30_000
# ... and for a lock timeout of 0 ("wait as long as it takes"; SQLite's own 0 is "do not wait"): about 24 days.
_SQLITE_NO_BUSY_LIMIT_MS = 2**31 - 1
# First key of PostgreSQL's two-int advisory lock: "fgmg". The second key is the schema's hash.
_PG_MIGRATION_LOCK = 0x66676D67
# Alembic's `context`/`op` are module-level proxies: two threads of one process must not migrate at once.
_ALEMBIC_LOCK = threading.Lock()

# libpq's connection options for PostgreSQL, each unless the URL sets it (`?connect_timeout=10`). Without them a
# server that stopped answering held a request's thread for minutes: psycopg waits 130 s for a connection that is
# accepted and never answered, and a connection cut by the network (no reset) waited for the kernel's
# retransmissions (some 15 minutes) or its first keepalive (after 2 hours).
PG_CONNECT_OPTIONS: dict[str, int] = {
    "connect_timeout": 3,  # seconds (libpq's least is 2): /readyz answers 503 within a 4 s healthcheck
    "keepalives": 1,
    "keepalives_idle": 30,  # seconds of silence before the first probe
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # milliseconds sent data (or a probe) may stay unacknowledged
}
# A restart or a failover takes seconds; the next request connects afresh (the pool pings what it holds).
RETRY_AFTER_SECONDS = 5
# After a connection attempt found no server, the next ones fail at once for this long, then one at a time tries
# again (see `_ConnectGate`).
CONNECT_RETRY_SECONDS = 2.0


def make_engine(
    url: str,
    *,
    sqlite_synchronous: str = "FULL",
    lock_timeout: float | None = None,
    statement_timeout: float | None = None,
    **kwargs: Any,
) -> Engine:
    """An engine for `url`. SQLite files get WAL, foreign keys, a busy timeout and usable from any thread.

    `sqlite_synchronous` FULL makes every commit durable against power loss; NORMAL only against a process crash.
    `lock_timeout` and `statement_timeout` (seconds; for the engine serving requests, not for maintenance commands):
    the longest a statement waits for a lock another session holds, and the longest it runs in all. PostgreSQL (see
    `_BoundedWaits`): None or 0 leave the server's own, by default none. SQLite: `lock_timeout` is the busy timeout,
    the longest a write waits for another connection's (None: SQLITE_BUSY_TIMEOUT_MS; 0: no limit);
    `statement_timeout` does not apply. Extra keyword arguments go to `sqlalchemy.create_engine`.
    """
    parsed = make_url(url)
    # SQLAlchemy's error messages quote the statement's parameters: an embedding's bytes, a name, an API key hash
    # would end up in a logged traceback. Hidden, the message keeps only the SQL.
    kwargs.setdefault("hide_parameters", True)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        if parsed.get_backend_name() == "postgresql":
            connect_args = dict(kwargs.pop("connect_args", {}))
            for option, value in PG_CONNECT_OPTIONS.items():
                if option not in parsed.query:
                    connect_args.setdefault(option, value)
            kwargs["connect_args"] = connect_args
        engine = create_engine(url, **kwargs)
        if parsed.get_backend_name() == "postgresql":
            event.listen(engine, "do_connect", _ConnectGate())
            if lock_timeout or statement_timeout:
                event.listen(engine, "connect", _BoundedWaits(lock_timeout or 0.0, statement_timeout or 0.0))
                event.listen(engine, "handle_error", _note_timeouts)
                _StallWatch(engine, statement_timeout or 0.0).listen()
        return engine
    if sqlite_synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ValueError(f"unknown SQLite synchronous mode {sqlite_synchronous!r}")
    busy_ms = SQLITE_BUSY_TIMEOUT_MS if lock_timeout is None else _milliseconds(lock_timeout) or _SQLITE_NO_BUSY_LIMIT_MS
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("check_same_thread", False)
    connect_args.setdefault("timeout", busy_ms / 1000)
    in_memory = parsed.database in (None, "", ":memory:")
    if in_memory:
        kwargs.setdefault("poolclass", StaticPool)  # one shared connection, or every connection is a new database
    engine = create_engine(url, connect_args=connect_args, **kwargs)
    if not in_memory and not parsed.query.get("uri"):
        file = Path(parsed.database or "")
        event.listen(engine, "do_connect", lambda *_: _create_private(file))

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                _enable_wal(cursor)
            cursor.execute(f"PRAGMA synchronous={sqlite_synchronous.upper()}")
            cursor.execute("PRAGMA foreign_keys=ON")
            # Deleted rows are overwritten with zeros, not left in free pages: deleting a face deletes its embedding.
            cursor.execute("PRAGMA secure_delete=ON")
            # ... and the WAL file, which keeps old pages after a checkpoint until they are overwritten, is cut back
            # to nothing whenever it restarts (see also Gallery.scrub_log).
            cursor.execute("PRAGMA journal_size_limit=0")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        finally:
            cursor.close()
        record.info[_TIMEOUTS_KEY] = Timeouts(busy_ms, 0)

    event.listen(engine, "handle_error", _note_timeouts)
    return engine


def _create_private(path: Path) -> None:
    """Create a new SQLite file readable and writable by its owner only, before SQLite opens it.

    SQLite creates a missing file with 0644 (less the umask), world-readable: every local user could read the
    gallery's names and embeddings. Its -wal, -shm and -journal files take the database file's mode, so they follow.
    An existing file keeps the mode it has (an operator may have chosen a group); a file that cannot be created is
    left to SQLite, whose error says why."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        pass


@dataclass(frozen=True, slots=True)
class Timeouts:
    """PostgreSQL's lock_timeout and statement_timeout in force on a connection, in milliseconds (0: none); for
    SQLite, its busy timeout and 0."""

    lock_ms: int
    statement_ms: int


# Where `_BoundedWaits` leaves a connection's Timeouts (its pool record's `info`, kept as long as the connection).
_TIMEOUTS_KEY = "facegate_timeouts"
# PostgreSQL's settings of a connection, as `_BoundedWaits` reads them.
_TIMEOUT_SETTINGS = ("lock_timeout", "statement_timeout")


class _BoundedWaits:
    """Sets PostgreSQL's lock_timeout and statement_timeout on each new connection. Without them a request waited
    as long as another session held a lock it needed (an operator's `LOCK TABLE` or `ALTER TABLE`, a transaction
    left open in psql, `facegate reindex` holding the gallery's write lock for minutes), and a statement that did
    not finish (an overloaded or stalled server, a plan gone wrong) ran for ever: each held a worker thread and its
    client, and past the client's own timeout the work was wasted. With them the statement fails (SQLSTATE 55P03 or
    57014), its transaction rolls back, and the client gets 503 with Retry-After (`outage_error`).

    A SET on each new connection, so that a URL's own `options` (a search_path) stay as they are. A timeout the
    connection's startup options already set (the URL's `?options=-c statement_timeout=...`, or PGOPTIONS) is the
    operator's and is left as it is; one set to 0 here leaves the server's own (postgresql.conf, ALTER ROLE)."""

    def __init__(self, lock_timeout: float, statement_timeout: float) -> None:
        self.wanted = {"lock_timeout": _milliseconds(lock_timeout), "statement_timeout": _milliseconds(statement_timeout)}

    def __call__(self, dbapi_connection: Any, record: Any) -> None:
        # Outside SQLAlchemy's statement events, so `_StallWatch` would not see a server that stalls right after
        # the handshake: watched here, as a statement under the timeout wanted.
        limit = _stall_limit(self.wanted["statement_timeout"])
        _STALL_TIMER.watch(dbapi_connection, limit)
        try:
            self._set(dbapi_connection, record)
        except Exception as error:
            _STALL_TIMER.forget_after(dbapi_connection, error, limit)
            raise
        _STALL_TIMER.forget(dbapi_connection)

    def _set(self, dbapi_connection: Any, record: Any) -> None:
        in_force: dict[str, int] = {}
        with dbapi_connection.cursor() as cursor:
            cursor.execute(
                "SELECT name, setting::int, source FROM pg_settings WHERE name = ANY(%s)", (list(_TIMEOUT_SETTINGS),)
            )
            for name, setting, source in cursor.fetchall():
                wanted = self.wanted[name]
                if wanted and source != "client":  # "client": the connection's startup options
                    cursor.execute(f"SET {name} = {wanted}")
                    setting = wanted
                in_force[name] = setting
        dbapi_connection.commit()  # psycopg opened a transaction for the SETs; the pool expects none
        record.info[_TIMEOUTS_KEY] = Timeouts(in_force["lock_timeout"], in_force["statement_timeout"])


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000)) if seconds > 0 else 0


# PostgreSQL's SQLSTATEs of a statement it gave up on.
PG_LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout ran out
_PG_QUERY_CANCELED = "57014"  # statement_timeout ran out, or pg_cancel_backend
# The timeouts of the connection each such error came from, for `outage_error`'s message: the driver's error does
# not say how long the statement waited, nor does SQLAlchemy's tell which connection it came from.
_TIMEOUTS_AT_ERROR: weakref.WeakKeyDictionary[BaseException, Timeouts] = weakref.WeakKeyDictionary()


def _note_timeouts(context: ExceptionContext) -> None:
    """The engine's handle_error hook: remembers the timeouts of a connection whose statement was given up on."""
    cause = context.original_exception
    given_up = getattr(cause, "sqlstate", None) in (PG_LOCK_NOT_AVAILABLE, _PG_QUERY_CANCELED)
    if not given_up and _sqlite_primary_code(cause) not in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return
    if context.connection is not None:
        timeouts = context.connection.info.get(_TIMEOUTS_KEY)
        if isinstance(timeouts, Timeouts):
            _TIMEOUTS_AT_ERROR[cause] = timeouts


def without_timeouts(connection: Connection) -> None:
    """No lock or statement timeout for the rest of this PostgreSQL transaction: for work that must wait its turn
    whatever it takes (migrations and the pgvector index set-up, which wait for another worker's under an advisory
    lock, then take as long as the gallery is large). A lock wait counts against statement_timeout too."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL lock_timeout = 0")
        without_statement_timeout(connection)


def without_statement_timeout(connection: Connection) -> None:
    """No statement timeout for the rest of this PostgreSQL transaction: for work whose length grows with the
    gallery, which a timeout sized for a request's statements would cut (loading every face into the index at
    start-up or after a gap, relabelling, reindex, copy, bulk load: minutes at 1M faces). Waiting for another
    session's lock is still bounded by lock_timeout, where one is set."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
        connection.info[_UNBOUNDED_KEY] = True  # nor a client-side limit (`_StallWatch`)


# Where `without_timeouts` and `without_statement_timeout` mark a connection whose transaction has no statement
# timeout (its pool record's `info`, cleared when the transaction ends).
_UNBOUNDED_KEY = "facegate_unbounded"
# How long past a connection's statement_timeout a statement unanswered is taken for a stalled server.
STALL_GRACE_SECONDS = 5.0


def _stall_limit(statement_ms: int) -> float | None:
    """Seconds a statement may go unanswered under a statement_timeout of `statement_ms` (0, none: not watched)."""
    return statement_ms / 1000 + STALL_GRACE_SECONDS if statement_ms else None


class _StallWatch:
    """Closes a PostgreSQL connection whose statement (or pool pre-ping) is still unanswered STALL_GRACE_SECONDS
    after the connection's statement_timeout. A server that stalled whole (its host paused, its storage hung, a
    pooler in front of a backend that died) answers nothing, not even its own timeout, while the TCP connection
    stays up (the kernel acknowledges), so a request waited for ever, holding its thread. Shutting the socket down
    wakes the driver ("server closed the connection"): 503 database_unavailable, and the pool drops the connection.
    Statements of a transaction without a statement timeout (`without_statement_timeout`) are not watched; one the
    server answers within its own timeout never reaches the limit, so a working server's statement is never cut."""

    def __init__(self, engine: Engine, statement_timeout: float) -> None:
        self.engine = engine
        # A pre-ping's connection is not known: the engine's own statement timeout bounds it (0: not watched).
        self._ping_limit = _stall_limit(_milliseconds(statement_timeout))

    def listen(self) -> None:
        event.listen(self.engine, "before_cursor_execute", self._before)
        event.listen(self.engine, "after_cursor_execute", self._after)
        event.listen(self.engine, "handle_error", self._failed)
        for ended in ("commit", "rollback"):
            event.listen(self.engine, ended, _transaction_ended)
        event.listen(self.engine, "checkin", lambda _dbapi, record: record.info.pop(_UNBOUNDED_KEY, None))
        # The pool's pre-ping has no event: it is wrapped (the dialect is this engine's own).
        ping = self.engine.dialect.do_ping

        def watched_ping(dbapi_connection: Any) -> bool:
            _STALL_TIMER.watch(dbapi_connection, self._ping_limit)
            try:
                return bool(ping(dbapi_connection))
            finally:
                _STALL_TIMER.forget(dbapi_connection)

        self.engine.dialect.do_ping = watched_ping  # type: ignore[method-assign]

    @staticmethod
    def _limit_of(connection: Connection) -> float | None:
        """Seconds a statement may go unanswered on `connection` (None: its transaction has no statement timeout)."""
        timeouts = connection.info.get(_TIMEOUTS_KEY)
        if connection.info.get(_UNBOUNDED_KEY) or not isinstance(timeouts, Timeouts):
            return None
        return _stall_limit(timeouts.statement_ms)

    def _before(self, connection: Connection, *_: Any) -> None:
        _STALL_TIMER.watch(connection.connection.dbapi_connection, self._limit_of(connection))

    @staticmethod
    def _after(connection: Connection, *_: Any) -> None:
        _STALL_TIMER.forget(connection.connection.dbapi_connection)

    def _failed(self, context: ExceptionContext) -> None:
        if context.connection is None:
            return  # a pre-ping's: `watched_ping` stops its watch
        dbapi_connection = context.connection.connection.dbapi_connection
        _STALL_TIMER.forget_after(dbapi_connection, context.original_exception, self._limit_of(context.connection))


class _StallTimer:
    """The deadlines of the statements `_StallWatch` watches, for every engine of the process, and the one thread
    that shuts down a connection past its deadline (started at the first watch)."""

    def __init__(self) -> None:
        self.start_afresh()

    def start_afresh(self) -> None:
        """No thread yet, no lock held, nothing watched: also a forked child's state (the parent's thread did not
        come along, and the parent's connections are not the child's)."""
        self._lock = threading.Condition()
        # id(DBAPI connection) -> (deadline, the connection, its socket's descriptor; -1 once shut down)
        self._watched: dict[int, tuple[float, weakref.ref[Any], int]] = {}
        self._thread: threading.Thread | None = None

    def watch(self, dbapi_connection: Any, limit: float | None) -> None:
        if limit is None or dbapi_connection is None:
            return
        try:
            descriptor = dbapi_connection.fileno()
        except Exception:  # noqa: BLE001 - closed already: the driver itself will say so
            return
        with self._lock:
            self._watched[id(dbapi_connection)] = (time.monotonic() + limit, weakref.ref(dbapi_connection), descriptor)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="facegate-stall-watch", daemon=True)
                self._thread.start()
            self._lock.notify()

    def forget(self, dbapi_connection: Any) -> bool:
        """Stop watching the connection; whether it had been shut down."""
        with self._lock:
            entry = self._watched.pop(id(dbapi_connection), None)
        return entry is not None and entry[2] < 0

    def forget_after(self, dbapi_connection: Any, error: BaseException, limit: float | None) -> None:
        """`forget` once a statement failed with `error`: if the watch had shut the connection down (past `limit`),
        `outage_error` tells the error as a stalled server's."""
        if self.forget(dbapi_connection) and limit is not None:
            _STALLED_AT_ERROR[error] = limit

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                for key, (deadline, connection, descriptor) in list(self._watched.items()):
                    if descriptor < 0 or deadline > now:
                        continue
                    if _owns(connection(), descriptor):
                        _shut_down(descriptor)
                        self._watched[key] = (deadline, connection, -1)
                    else:  # closed meanwhile, its descriptor maybe another socket's now: never shut that one down
                        del self._watched[key]
                pending = [deadline for deadline, _, descriptor in self._watched.values() if descriptor >= 0]
                self._lock.wait(timeout=min(pending) - now if pending else None)


_STALL_TIMER = _StallTimer()
# A child forked after the thread started (gunicorn --preload's workers, a multiprocessing pool) has no such thread,
# and maybe a lock the thread held at the fork.
os.register_at_fork(after_in_child=_STALL_TIMER.start_afresh)


def _owns(dbapi_connection: Any, descriptor: int) -> bool:
    """Whether the connection is open on this socket descriptor still."""
    try:
        return dbapi_connection is not None and not dbapi_connection.closed and dbapi_connection.fileno() == descriptor
    except Exception:  # noqa: BLE001 - psycopg's "the connection is closed", or the like
        return False


def _shut_down(descriptor: int) -> None:
    """Shut a socket down under the driver's feet, on a duplicate of its descriptor (closing the duplicate leaves
    the driver's own alone): its wait for an answer ends with the connection closed."""
    try:
        with socket.socket(fileno=os.dup(descriptor)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def _transaction_ended(connection: Connection) -> None:
    if not connection.invalidated:  # an invalidated one has no `info` to read (and leaves the pool)
        connection.info.pop(_UNBOUNDED_KEY, None)


# The limit (seconds) of each error of a statement `_StallWatch` cut, for `outage_error`'s message.
_STALLED_AT_ERROR: weakref.WeakKeyDictionary[BaseException, float] = weakref.WeakKeyDictionary()


class _ConnectGate:
    """While no PostgreSQL server answers, connection attempts fail at once instead of each waiting for the connect
    timeout: a request may ask for a connection several times (the API key, the threshold, the search), and on a
    server that accepts and never answers each took the whole timeout, holding a thread of the worker. After a
    failed attempt, those of the next CONNECT_RETRY_SECONDS fail at once; then one attempt at a time goes through
    until one succeeds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._retry_at = 0.0  # 0: no outage known
        self._trying = False

    def __call__(self, dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        failure: type[Exception] = dialect.loaded_dbapi.OperationalError
        with self._lock:
            if self._retry_at:
                if self._trying or time.monotonic() < self._retry_at:
                    raise failure("connection not tried: no database server answered a moment ago")
                self._trying = True
        unreachable = False
        try:
            return dialect.connect(*cargs, **cparams)
        except failure as error:
            # No SQLSTATE: no server answered (refused, timed out); one that did (a wrong password) is not an outage.
            unreachable = getattr(error, "sqlstate", None) is None
            raise
        finally:
            with self._lock:
                self._trying = False
                self._retry_at = time.monotonic() + CONNECT_RETRY_SECONDS if unreachable else 0.0


def _enable_wal(cursor: Any) -> None:
    """Switch the file to WAL. Converting a new file needs an exclusive lock for a moment, and when two connections
    open the same new file at once SQLite reports 'database is locked' at once instead of calling the busy handler
    (the two would deadlock), so retry for up to the busy timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# SQLite's primary result codes (the low byte of `sqlite3.Error.sqlite_errorcode`).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_FULL = 5, 6, 13
# PostgreSQL's SQLSTATEs of a server that cannot serve for now (class 08, connection exception, as well), or of a
# transaction it rolled back so that another could go on.
_PG_UNAVAILABLE = {
    "57P01": "the database server is shutting down",  # admin_shutdown: a restart or failover ended the session
    "57P02": "the database server crashed",  # crash_shutdown
    "57P03": "the database server is starting up or shutting down",  # cannot_connect_now
    "53300": "the database server has no connection left (max_connections)",  # too_many_connections
    "25006": "the database is read-only (a standby, after a failover?)",  # read_only_sql_transaction
    # Class 40: the server rolled the transaction back so that another could go on; the same request again is
    # expected to pass. facegate's own writers take the write lock first and cannot deadlock one another, but an
    # operator's transaction can (it locks a table, then waits for the gallery's write lock a request holds).
    "40P01": "a deadlock with another session's transaction (an operator's?) ended this request's; nothing was stored",
    "40001": "the database could not serialize this request with a concurrent transaction; nothing was stored",
}
_PG_DISK_FULL = "53100"


def outage_error(error: sa_exc.SQLAlchemyError) -> FacegateError | None:
    """The typed error for a database that cannot serve for now: DatabaseUnavailable (worth retrying) or
    InsufficientStorage (its disk is full). None for any other failure (a bug, a schema not migrated: a 500)."""
    if isinstance(error, sa_exc.TimeoutError):  # the pool's: every connection stayed checked out for pool_timeout
        return _unavailable("every database connection of this worker is in use")
    if not isinstance(error, sa_exc.DBAPIError):
        return None
    cause = error.orig
    if isinstance(cause, sqlite3.Error):
        primary = _sqlite_primary_code(cause)
        if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
            timeouts = _TIMEOUTS_AT_ERROR.get(cause)
            held = f" for {timeouts.lock_ms / 1000:g} s" if timeouts is not None else ""
            return _unavailable(f"the SQLite database stayed locked by another writer{held}; nothing was stored")
        if primary == _SQLITE_FULL:
            return InsufficientStorage("the disk of the SQLite database is full: nothing was stored")
        return None
    # psycopg's errors carry the server's SQLSTATE, None when no server answered; other drivers' have none at all
    sqlstate: str | None = getattr(cause, "sqlstate", "")
    if sqlstate == "":
        return None
    if sqlstate == _PG_DISK_FULL:
        return InsufficientStorage("the database server's disk is full: nothing was stored")
    if sqlstate in _PG_UNAVAILABLE:
        return _unavailable(_PG_UNAVAILABLE[sqlstate])
    if sqlstate in (PG_LOCK_NOT_AVAILABLE, _PG_QUERY_CANCELED):
        return _unavailable(_given_up(sqlstate, None if cause is None else _TIMEOUTS_AT_ERROR.get(cause)))
    if cause is not None and cause in _STALLED_AT_ERROR:
        return _unavailable(
            f"the database did not answer within {_STALLED_AT_ERROR[cause]:g} s, not even with its own statement "
            "timeout (a stalled server?): the connection was closed"
        )
    # No SQLSTATE: no answer from a server (psycopg's own OperationalError: refused, timed out, connection lost).
    lost = sqlstate is None and isinstance(error, sa_exc.OperationalError)
    if lost or error.connection_invalidated or (sqlstate or "").startswith("08"):
        return _unavailable("the database cannot be reached")
    return None


def _sqlite_primary_code(error: BaseException | None) -> int | None:
    """SQLite's primary result code of a sqlite3 error (the low byte of its extended code); None for other errors."""
    code = getattr(error, "sqlite_errorcode", None) if isinstance(error, sqlite3.Error) else None
    return code & 0xFF if isinstance(code, int) else None


def _given_up(sqlstate: str, timeouts: Timeouts | None) -> str:
    """What to tell of a statement the server gave up on (`_BoundedWaits`), with the limit when it is known."""
    if sqlstate == PG_LOCK_NOT_AVAILABLE:
        waited = f" within {timeouts.lock_ms / 1000:g} s" if timeouts is not None and timeouts.lock_ms else ""
        return (
            f"the database did not answer{waited}: another session held a lock this request needed (an operator's "
            "transaction or ALTER TABLE, a long write such as `facegate reindex`?); nothing was stored"
        )
    if timeouts is not None and timeouts.statement_ms:
        return (
            f"the database did not answer within {timeouts.statement_ms / 1000:g} s (a lock held by another session, "
            "an overloaded server?) or an operator cancelled the statement; nothing was stored"
        )
    return "the database cancelled the statement (a statement timeout, or an operator); nothing was stored"


def _unavailable(cause: str) -> DatabaseUnavailable:
    return DatabaseUnavailable(f"{cause}; retry in a few seconds", retry_after_seconds=RETRY_AFTER_SECONDS)


@contextmanager
def outages() -> Iterator[None]:
    """Inside, a database that cannot serve for now (`outage_error`) raises its typed error, caused by SQLAlchemy's."""
    try:
        yield
    except sa_exc.SQLAlchemyError as error:
        typed = outage_error(error)
        if typed is None:
            raise
        raise typed from error


def driver_message(error: BaseException) -> str:
    """The driver's first line (connection refused, unknown database, no such table), without SQLAlchemy's SQL and
    link; for a typed error raised by `outages()`, its cause's."""
    if isinstance(error, FacegateError) and isinstance(error.__cause__, sa_exc.SQLAlchemyError):
        error = error.__cause__
    cause = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit (records are built from them)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str | None = None) -> Config:
    """Alembic's configuration built in code (no alembic.ini): our migrations folder, and `url` if given."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise RuntimeError(
            f"migrations not found at {MIGRATIONS_DIR} (the `migrations/` folder must sit beside the `app` package)"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def known_revision(revision: str) -> bool:
    """Whether `revision` is one of this facegate's migrations (not: a newer facegate's, or no facegate's)."""
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def schema_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def clashing_tables(engine: Engine) -> list[str]:
    """facegate's table names that already exist in a database it never migrated (no alembic_version): another
    application's tables, or a gallery whose alembic_version was dropped. The first migration would fail on them."""
    from app.gallery.tables import Base  # the tables' module imports nothing of this one, but only this needs it

    existing = set(inspect(engine).get_table_names())
    return sorted(name for name in Base.metadata.tables if name in existing)


def upgrade(target: Engine | str, revision: str = "head") -> None:
    """Apply the migrations up to `revision`; safe to call from several processes (and threads) at once: the
    database lock is taken first, then alembic runs."""
    engine = make_engine(target) if isinstance(target, str) else target
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                _upgrade_sqlite(connection, revision)
            else:
                with connection.begin():
                    if connection.dialect.name == "postgresql":
                        # Another worker may be migrating: wait for it, however long its migration takes; and a
                        # migration rewrites tables as large as the gallery.
                        without_timeouts(connection)
                        connection.execute(
                            text("SELECT pg_advisory_xact_lock(:key, hashtext(current_schema()))"),
                            {"key": _PG_MIGRATION_LOCK},
                        )
                    _run_upgrade(connection, revision)
    finally:
        if isinstance(target, str):
            engine.dispose()


def _upgrade_sqlite(connection: Connection, revision: str) -> None:
    # pysqlite would only open a transaction before INSERT/UPDATE/DELETE and run the DDL outside it; an explicit
    # BEGIN IMMEDIATE takes the write lock first, so a second process waits and then sees head. It waits however
    # long the other's migration takes, as on PostgreSQL, not the requests' busy timeout (the lock timeout): a
    # worker's start-up must not fail because another worker is migrating a large gallery.
    with sqlite_busy_timeout(connection, lambda _: _SQLITE_NO_BUSY_LIMIT_MS):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            _run_upgrade(connection, revision)
        except BaseException:
            connection.rollback()
            raise
        connection.commit()


@contextmanager
def sqlite_busy_timeout(connection: Connection, change: Callable[[int], int]) -> Iterator[None]:
    """Inside, the SQLite connection's busy timeout is `change(the one it had)` milliseconds; afterwards it is
    restored (the connection goes back to the pool with its engine's)."""
    busy_ms = int(connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one())
    connection.exec_driver_sql(f"PRAGMA busy_timeout={int(change(busy_ms))}")
    try:
        yield
    finally:
        connection.exec_driver_sql(f"PRAGMA busy_timeout={busy_ms}")


def _run_upgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    with _ALEMBIC_LOCK:
        command.upgrade(config, revision)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def in_memory_sqlite(url: str) -> bool:
    """A SQLite URL without a file (`sqlite://`, `sqlite:///`, `sqlite:///:memory:`): gone when the process ends."""
    return make_url(url).get_backend_name() == "sqlite" and sqlite_path(url) is None


def missing_sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL when there is none yet (opening it would create an empty gallery), else None."""
    path = sqlite_path(url)
    return path if path is not None and not path.exists() else None
