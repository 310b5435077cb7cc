"""Migrations: from an empty database to head, idempotent, matching the tables, safe when workers start together."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from app.gallery import Gallery, SchemaOutOfDate, db, store
from app.gallery.tables import Base
from app.vision.types import Box
from tests.gallery.conftest import random_embeddings

TABLES = {"identities", "faces", "gallery_changes", "gallery_state", "deployment_settings", "alembic_version"}


def test_upgrade_from_empty_creates_the_tables_at_head(database_url: str) -> None:
    engine = db.make_engine(database_url)
    try:
        assert db.schema_revision(engine) is None
        assert not TABLES & set(inspect(engine).get_table_names())
        db.upgrade(engine)
        assert db.schema_revision(engine) == db.head_revision()
        assert TABLES <= set(inspect(engine).get_table_names())
        with engine.connect() as connection:
            assert connection.execute(text("SELECT id, last_change_id FROM gallery_state")).all() == [(1, 0)]
            # The database has exactly what the tables module declares (autogenerate finds nothing to do).
            assert (
                compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
                == []
            )
        checks = {c["name"] for c in inspect(engine).get_check_constraints("faces")}
        assert "ck_faces_embedding_size" in checks
    finally:
        engine.dispose()


def test_upgrade_is_idempotent_and_keeps_data(open_gallery: Callable[..., Gallery], database_url: str) -> None:
    gallery = open_gallery()
    enrolment = gallery.enroll_face(
        embedding=random_embeddings(np.random.default_rng(0), 1)[0], box=Box(0, 0, 9, 9), score=1.0, name="Ada"
    )
    db.upgrade(database_url)
    db.upgrade(gallery.engine)
    again = open_gallery()
    assert again.get_identity(enrolment.identity_id).faces[0].id == enrolment.face.id
    assert again.stats().size == 1
    with gallery.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1


def test_downgrade_to_base_and_back(database_url: str) -> None:
    engine = db.make_engine(database_url)
    try:
        db.upgrade(engine)
        config = db.alembic_config()
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        assert not (TABLES - {"alembic_version"}) & set(inspect(engine).get_table_names())
        db.upgrade(engine)
        assert db.schema_revision(engine) == db.head_revision()
    finally:
        engine.dispose()


def test_name_keys_are_filled_for_identities_stored_before_them(database_url: str) -> None:
    """0004 on a gallery with data: every existing name gets its key (the name filter finds it), no face is lost,
    and going back to 0003 and up again keeps every row."""
    engine = db.make_engine(database_url)
    try:
        db.upgrade(engine, "0003")
        now = datetime.now(UTC)
        names = ["ÉLODIE", "Straße", "plain"] + [f"P{i}" for i in range(25_000)]  # more than one batch
        identity_ids = [uuid.uuid4().hex for _ in names]
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO identities (id, name, metadata, created_at, updated_at)"
                    " VALUES (:id, :name, '{}', :now, :now)"
                ),
                [{"id": i, "name": n, "now": now} for i, n in zip(identity_ids, names, strict=True)],
            )
            connection.execute(
                text(
                    "INSERT INTO faces (id, identity_id, embedding, model_version, box_left, box_top, box_right,"
                    " box_bottom, detector_score, created_at) VALUES (:id, :identity, :embedding, 'm', 0, 0, 9, 9, 1,"
                    " :now)"
                ),
                {"id": uuid.uuid4().hex, "identity": identity_ids[0], "embedding": bytes(512), "now": now},
            )
        for _ in range(2):
            db.upgrade(engine)
            sessions = db.make_session_factory(engine)
            with sessions.begin() as session:
                assert [r.name for r in store.list_identities(session, name_contains="élodie")[0]] == ["ÉLODIE"]
                assert [r.name for r in store.list_identities(session, name_contains="STRASSE")[0]] == ["Straße"]
                assert store.list_identities(session, name_contains="p24999")[1] == 1
                assert store.list_identities(session, limit=0)[1] == len(names)
                assert store.get_identity(session, identity_id=identity_ids[0]).face_count == 1
            config = db.alembic_config()
            with engine.begin() as connection:
                config.attributes["connection"] = connection
                command.downgrade(config, "0003")
            with engine.connect() as connection:
                assert "name_key" not in {c["name"] for c in inspect(connection).get_columns("identities")}
                assert connection.execute(text("SELECT count(*) FROM identities")).scalar_one() == len(names)
                assert connection.execute(text("SELECT count(*) FROM faces")).scalar_one() == 1
    finally:
        engine.dispose()


def test_identities_written_without_a_name_key_get_one_at_open(open_gallery: Callable[..., Gallery]) -> None:
    """A worker of a facegate from before 0004 still running through a rolling upgrade inserts identities without
    `name_key`: the server default left it '' and neither `identities_named` (enroll DIR's folder match) nor the name
    filter ever found them. The next start gives them theirs."""
    gallery = open_gallery()
    now = datetime.now(UTC)
    with gallery.engine.begin() as connection:  # what that facegate's create_identity writes
        connection.execute(
            text("INSERT INTO identities (id, name, metadata, created_at, updated_at) VALUES (:id, :n, '{}', :t, :t)"),
            {"id": uuid.uuid4().hex, "n": "Élodie Late", "t": now},
        )
    sessions = db.make_session_factory(open_gallery().engine)
    with sessions() as session:
        assert list(store.identities_named(session, name="élodie late").values()) == ["Élodie Late"]
        assert [r.name for r in store.list_identities(session, name_contains="ÉLODIE")[0]] == ["Élodie Late"]


def test_open_without_migrating_refuses_an_old_schema(open_gallery: Callable[..., Gallery]) -> None:
    with pytest.raises(SchemaOutOfDate):
        open_gallery(migrate=False)
    open_gallery()  # migrates
    assert open_gallery(migrate=False).stats().size == 0


_WORKER = """
import os, sys, time
from app.gallery import db
url, ready, go = sys.argv[1], sys.argv[2], sys.argv[3]
engine = db.make_engine(url)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
db.upgrade(engine)
"""


def test_workers_starting_together_migrate_once(database_url: str, tmp_path: Path) -> None:
    """Two worker processes run the upgrade at the same moment: the lock (PostgreSQL advisory lock, SQLite
    BEGIN IMMEDIATE) makes one wait, and it then finds the schema at head. (Without the lock this fails about
    every other time: 'table already exists' or a duplicate alembic_version row.)"""
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, database_url, str(flag), str(go)], stderr=subprocess.PIPE, text=True
        )
        for flag in ready
    ]
    deadline = time.monotonic() + 60
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        if any(worker.poll() is not None for worker in workers):
            break  # one died while importing: its error is reported below
        time.sleep(0.01)
    go.touch()
    results = [(worker.wait(timeout=60), worker.stderr.read() if worker.stderr else "") for worker in workers]
    assert [code for code, _ in results] == [0, 0], results
    engine = db.make_engine(database_url)
    try:
        assert db.schema_revision(engine) == db.head_revision()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM gallery_state")).scalar_one() == 1
            assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
    finally:
        engine.dispose()


def test_threads_of_one_process_migrate_one_after_the_other(database_url: str) -> None:
    engines = [db.make_engine(database_url) for _ in range(2)]
    barrier = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def start(engine_index: int) -> None:
        try:
            barrier.wait(timeout=10)
            db.upgrade(engines[engine_index])
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(engines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert errors == []
        assert db.schema_revision(engines[0]) == db.head_revision()
    finally:
        for engine in engines:
            engine.dispose()


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == db.SQLITE_BUSY_TIMEOUT_MS
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar_one() == 2  # FULL
    finally:
        engine.dispose()
    for lock_timeout, busy_ms in ((2.5, 2500), (0, 2**31 - 1)):  # the service's engine: its lock timeout
        engine = db.make_engine(f"sqlite:///{tmp_path / 'g.db'}", lock_timeout=lock_timeout)
        try:
            db.upgrade(engine)  # the migrations' own wait is lifted for their transaction only
            with engine.connect() as connection:
                assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == busy_ms
        finally:
            engine.dispose()
    assert db.sqlite_path(f"sqlite:///{tmp_path / 'g.db'}") == tmp_path / "g.db"
    assert db.sqlite_path("postgresql+psycopg://u@h/d") is None
