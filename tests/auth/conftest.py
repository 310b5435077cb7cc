"""Auth fixtures: the gallery tests' databases (SQLite file and PostgreSQL schema) and sessions on them, and a
running app whose database holds a key of each scope."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.auth import Scope, store
from app.gallery import db

# The API tests' app fixtures (real models, fresh SQLite gallery) and photo loader.
from tests.api.conftest import api_settings, client, photo, running  # noqa: F401

# An empty database per test: SQLite, and PostgreSQL (marked `postgres`); see tests/gallery/conftest.py.
from tests.gallery.conftest import database_url, pg_schema_url, postgres_server  # noqa: F401

Sessions = Callable[[], AbstractContextManager[Session]]


@contextmanager
def sessions_on(url: str) -> Iterator[Sessions]:
    """`sessions()` opens one transaction on the database at `url`, migrated (committed when the block ends)."""
    db.upgrade(url)
    engine = db.make_engine(url)
    factory = db.make_session_factory(engine)

    @contextmanager
    def transaction() -> Iterator[Session]:
        with factory() as session, session.begin():
            yield session

    try:
        yield transaction
    finally:
        engine.dispose()


@pytest.fixture
def sessions(database_url: str) -> Iterator[Sessions]:  # noqa: F811
    """`sessions()` opens one transaction on the migrated test database (committed when the block ends)."""
    with sessions_on(database_url) as transaction:
        yield transaction


class Keyed:
    """A running app whose database holds one key per scope and one revoked key."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        with client.app.state.service.gallery.session() as session:  # type: ignore[attr-defined]
            self.keys = {s: store.create_key(session, name=f"{s.value} client", scope=s).key for s in Scope}
            revoked = store.create_key(session, name="gone", scope=Scope.admin)
            store.revoke_key(session, reference=revoked.record.prefix)
        self.revoked = revoked.key

    def headers(self, scope: Scope) -> dict[str, str]:
        return {"X-API-Key": self.keys[scope]}


@pytest.fixture(scope="module")
def keyed(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    """One such app per test module."""
    db = tmp_path_factory.mktemp("auth") / "gallery.db"
    # cache 0: a revocation in the test is seen by the very next request
    with running(api_settings(models_dir, f"sqlite:///{db}", auth={"cache_seconds": 0})) as client:
        yield Keyed(client)
