"""Engine, sessions and migrations of the gallery database (SQLite file or PostgreSQL through psycopg 3).

Migrations run under a lock, so that several workers starting at once apply them exactly once:
PostgreSQL: a transaction-level advisory lock keyed on the schema; SQLite: `BEGIN IMMEDIATE` (the database's
write lock) around the whole upgrade.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from app.config import REPO_ROOT

MIGRATIONS_DIR = REPO_ROOT / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# First key of PostgreSQL's two-int advisory lock: "fgmg". The second key is the schema's hash.
_PG_MIGRATION_LOCK = 0x66676D67
# Alembic's `context`/`op` are module-level proxies: two threads of one process must not migrate at once.
_ALEMBIC_LOCK = threading.Lock()


def make_engine(url: str, *, sqlite_synchronous: str = "FULL", **kwargs: Any) -> Engine:
    """An engine for `url`. SQLite files get WAL, foreign keys, a 30 s busy timeout and usable from any thread.

    `sqlite_synchronous` FULL makes every commit durable against power loss; NORMAL only against a process crash.
    Extra keyword arguments go to `sqlalchemy.create_engine`.
    """
    parsed = make_url(url)
    # SQLAlchemy's error messages quote the statement's parameters: an embedding's bytes, a name, an API key hash
    # would end up in a logged traceback. Hidden, the message keeps only the SQL.
    kwargs.setdefault("hide_parameters", True)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(url, **kwargs)
    if sqlite_synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ValueError(f"unknown SQLite synchronous mode {sqlite_synchronous!r}")
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("check_same_thread", False)
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
    in_memory = parsed.database in (None, "", ":memory:")
    if in_memory:
        kwargs.setdefault("poolclass", StaticPool)  # one shared connection, or every connection is a new database
    engine = create_engine(url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
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
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    return engine


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
    # BEGIN IMMEDIATE takes the write lock first, so a second process waits (busy timeout) and then sees head.
    connection.exec_driver_sql("BEGIN IMMEDIATE")
    try:
        _run_upgrade(connection, revision)
    except BaseException:
        connection.rollback()
        raise
    connection.commit()


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


def missing_sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL when there is none yet (opening it would create an empty gallery), else None."""
    path = sqlite_path(url)
    return path if path is not None and not path.exists() else None
