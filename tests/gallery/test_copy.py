"""`app/gallery/copy.py` (`facegate db copy`) between real databases: SQLite files and PostgreSQL schemas, in the
four directions. PostgreSQL sessions here run in Asia/Kathmandu time (+05:45), so that a timestamp copied as its
local wall time instead of its instant would show.

The served-app round trip on the real models is in tests/api/test_db_copy.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url

from app.auth import store as keys
from app.auth.scopes import Scope
from app.gallery import Gallery, bulk, copy, db, store
from app.gallery.copy import COPIED_TABLES, CopyRefused, copy_gallery
from app.gallery.tables import GalleryChange
from app.vision.types import Box
from tests.conftest import POSTGRES_URL
from tests.gallery.conftest import MODEL, random_embeddings

DIRECTIONS = [
    ("sqlite", "sqlite"),
    pytest.param("sqlite", "postgres", marks=pytest.mark.postgres),
    pytest.param("postgres", "sqlite", marks=pytest.mark.postgres),
    pytest.param("postgres", "postgres", marks=pytest.mark.postgres),
]
PG_TIMEZONE = "Asia/Kathmandu"

NewDatabase = Callable[[str], str]


@pytest.fixture
def new_database(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NewDatabase]:
    """`new_database("sqlite" | "postgres")`: the URL of a new, empty database (a file not yet created, or a fresh
    schema dropped afterwards)."""
    schemas: list[str] = []
    conninfo = ""

    def _new(kind: str) -> str:
        nonlocal conninfo
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / f'{uuid.uuid4().hex[:8]}.db'}"
        conninfo = request.getfixturevalue("postgres_server")
        schema = f"test_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(conninfo, autocommit=True) as connection:
            connection.execute(f'CREATE SCHEMA "{schema}"')
        schemas.append(schema)
        options = f"-csearch_path={schema} -ctimezone={PG_TIMEZONE}"
        return make_url(POSTGRES_URL).update_query_dict({"options": options}).render_as_string(hide_password=False)

    yield _new
    if schemas:
        with psycopg.connect(conninfo, autocommit=True) as connection:
            for schema in schemas:
                connection.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def engines() -> Iterator[Callable[[str], Engine]]:
    opened: list[Engine] = []

    def _engine(url: str) -> Engine:
        engine = db.make_engine(url)
        opened.append(engine)
        return engine

    yield _engine
    for engine in opened:
        engine.dispose()


def dump(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every row of the copied tables, by primary key, timestamps as UTC instants (how the two databases store
    them differs; the instant must not)."""
    tables: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as connection:
        for table in COPIED_TABLES:
            rows = connection.execute(select(table).order_by(*table.primary_key.columns)).mappings()
            tables[table.name] = [
                {k: store.as_utc(v) if isinstance(v, datetime) else v for k, v in row.items()} for row in rows
            ]
    return tables


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        result = {t.name: connection.execute(select(func.count()).select_from(t)).scalar_one() for t in COPIED_TABLES}
        result["last_change_id"] = connection.execute(text("SELECT last_change_id FROM gallery_state")).scalar_one()
    return result


def fill(url: str) -> dict[str, str]:
    """A gallery with everything a copy must carry: Unicode names and nested metadata, faces of two model versions
    (one with a stored photo and a base embedding differing from the embedding, embeddings with -0.0, subnormal
    and extreme float32 values), deletions (so the change log has history), a stored threshold, and API keys (one
    used, one revoked). Returns the keys in clear."""
    gallery = Gallery.open(url, MODEL)
    try:
        rng = np.random.default_rng(7)
        vectors = random_embeddings(rng, 6)
        vectors[0, :2] = np.array([-0.0, 1e-45], np.float32)  # signed zero, subnormal
        vectors[5, :2] = np.array([np.finfo(np.float32).max, np.finfo(np.float32).tiny], np.float32)  # base only
        with gallery.session() as session:
            ada = store.create_identity(session, name="Ada Lovelace", metadata={"team": "x", "deep": [[{"a": 1.5}]]})
            zoe = store.create_identity(session, name="ZOË Straße 名前", metadata={})
            gone = store.create_identity(session, name="Deleted Person")
            for i, owner in enumerate([ada.id, ada.id, zoe.id, gone.id]):
                store.add_face(
                    session,
                    identity_id=owner,
                    embedding=vectors[i],
                    model_version=MODEL,
                    box=Box(i, 2 * i, 100 + i, 120 + i),
                    score=0.1 * i + 1 / 3,
                    image=b"\x89PNG\r\n\x00photo" * 50 if i == 1 else None,
                    base_embedding=vectors[5] if i == 1 else vectors[i],
                )
            store.add_face(
                session, identity_id=zoe.id, embedding=vectors[4], model_version="older-model", box=Box(0, 0, 9, 9), score=2.0
            )
        gallery.delete_identity(gone.id)
        gallery.set_setting("threshold", {"value": 0.3312, "far": 0.001}, source="calibration:gallery")
    finally:
        gallery.close()
    engine = db.make_engine(url)
    try:
        with db.make_session_factory(engine).begin() as session:
            reader = keys.create_key(session, name="door-7", scope=Scope.read)
            admin = keys.create_key(session, name="admin", scope=Scope.admin)
            revoked = keys.create_key(session, name="old", scope=Scope.write)
            keys.touch_key(session, key_id=reader.record.id)
            keys.revoke_key(session, reference=revoked.record.prefix)
    finally:
        engine.dispose()
    return {"read": reader.key, "admin": admin.key, "revoked": revoked.key}


@pytest.mark.parametrize(("source_kind", "target_kind"), DIRECTIONS)
def test_round_trip_copies_every_row(
    source_kind: str, target_kind: str, new_database: NewDatabase, engines: Callable[[str], Engine]
) -> None:
    source_url, target_url = new_database(source_kind), new_database(target_kind)
    clear_keys = fill(source_url)
    before = dump(engines(source_url))
    # A worker already serving the (empty) target: it must pick up the copy without a restart.
    worker = Gallery.open(target_url, MODEL)
    try:
        assert worker.stats().size == 0
        report = copy_gallery(source_url, target_url, batch_rows=2)  # several batches per table

        assert (report.identities, report.faces, report.api_keys, report.settings) == (2, 4, 3, 1)
        after = dump(engines(target_url))
        assert after == before  # every column of every row, embeddings and photos as the same bytes
        assert dump(engines(source_url)) == before  # the source is untouched
        faces = {row["id"]: row for row in after["faces"]}
        assert any(row["image"] for row in faces.values())
        assert all(len(row["embedding"]) == 512 for row in faces.values())

        # No change log: the head moved past the worker's position with nothing in between, so it reloads.
        target = engines(target_url)
        with target.connect() as connection:
            assert connection.execute(select(func.count()).select_from(GalleryChange)).scalar_one() == 0
        assert counts(target)["last_change_id"] >= report.faces + 1
        assert worker.refresh().reloaded
        original = Gallery.open(source_url, MODEL)
        try:
            assert worker.index_state().face_ids_sha256 == original.index_state().face_ids_sha256
        finally:
            original.close()
        source_faces = sorted(before["faces"], key=lambda row: row["id"])
        current = [row for row in source_faces if row["model_version"] == MODEL]
        queries = np.stack([np.frombuffer(row["embedding"], "<f4") for row in current])
        found = worker.search(queries, top_k=1)
        assert [hits[0].face_id for hits in found] == [row["id"] for row in current]
        assert [hits[0].distance for hits in found] == [0.0] * len(current)
        assert worker.stats().stale == 1

        # Writes on the target go on from the new head, and a fresh worker sees them through the log.
        added = worker.enroll_face(
            name="New Person", embedding=random_embeddings(np.random.default_rng(9), 1)[0], box=Box(0, 0, 9, 9), score=1.0
        )
        other = Gallery.open(target_url, MODEL)
        try:
            assert other.index.contains(added.face.id) and other.stats().size == len(current) + 1
        finally:
            other.close()
    finally:
        worker.close()

    # API keys work on the target as on the source: same scopes, the revoked one still refused.
    with db.make_session_factory(engines(target_url)).begin() as session:
        read = keys.authenticate(session, key=clear_keys["read"])
        admin = keys.authenticate(session, key=clear_keys["admin"])
        assert read is not None and read.scope is Scope.read and read.last_used_at is not None
        assert admin is not None and admin.scope is Scope.admin
        assert keys.authenticate(session, key=clear_keys["revoked"]) is None
        assert keys.key_count(session) == 3


@pytest.mark.postgres
def test_a_worker_running_through_a_restore_drops_the_faces_the_backup_lacks(
    new_database: NewDatabase, postgres_server: str
) -> None:
    """The database is dropped and copied back from a backup while a worker keeps running. The restored position
    (the backup's faces + 1) could equal the worker's own, which then saw no change: a face enrolled after the
    backup stayed searchable, its person named at distance 0."""
    url, backup = new_database("postgres"), new_database("sqlite")
    rng = np.random.default_rng(11)
    worker = Gallery.open(url, MODEL)
    try:
        box = Box(0, 0, 9, 9)
        alice = worker.enroll_face(embedding=rng.normal(size=128), box=box, score=1.0, name="alice")
        worker.enroll_face(embedding=rng.normal(size=128), box=box, score=1.0, name="bob")
        copy_gallery(url, backup)  # 2 faces: restored at position 3
        lost = rng.normal(size=128)
        worker.enroll_face(embedding=lost, box=box, score=1.0, identity_id=alice.identity_id)
        worker.search(lost, top_k=1)  # any request: the worker replays up to the head
        assert worker.stats().last_change_id == 3  # where the restored log would stand without the stride
        schema = str(make_url(url).query["options"]).split()[0].removeprefix("-csearch_path=")
        with psycopg.connect(postgres_server, autocommit=True) as connection:  # lost, then restored
            connection.execute(f'DROP SCHEMA "{schema}" CASCADE')
            connection.execute(f'CREATE SCHEMA "{schema}"')
        copy_gallery(backup, url)
        nearest = worker.search(lost, top_k=1)[0][0]
        assert worker.stats().size == 2
        assert nearest.distance > 1.0  # alice's other face, not the lost one
    finally:
        worker.close()


@pytest.mark.parametrize(("source_kind", "target_kind"), DIRECTIONS)
def test_a_target_that_is_not_empty_is_refused_and_left_untouched(
    source_kind: str, target_kind: str, new_database: NewDatabase, engines: Callable[[str], Engine]
) -> None:
    source_url, target_url = new_database(source_kind), new_database(target_kind)
    fill(source_url)
    gallery = Gallery.open(target_url, MODEL)
    try:
        gallery.create_identity(name="Already Here")
    finally:
        gallery.close()
    before = dump(engines(target_url)), counts(engines(target_url))
    with pytest.raises(CopyRefused, match=r"target database is not empty \(identities: 1\)"):
        copy_gallery(source_url, target_url)
    assert (dump(engines(target_url)), counts(engines(target_url))) == before


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_target_with_only_an_api_key_is_refused(kind: str, new_database: NewDatabase) -> None:
    source_url, target_url = new_database("sqlite"), new_database(kind)
    fill(source_url)
    db.upgrade(target_url)
    engine = db.make_engine(target_url)
    try:
        with db.make_session_factory(engine).begin() as session:
            keys.create_key(session, name="bootstrap", scope=Scope.admin)
        with pytest.raises(CopyRefused, match=r"not empty \(api keys: 1\)"):
            copy_gallery(source_url, target_url)
        assert counts(engine)["identities"] == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize(("source_kind", "target_kind"), DIRECTIONS)
def test_a_failure_mid_copy_leaves_the_target_empty(
    source_kind: str, target_kind: str, new_database: NewDatabase, engines: Callable[[str], Engine]
) -> None:
    source_url, target_url = new_database(source_kind), new_database(target_kind)
    fill(source_url)
    written: list[tuple[str, int]] = []

    def fail_in_faces(table: str, rows: int) -> None:
        written.append((table, rows))
        if table == "faces" and rows >= 2:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        copy_gallery(source_url, target_url, batch_rows=1, progress=fail_in_faces)
    assert written[-1] == ("faces", 2) and ("identities", 2) in written  # it did fail half-way
    empty = counts(engines(target_url))
    assert empty == {"identities": 0, "faces": 0, "deployment_settings": 0, "api_keys": 0, "last_change_id": 0}
    # ... and the copy can simply be run again.
    copy_gallery(source_url, target_url)
    assert dump(engines(target_url)) == dump(engines(source_url))


_KILLED_CHILD = """
import pathlib, sys, time
from app.gallery.copy import copy_gallery
def stall(table, rows):
    if table == "faces" and rows >= 2:
        pathlib.Path(sys.argv[3]).write_text("mid-copy")
        time.sleep(60)
copy_gallery(sys.argv[1], sys.argv[2], batch_rows=1, progress=stall)
"""


@pytest.mark.parametrize(("source_kind", "target_kind"), DIRECTIONS)
def test_a_copy_killed_mid_way_leaves_the_target_empty(
    source_kind: str, target_kind: str, new_database: NewDatabase, engines: Callable[[str], Engine], tmp_path: Path
) -> None:
    """kill -9 of the copying process with rows written in its transaction (its locks held): the target
    comes back empty and usable."""
    source_url, target_url = new_database(source_kind), new_database(target_kind)
    fill(source_url)
    marker = tmp_path / "marker"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_CHILD), source_url, target_url, str(marker)],
        env={**os.environ, "PYTHONPATH": str(Path(copy.__file__).parents[2])},
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "the copy ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    assert counts(engines(target_url))["faces"] == 0
    assert counts(engines(target_url))["identities"] == 0
    copy_gallery(source_url, target_url)
    assert dump(engines(target_url)) == dump(engines(source_url))


@pytest.mark.postgres
def test_the_source_itself_is_refused_whatever_its_url(new_database: NewDatabase, tmp_path: Path) -> None:
    sqlite_url = new_database("sqlite")
    fill(sqlite_url)
    path = Path(make_url(sqlite_url).database or "")
    link = tmp_path / "link.db"
    link.symlink_to(path)
    for spelling in (sqlite_url, f"sqlite:///{path.parent}/../{path.parent.name}/{path.name}", f"sqlite:///{link}"):
        with pytest.raises(CopyRefused, match="the target is the source database itself"):
            copy_gallery(sqlite_url, spelling)
    pg_url = new_database("postgres")
    fill(pg_url)
    other_host = make_url(pg_url).set(host="localhost").render_as_string(hide_password=False)
    with pytest.raises(CopyRefused, match="the target is the source database itself"):
        copy_gallery(pg_url, other_host)
    sockets = Path("/var/run/postgresql")  # the server's Unix socket, where it has one (not in every container)
    if make_url(pg_url).host in ("127.0.0.1", "localhost") and any(sockets.glob(".s.PGSQL.*")):
        # Through the socket inet_server_port() is NULL: it was taken for another server ("not empty" instead).
        socket_url = make_url(pg_url).set(host=None, port=None).update_query_dict({"host": str(sockets)})
        through_socket = socket_url.render_as_string(hide_password=False)
        with pytest.raises(CopyRefused, match="the target is the source database itself"):
            copy_gallery(pg_url, through_socket)


def test_unsuitable_sources_and_targets_are_refused(
    new_database: NewDatabase, engines: Callable[[str], Engine], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(CopyRefused, match="does not exist"):
        copy_gallery(f"sqlite:///{missing}", new_database("sqlite"))
    assert not missing.exists()  # not created as an empty gallery
    source_url = new_database("sqlite")
    fill(source_url)
    with pytest.raises(CopyRefused, match="in-memory"):
        copy_gallery(source_url, "sqlite://")
    with pytest.raises(CopyRefused, match="a mysql database"):
        copy_gallery(source_url, "mysql://user@host/db")
    old = new_database("sqlite")
    db.upgrade(old, "0004")
    with pytest.raises(CopyRefused, match="at revision 0004, not at this facegate's head"):
        copy_gallery(old, new_database("sqlite"))
    # An empty target migrated by a newer facegate: its own refusal (the CLI blamed FACEGATE_DATABASE_URL).
    newer = new_database("sqlite")
    db.upgrade(newer)
    with engines(newer).begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(CopyRefused, match="the target database cannot be migrated: .*'0099'.*nothing was written"):
        copy_gallery(source_url, newer)
    # A source migrated by a newer facegate: `facegate db upgrade` (this facegate's advice for an older one) cannot
    # help there.
    with pytest.raises(CopyRefused, match="at revision 0099, which this facegate does not know"):
        copy_gallery(newer, new_database("sqlite"))


@pytest.mark.postgres
@pytest.mark.parametrize("target_kind", ["sqlite", "postgres"])
def test_memory_stays_bounded_by_the_batch(
    target_kind: str, new_database: NewDatabase, engines: Callable[[str], Engine]
) -> None:
    """20,000 faces (20 MB of embeddings and base embeddings): the copy's Python allocations peak at a few
    batches' worth, not the gallery's."""
    faces = 20_000
    source_url = new_database("postgres")
    db.upgrade(source_url)
    data = random_embeddings(np.random.default_rng(0), faces)
    owners = np.arange(faces, dtype=np.int64) // 2
    with db.make_session_factory(engines(source_url)).begin() as session:
        bulk.copy_synthetic_gallery(session, embeddings=data, owners=owners, model_version=MODEL)
        session.execute(text("UPDATE faces SET base_embedding = embedding"))
    target_url = new_database(target_kind)
    tracemalloc.start()
    try:
        report = copy_gallery(source_url, target_url, batch_rows=1_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.faces == faces
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # one batch of all the faces: 36-48 MiB
