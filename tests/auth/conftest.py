"""Auth fixtures: the gallery tests' databases (SQLite file and PostgreSQL schema) and sessions on them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
from sqlalchemy.orm import Session

from app.gallery import db

# The API tests' app fixtures (real models, fresh SQLite gallery) and photo loader.
from tests.api.conftest import client, photo  # noqa: F401

# An empty database per test: SQLite, and PostgreSQL (marked `postgres`); see tests/gallery/conftest.py.
from tests.gallery.conftest import database_url, pg_schema_url, postgres_server  # noqa: F401

Sessions = Callable[[], AbstractContextManager[Session]]


@pytest.fixture
def sessions(database_url: str) -> Iterator[Sessions]:  # noqa: F811
    """`sessions()` opens one transaction on the migrated test database (committed when the block ends)."""
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    factory = db.make_session_factory(engine)

    @contextmanager
    def transaction() -> Iterator[Session]:
        with factory() as session, session.begin():
            yield session

    yield transaction
    engine.dispose()
