"""Gallery fixtures: every database test runs on SQLite (a fresh file) and on PostgreSQL (a fresh schema).

PostgreSQL variants are marked `postgres`. When the server is unreachable they fail on CI (CI set) and skip
elsewhere.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import psycopg
import pytest
from sqlalchemy.engine import make_url

from app.gallery import Gallery
from tests.conftest import POSTGRES_URL

MODEL = "test-model-1"


def _pg_conninfo() -> str:
    url = make_url(POSTGRES_URL).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The server's plain conninfo; fails (CI) or skips (elsewhere) when it cannot be reached."""
    conninfo = _pg_conninfo()
    try:
        with psycopg.connect(conninfo, connect_timeout=5) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as error:
        message = f"PostgreSQL at {POSTGRES_URL} unreachable: {error}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return conninfo


@pytest.fixture
def pg_schema_url(postgres_server: str) -> Iterator[str]:
    """A SQLAlchemy URL whose connections use a fresh schema (dropped afterwards)."""
    schema = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_server, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gallery.db'}"
    url: str = request.getfixturevalue("pg_schema_url")
    return url


@pytest.fixture
def open_gallery(database_url: str) -> Iterator[Callable[..., Gallery]]:
    """Opens Gallery objects on the test's database (each one like a separate worker); closes them afterwards."""
    opened: list[Gallery] = []

    def _open(model_version: str = MODEL, *, migrate: bool = True) -> Gallery:
        gallery = Gallery.open(database_url, model_version, migrate=migrate)
        opened.append(gallery)
        return gallery

    yield _open
    for gallery in opened:
        gallery.close()


@pytest.fixture
def gallery(open_gallery: Callable[..., Gallery]) -> Gallery:
    return open_gallery()


def random_embeddings(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    """Embeddings on dlib's scale (each coordinate ~ 0.09, squared norms ~ 1)."""
    return (rng.normal(size=(n, 128)) * 0.09).astype(np.float32)
