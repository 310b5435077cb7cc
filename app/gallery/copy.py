"""Copy a whole gallery into another, empty database (`facegate db copy --to URL`): SQLite and PostgreSQL in any
direction, e.g. from `make run`'s SQLite file to the production PostgreSQL, or a consistent backup and its restore.

What is copied, row for row: identities, faces (embeddings as the same bytes, base embeddings, stored photos),
deployment settings and API keys (hashes, scopes, revocations: clients keep working). What is not: the change log
(`gallery_changes`) and the Alembic version (the target is migrated to head first). The target's
`gallery_state.last_change_id` instead jumps past its old value with no log entries in between, as after
`bulk.copy_synthetic_gallery` or a pruned log: every worker of the target sees the gap and loads the gallery in
full (`GalleryIndex.sync`, and pgvector's mirror copies every face again).

- All or nothing: the rows go into the target in one transaction, with the tables that are copied locked
  (SQLite: BEGIN IMMEDIATE; PostgreSQL: LOCK TABLE), and the target is checked to be empty inside it. An error or
  an interruption (Ctrl-C, kill -9, a lost connection) leaves it as it was: migrated and empty.
- One snapshot of the source: the reads run in one read-only transaction (PostgreSQL REPEATABLE READ, SQLite a
  WAL read transaction), so a gallery in use is copied as of one moment, faces always with their identity.
- Memory bounded: rows are streamed in batches (a server-side cursor on PostgreSQL), never the whole table; faces
  with a stored photo (up to the upload limit each) go in small batches of their own.
- Timestamps are written as UTC instants: SQLite keeps no offset and PostgreSQL hands them back in the session's
  time zone, so copying either value as it comes would move it by the zone's offset.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import alembic.util
from sqlalchemy import (
    JSON,
    BigInteger,
    Connection,
    DateTime,
    Engine,
    Float,
    Integer,
    LargeBinary,
    String,
    Table,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.types import TypeEngine

from app.gallery import db
from app.gallery.store import as_utc
from app.gallery.tables import GALLERY_STATE_ID, ApiKey, DeploymentSetting, Face, GalleryState, Identity

BATCH_ROWS = 5_000  # ~7 MB of face rows (two 512-byte embeddings each) per batch
PHOTO_FETCH_ROWS = 4  # faces with a stored photo are fetched this many at a time (a photo may be 20 MiB)
PHOTO_BATCH_BYTES = 16 * 1024 * 1024  # ... and written once this many bytes of photos are waiting

_IDENTITIES: Table = Identity.__table__  # type: ignore[assignment]
_FACES: Table = Face.__table__  # type: ignore[assignment]
_SETTINGS: Table = DeploymentSetting.__table__  # type: ignore[assignment]
_KEYS: Table = ApiKey.__table__  # type: ignore[assignment]
# Written in this order (faces refer to identities). Any row in one of them makes a target non-empty.
COPIED_TABLES: tuple[Table, ...] = (_IDENTITIES, _FACES, _SETTINGS, _KEYS)

Progress = Callable[[str, int], None]  # (table, rows of it written so far in the target's transaction)


class CopyRefused(RuntimeError):
    """The copy was not made (source or target unsuitable); the target holds none of the source's rows."""


Role = Literal["source", "target"]


class UnusableDatabase(RuntimeError):
    """A database could not be reached or read; `role` says which, `error` is the driver's error."""

    def __init__(self, role: Role, error: SQLAlchemyError) -> None:
        super().__init__(f"cannot use the {role} database")
        self.role, self.error = role, error


@dataclass(frozen=True, slots=True)
class CopyReport:
    identities: int
    faces: int
    api_keys: int
    settings: int
    seconds: float


def _stride() -> int:
    """A random jump of the change-log position: no running worker can expect the position it lands on."""
    return secrets.randbelow(2**31)


def display_url(url: str) -> str:
    """The URL as it may be printed: any password replaced by ***."""
    return make_url(url).render_as_string(hide_password=True)


def copy_gallery(
    source_url: str, target_url: str, *, batch_rows: int = BATCH_ROWS, progress: Progress | None = None
) -> CopyReport:
    """Copy every identity, face, deployment setting and API key of the gallery at `source_url` into the
    database at `target_url`, migrated to head first, which must hold none of these (raises CopyRefused).
    `progress` is called after each batch written, inside the target's transaction."""
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    _check_urls(source_url, target_url)
    start = time.perf_counter()
    source = db.make_engine(source_url)
    target = db.make_engine(target_url)
    try:
        with _using("source"):
            source_identity = _server_identity(source)
            revision, head = db.schema_revision(source), db.head_revision()
        if revision is not None and not db.known_revision(revision):
            raise CopyRefused(
                f"the source database is at revision {revision}, which this facegate does not know (migrated by a "
                "newer facegate?): copy it with the facegate that serves it"
            )
        if revision != head:
            what = "no facegate gallery (never migrated)" if revision is None else f"at revision {revision}"
            raise CopyRefused(
                f"the source database is {what}, not at this facegate's head {head}: run `facegate db upgrade` on it"
                " first"
            )
        with _using("target"):
            if _server_identity(target) == source_identity:
                raise CopyRefused("the target is the source database itself")
            # Before migrating: a gallery in use is refused without being touched (the check is made again below,
            # under the target's locks, where it counts).
            _refuse_unless_empty(target)
            try:
                db.upgrade(target)
            except alembic.util.CommandError as error:
                # Not the CLI's generic "cannot migrate FACEGATE_DATABASE_URL": the target is the one at fault.
                raise CopyRefused(
                    f"the target database cannot be migrated: {error} (migrated by a newer facegate?); nothing was "
                    "written"
                ) from None
        counts = _copy(source, target, batch_rows=batch_rows, progress=progress or _no_progress)
    finally:
        source.dispose()
        target.dispose()
    return CopyReport(
        identities=counts[_IDENTITIES.name],
        faces=counts[_FACES.name],
        api_keys=counts[_KEYS.name],
        settings=counts[_SETTINGS.name],
        seconds=time.perf_counter() - start,
    )


# ----------------------------------------------------------------------------------------------- checks


def _check_urls(source_url: str, target_url: str) -> None:
    source, target = make_url(source_url), make_url(target_url)
    for role, url in (("source", source), ("target", target)):
        if url.get_backend_name() not in {"sqlite", "postgresql"}:
            raise CopyRefused(f"the {role} is a {url.get_backend_name()} database: facegate uses SQLite or PostgreSQL")
    if db.in_memory_sqlite(target_url):
        raise CopyRefused("the target is an in-memory SQLite database: the copy would vanish when the command ends")
    source_path = db.missing_sqlite_file(source_url)
    if source_path is not None:  # make_engine would create an empty gallery there: say what is wrong instead.
        raise CopyRefused(f"the source SQLite database {source_path} does not exist")


def _server_identity(engine: Engine) -> tuple[Any, ...]:
    """What tells two databases apart even when their URLs differ (localhost vs 127.0.0.1, a linked file):
    SQLite: the file's device and inode; PostgreSQL: the server instance, database and schema."""
    path = db.sqlite_path(engine.url.render_as_string(hide_password=False))
    if engine.dialect.name == "sqlite":
        if path is None or not path.exists():
            return ("sqlite", str(path))
        stat = os.stat(path)
        return ("sqlite", stat.st_dev, stat.st_ino)
    # Not inet_server_port(): it is NULL through a Unix socket, and the server the same through TCP.
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT pg_postmaster_start_time(), current_database(), current_schema()")
        ).one()
    return (engine.dialect.name, *row)


def _refuse_unless_empty(target: Engine) -> None:
    with target.connect() as connection:
        present = set(inspect(connection).get_table_names())
        _check_empty(connection, [t for t in COPIED_TABLES if t.name in present])


def _check_empty(connection: Connection, tables: Sequence[Table]) -> None:
    filled = []
    for table in tables:
        count = connection.execute(select(func.count()).select_from(table)).scalar_one()
        if count:
            filled.append(f"{table.name.replace('_', ' ')}: {count}")
    if filled:
        raise CopyRefused(
            f"the target database is not empty ({', '.join(filled)}): copy into a new database or schema; nothing "
            "was written"
        )


@contextmanager
def _using(role: Role) -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as error:
        raise UnusableDatabase(role, error) from error


# ---------------------------------------------------------------------------------------------- copying


def _copy(source: Engine, target: Engine, *, batch_rows: int, progress: Progress) -> dict[str, int]:
    with source.connect() as reading, _read_snapshot(reading):
        with target.connect() as writing, _write_transaction(writing):
            _check_empty(writing, COPIED_TABLES)
            counts = {table.name: 0 for table in COPIED_TABLES}
            for table in COPIED_TABLES:
                if table is _FACES:  # faces without a photo in large batches, then those with one in small ones
                    batches = [
                        _read(reading, table, table.c.image.is_(None), fetch=batch_rows),
                        _photo_batches(_read(reading, table, table.c.image.is_not(None), fetch=PHOTO_FETCH_ROWS)),
                    ]
                else:
                    batches = [_read(reading, table, None, fetch=batch_rows)]
                write = _writer(writing, table)
                for stream in batches:
                    for rows in stream:
                        write(rows)
                        counts[table.name] += len(rows)
                        progress(table.name, counts[table.name])
            # No log entries for the new rows: the head moves past them, so that every worker of the target sees
            # a gap and loads in full (module docstring). By a random stride too: a worker still running from
            # before a restore (the database dropped, then copied back from a backup) that stood at exactly the
            # restored position would see no change and keep the lost faces searchable.
            writing.execute(
                update(GalleryState)
                .where(GalleryState.id == GALLERY_STATE_ID)
                .values(last_change_id=GalleryState.last_change_id + counts[_FACES.name] + 1 + _stride())
            )
            if writing.dialect.name == "postgresql":
                # Fresh statistics, as after the synthetic bulk load: the planner would otherwise take the tables
                # for the empty ones they were (bulk.copy_synthetic_gallery).
                writing.execute(text("ANALYZE identities, faces"))
    return counts


@contextmanager
def _read_snapshot(connection: Connection) -> Iterator[None]:
    """A read-only transaction that sees the source as of its first read, to the end."""
    if connection.dialect.name == "sqlite":
        # pysqlite would run the SELECTs outside any transaction (each its own snapshot): begin one explicitly.
        connection.exec_driver_sql("BEGIN")
    else:
        connection.execution_options(isolation_level="REPEATABLE READ")
        connection.begin()
        connection.execute(text("SET TRANSACTION READ ONLY"))
        # The URL's or the server's statement_timeout, set for requests, would cut a copy of a large gallery.
        db.without_statement_timeout(connection)
    try:
        yield
    finally:
        connection.rollback()


@contextmanager
def _write_transaction(connection: Connection) -> Iterator[None]:
    """One transaction on the target that keeps other writers of the copied tables out until it ends."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock first, as the migrations do (db.py)
    else:
        connection.begin()
        db.without_statement_timeout(connection)  # as `_read_snapshot`
        names = ", ".join(table.name for table in COPIED_TABLES)
        connection.execute(text(f"LOCK TABLE {names}, gallery_state IN SHARE ROW EXCLUSIVE MODE"))
    try:
        yield
    except BaseException:
        connection.rollback()
        raise
    connection.commit()


def _read(connection: Connection, table: Table, where: Any, *, fetch: int) -> Iterator[Sequence[Row[Any]]]:
    """The table's rows (or those matching `where`) in batches of `fetch`, streamed (PostgreSQL: a server-side
    cursor; SQLite's cursor steps through the table as it is read)."""
    query = select(table)
    if where is not None:
        query = query.where(where)
    result = connection.execution_options(yield_per=fetch).execute(query)
    yield from result.partitions()


def _photo_batches(batches: Iterator[Sequence[Row[Any]]]) -> Iterator[list[Row[Any]]]:
    """Rows with photos regrouped until PHOTO_BATCH_BYTES of photos (or BATCH_ROWS rows) are waiting."""
    waiting: list[Row[Any]] = []
    size = 0
    for rows in batches:
        for row in rows:
            waiting.append(row)
            size += len(row.image)
            if size >= PHOTO_BATCH_BYTES or len(waiting) >= BATCH_ROWS:
                yield waiting
                waiting, size = [], 0
    if waiting:
        yield waiting


def _writer(connection: Connection, table: Table) -> Callable[[Sequence[Row[Any]]], None]:
    """A function that inserts rows of `table` (as `select(table)` reads them, in any dialect) into `connection`'s
    database: PostgreSQL by binary COPY, SQLite by one executemany with the dialect's own conversions (datetime
    and JSON as SQLAlchemy stores them). Either way timestamps are written as UTC instants."""
    columns = list(table.columns)
    names = ", ".join(column.name for column in columns)
    times = [i for i, column in enumerate(columns) if isinstance(column.type, DateTime)]
    dialect = connection.dialect
    if dialect.name == "postgresql":
        raw = connection.connection.driver_connection  # psycopg 3, inside the transaction
        pg_types = [_pg_type(column.type) for column in columns]

        def copy_rows(rows: Sequence[Row[Any]]) -> None:
            with raw.cursor() as cursor:  # type: ignore[union-attr]
                with cursor.copy(f"COPY {table.name} ({names}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(pg_types)
                    for row in rows:
                        copy.write_row(_utc(row, times))

        return copy_rows
    processors = [column.type.dialect_impl(dialect).bind_processor(dialect) for column in columns]
    converting = [(i, p) for i, p in enumerate(processors) if p is not None]
    marks = ", ".join("?" for _ in columns)
    statement = f"INSERT INTO {table.name} ({names}) VALUES ({marks})"

    def insert_rows(rows: Sequence[Row[Any]]) -> None:
        values = []
        for row in rows:
            value = _utc(row, times)
            for i, process in converting:
                value[i] = process(value[i])
            values.append(tuple(value))
        connection.exec_driver_sql(statement, values)

    return insert_rows


def _pg_type(kind: TypeEngine[Any]) -> str:
    """PostgreSQL's name of a column type, for binary COPY (most specific SQLAlchemy class first)."""
    for python_type, name in _PG_TYPES:
        if isinstance(kind, python_type):
            return name
    raise TypeError(f"no PostgreSQL COPY type for {kind!r}")


_PG_TYPES: tuple[tuple[type[TypeEngine[Any]], str], ...] = (
    (BigInteger, "int8"),
    (Integer, "int4"),
    (Float, "float8"),
    (DateTime, "timestamptz"),
    (LargeBinary, "bytea"),
    (JSON, "jsonb"),
    (String, "text"),  # Text too; varchar's binary form is text's
)


def _utc(row: Row[Any], times: list[int]) -> list[Any]:
    value = list(row)
    for i in times:
        if value[i] is not None:
            value[i] = as_utc(value[i])
    return value


def _no_progress(_table: str, _rows: int) -> None:
    pass
