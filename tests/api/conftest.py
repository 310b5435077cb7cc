"""API fixtures: apps built with `create_app(settings)` on the real models, clients as context managers (so the
lifespan runs), and the dev photos grouped by person.

Photos cost ~0.2-1 s each through the model on CI's 2 cores, so read-only tests share one module-scoped app and
compute each photo once (see `test_identify.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

# PostgreSQL fixtures of the gallery tests (a fresh schema per test; skip or, on CI, fail when unreachable).
from tests.gallery.conftest import pg_schema_url, postgres_server  # noqa: F401

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}


def api_settings(models_dir: Path, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "models_dir": models_dir,
        "database_url": database_url,
        "runtime": {"providers": ["CPUExecutionProvider"]},
    }
    values.update(overrides)
    return Settings(**values)


@contextmanager
def running(settings: Settings) -> Iterator[TestClient]:
    """A client whose app has started (models loaded, gallery migrated, index built) and stops afterwards.
    Server errors come back as responses (500 JSON), as a real client would see them."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="session")
def people(dev_faces: Path) -> dict[str, list[Path]]:
    """person -> photos (sorted by file name), from the dev set's one-folder-per-person layout."""
    result = {}
    for folder in sorted(p for p in dev_faces.iterdir() if p.is_dir()):
        photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
        if photos:
            result[folder.name] = photos
    assert len(result) >= 50, "the dev set should have 54 people"
    return result


@pytest.fixture(scope="session")
def photo(dev_faces: Path) -> Callable[[str], tuple[str, bytes, str]]:
    """A dev photo as an upload tuple for `files=`: photo("bbt_amy/face-api__amy1.png")."""

    def _photo(relative: str) -> tuple[str, bytes, str]:
        path = dev_faces / relative
        kind = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
        return path.name, path.read_bytes(), kind

    return _photo


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A fresh app on the real models and an empty SQLite gallery (one per test)."""
    with running(settings) as c:
        yield c


@pytest.fixture(scope="module")
def shared_client(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app per test module, for tests that only add their own identities and never assume an empty gallery."""
    db = tmp_path_factory.mktemp("api") / "gallery.db"
    with running(api_settings(models_dir, f"sqlite:///{db}")) as c:
        yield c


def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    """Assert the response is the error JSON with this status and code; return the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert error["code"] == code, body
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) <= {"code", "message", "details"}
    return error
