"""What a client sees while the gallery database is away (a restart, a failover, a network cut) and after it is
back, for real: PostgreSQL is reached through a TCP proxy (tests/tcp_proxy.py) that the test cuts and restores.
Requests that need the database get 503 database_unavailable with Retry-After (one WARNING line each, no
traceback), the others go on, /readyz says why quickly, and the service recovers without a restart. SQLite locked
or out of space: 503 / 507."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text

from app.auth import Scope
from app.auth import store as key_store
from app.gallery import db
from tests.api.conftest import api_settings, error_of, running
from tests.tcp_proxy import proxied

Upload = tuple[str, bytes, str]


def _upload(path: Path) -> Upload:
    return path.name, path.read_bytes(), "image/png" if path.suffix.lower() == ".png" else "image/jpeg"


def _server_side(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("app.")]


@pytest.mark.model
@pytest.mark.postgres
def test_an_outage_is_a_503_and_the_service_recovers_by_itself(
    models_dir: Path,
    pg_schema_url: str,
    people: dict[str, list[Path]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(db, "CONNECT_RETRY_SECONDS", 0.0)  # the first request after the restore connects
    amy, amy_again = (_upload(p) for p in people["bbt_amy"][:2])
    # cache_seconds 0: whether API keys are on is read from the database by every request
    with proxied(pg_schema_url) as (proxy, url), running(
        api_settings(models_dir, url, auth={"cache_seconds": 0})
    ) as client:
        enrolled = client.post("/enroll", files={"image": amy}, data={"name": "Amy"})
        assert enrolled.status_code == 201, enrolled.text
        amy_id = enrolled.json()["identity_id"]
        proxy.cut()
        caplog.clear()
        caplog.set_level(logging.WARNING)
        needs_the_database: dict[str, Callable[[], Any]] = {
            "list": lambda: client.get("/identities"),
            "enrol": lambda: client.post(
                "/enroll", files={"image": amy_again}, data={"name": "Amy 2", "allow_duplicate": "true"}
            ),
            "identify": lambda: client.post("/identify", files={"image": amy_again}),
            "verify an identity": lambda: client.post("/verify", files={"image": amy_again}, data={"identity_id": amy_id}),
            "delete": lambda: client.delete(f"/identities/{amy_id}"),
        }
        for what, call in needs_the_database.items():
            r = call()
            error = error_of(r, 503, "database_unavailable")
            assert error["message"] == "the database cannot be reached; retry in a few seconds", what
            assert r.headers["retry-after"] == str(db.RETRY_AFTER_SECONDS), what
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert (ready.json()["database"], ready.json()["problems"]) == (False, ["database unreachable"])
        # What needs no database goes on: liveness, photo against photo (at the threshold as last read), /embed.
        assert client.get("/healthz").status_code == 200
        verified = client.post("/verify", files={"image_a": amy, "image_b": amy_again})
        assert verified.status_code == 200, verified.text
        assert (verified.json()["match"], verified.json()["threshold_source"]) == (True, "settings")
        embedded = client.post("/embed", files={"images": amy})
        assert embedded.status_code == 200 and embedded.json()["n_faces"] == 1, embedded.text
        logged = _server_side(caplog)
        assert not [r for r in logged if r.levelno >= logging.ERROR or r.exc_info], logged
        assert len(logged) <= len(needs_the_database) + 1  # a line per refused request, one for /readyz

        proxy.restore()
        assert client.get("/readyz").status_code == 200
        listed = client.get("/identities").json()["items"]
        assert [i["name"] for i in listed] == ["Amy"]  # the enrolment and deletion refused stored nothing
        identified = client.post("/identify", files={"image": amy_again}).json()
        assert identified["faces"][0]["match"]["identity_id"] == amy_id


@pytest.mark.model
@pytest.mark.postgres
def test_a_request_waiting_for_another_sessions_lock_is_a_503_after_the_lock_timeout(
    models_dir: Path, pg_schema_url: str, people: dict[str, list[Path]]
) -> None:
    """An operator's transaction holding the gallery's write lock (or `facegate reindex` holding it for minutes)
    held every enrolment, and a LOCK TABLE every read, for as long: now each gets the 503 after
    FACEGATE_DATABASE_LOCK_TIMEOUT, stores nothing, and the service answers as usual once the lock is released."""
    amy, amy_again = (_upload(p) for p in people["bbt_amy"][:2])
    operator = create_engine(pg_schema_url)
    with running(api_settings(models_dir, pg_schema_url, database_lock_timeout=0.3)) as client, operator.connect() as psql:
        enrolled = client.post("/enroll", files={"image": amy}, data={"name": "Amy"})
        assert enrolled.status_code == 201, enrolled.text
        amy_id = enrolled.json()["identity_id"]
        psql.execute(text("UPDATE gallery_state SET last_change_id = last_change_id"))  # its transaction stays open
        started = time.monotonic()
        refused = client.post("/enroll", files={"image": amy_again}, data={"identity_id": amy_id})
        error = error_of(refused, 503, "database_unavailable")
        assert time.monotonic() - started < 10
        assert error["message"].startswith("the database did not answer within 0.3 s: another session held a lock"), error
        assert refused.headers["retry-after"] == str(db.RETRY_AFTER_SECONDS)
        psql.execute(text("LOCK TABLE identities IN ACCESS EXCLUSIVE MODE"))
        error_of(client.get("/identities"), 503, "database_unavailable")
        psql.rollback()
        body = client.get(f"/identities/{amy_id}").json()
        assert len(body["faces"]) == 1  # the refused enrolment stored nothing
        added = client.post("/enroll", files={"image": amy_again}, data={"identity_id": amy_id})
        assert added.status_code == 201, added.text
    operator.dispose()


@pytest.mark.model
@pytest.mark.postgres
def test_a_statement_past_the_statement_timeout_is_a_503_and_nothing_is_half_written(
    models_dir: Path, pg_schema_url: str, people: dict[str, list[Path]]
) -> None:
    """A LOCK TABLE (an ALTER TABLE, a VACUUM FULL) held every enrolment and read for as long, when no lock timeout
    applies: FACEGATE_DATABASE_STATEMENT_TIMEOUT cuts each, 503 with Retry-After, the enrolment stored nothing (no
    identity without its face, nothing in the index), and the service answers as usual once the lock is gone."""
    amy, penny = _upload(people["bbt_amy"][0]), _upload(people["bbt_penny"][0])
    settings = api_settings(models_dir, pg_schema_url, database_lock_timeout=0, database_statement_timeout=1)
    operator = create_engine(pg_schema_url)
    with running(settings) as client, operator.connect() as psql:
        gallery = client.app.state.service.gallery  # type: ignore[attr-defined]
        enrolled = client.post("/enroll", files={"image": amy}, data={"name": "Amy"})
        assert enrolled.status_code == 201, enrolled.text
        psql.execute(text("LOCK TABLE identities IN ACCESS EXCLUSIVE MODE"))
        requests: dict[str, Callable[[], Any]] = {
            "enrol": lambda: client.post("/enroll", files={"image": penny}, data={"name": "Penny"}),
            "identify": lambda: client.post("/identify", files={"image": amy}),
            "list": lambda: client.get("/identities"),
        }
        for what, request in requests.items():
            started = time.monotonic()
            response = request()
            assert time.monotonic() - started < 15, what
            error = error_of(response, 503, "database_unavailable")
            assert response.headers["retry-after"] == str(db.RETRY_AFTER_SECONDS), what
            assert error["message"].startswith("the database did not answer within 1 s"), (what, error)
            assert error["details"] == {"retry_after_seconds": db.RETRY_AFTER_SECONDS}
        psql.rollback()
        assert psql.execute(text("SELECT count(*) FROM identities")).scalar_one() == 1
        assert psql.execute(text("SELECT count(*) FROM faces")).scalar_one() == 1
        assert gallery.stats().size == 1 and gallery.stats().identities == 1
        assert client.get("/identities").json()["total"] == 1
        added = client.post("/enroll", files={"image": penny}, data={"name": "Penny"})
        assert added.status_code == 201, added.text
        assert gallery.stats().size == 2
    operator.dispose()


@pytest.mark.postgres
def test_a_silent_database_is_answered_quickly(models_dir: Path, pg_schema_url: str) -> None:
    """A server that accepts connections and never answers held /readyz (and any request) for psycopg's default
    connect timeout, 130 s: longer than any healthcheck waits, with a worker's thread held all along."""
    with proxied(pg_schema_url) as (proxy, url), running(api_settings(models_dir, url, preload_models=False)) as client:
        proxy.silence()
        started = time.monotonic()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["problems"] == ["database unreachable"]
        assert time.monotonic() - started < 10
        started = time.monotonic()  # the next ones do not wait for the connect timeout again
        error_of(client.get("/identities"), 503, "database_unavailable")
        assert time.monotonic() - started < 1


@pytest.mark.postgres
def test_a_stalled_database_is_a_503_soon_after_the_statement_timeout(
    models_dir: Path, pg_schema_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that stalls whole keeps its connections up and answers nothing, not even its statement timeout: a
    request held its worker's thread for ever. It is a 503 with Retry-After soon after the statement timeout, and
    the service answers again once the server does."""
    monkeypatch.setattr(db, "STALL_GRACE_SECONDS", 0.5)
    monkeypatch.setattr(db, "CONNECT_RETRY_SECONDS", 0.0)
    with (
        proxied(pg_schema_url) as (proxy, url),
        running(api_settings(models_dir, url, preload_models=False, database_statement_timeout=1.0)) as client,
    ):
        assert client.get("/identities").status_code == 200
        proxy.freeze()
        started = time.monotonic()
        refused = client.get("/identities")
        assert time.monotonic() - started < 10  # the pooled connection's pre-ping (1.5 s), then a 3 s connect timeout
        error_of(refused, 503, "database_unavailable")
        assert refused.headers["retry-after"] == str(db.RETRY_AFTER_SECONDS)
        proxy.restore()
        assert client.get("/identities").status_code == 200


@pytest.mark.postgres
def test_readyz_answers_a_stalled_database_within_a_healthcheck(models_dir: Path, pg_schema_url: str) -> None:
    """A stalled server held /readyz for the statement timeout plus the stall grace (23 s by default), past the
    image's 5 s HEALTHCHECK timeout, with a thread held per probe."""
    with proxied(pg_schema_url) as (proxy, url), running(api_settings(models_dir, url, preload_models=False)) as client:
        assert client.get("/readyz").status_code == 200
        proxy.freeze()
        started = time.monotonic()
        ready = client.get("/readyz")
        assert time.monotonic() - started < 5
        assert ready.status_code == 503 and ready.json()["problems"] == ["database not answering"]
        proxy.restore()


@pytest.mark.postgres
def test_an_api_key_that_cannot_be_checked_is_a_503(
    models_dir: Path, pg_schema_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The key is checked before the app runs (app/api/auth.py): a database error there was a 500 with a logged
    traceback. A key this worker cannot check is not let in: 503, until the database is back."""
    monkeypatch.setattr(db, "CONNECT_RETRY_SECONDS", 0.0)
    with proxied(pg_schema_url) as (proxy, url), running(
        api_settings(models_dir, url, preload_models=False, auth={"cache_seconds": 0})
    ) as client:
        with client.app.state.service.gallery.session() as session:  # type: ignore[attr-defined]
            key = key_store.create_key(session, name="door", scope=Scope.write).key
        headers = {"X-API-Key": key}
        assert client.get("/identities", headers=headers).status_code == 200
        proxy.cut()
        caplog.set_level(logging.WARNING)
        error_of(client.get("/identities", headers=headers), 503, "database_unavailable")
        refused = client.post("/embed", headers=headers, files={"images": ("a.png", b"x" * 1000, "image/png")})
        error_of(refused, 503, "database_unavailable")
        assert refused.headers["retry-after"] == str(db.RETRY_AFTER_SECONDS)
        assert refused.headers["connection"] == "close"  # its upload is not read
        assert not [r for r in _server_side(caplog) if r.levelno >= logging.ERROR or r.exc_info]
        proxy.restore()
        assert client.get("/identities", headers=headers).status_code == 200


def test_sqlite_locked_is_a_503_and_out_of_space_a_507(models_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    settings = api_settings(models_dir, f"sqlite:///{path}", preload_models=False, database_lock_timeout=0.2)
    with running(settings) as client:
        gallery = client.app.state.service.gallery  # type: ignore[attr-defined]
        ada = gallery.create_identity(name="Ada")
        writer = sqlite3.connect(path, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            r = client.patch(f"/identities/{ada.id}", json={"name": "Bob"})
            writer.execute("ROLLBACK")
        finally:
            writer.close()
        assert "locked by another writer for 0.2 s" in error_of(r, 503, "database_unavailable")["message"]
        assert r.headers["retry-after"] == str(db.RETRY_AFTER_SECONDS)

        @event.listens_for(gallery.engine, "connect")
        def _full(dbapi_connection: Any, _record: Any) -> None:  # the file may not grow: SQLite's "disk is full"
            pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
            dbapi_connection.execute(f"PRAGMA max_page_count={pages}")

        gallery.engine.dispose()
        r = client.patch(f"/identities/{ada.id}", json={"metadata": {"notes": "x" * 60_000}})
        error_of(r, 507, "insufficient_storage")
        assert "retry-after" not in r.headers
        assert client.get(f"/identities/{ada.id}").json()["metadata"] == {}
