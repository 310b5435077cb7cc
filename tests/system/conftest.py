"""System tests: the real server (uvicorn, several worker processes) on a real database, driven over HTTP.

They start `uvicorn --factory app.main:create_app --workers 2` as a subprocess (tests/system/live.py) and judge the
outcome by reading the database directly (tests/system/consistency.py) and every worker's `GET /admin/index`.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

# PostgreSQL fixtures of the gallery tests (a fresh schema per test; skip or, on CI, fail when unreachable).
from tests.gallery.conftest import pg_schema_url, postgres_server  # noqa: F401

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}


@pytest.fixture(scope="session")
def lfw_photos(lfw_faces: Path) -> list[Path]:
    """Every LFW photo (150x150: cheap to detect), in a fixed shuffled order, so that consecutive enrolments are of
    different people; each test uses each photo at most once, so an enrolled photo finds only its own identity."""
    photos = sorted(p for p in lfw_faces.glob("*/*") if p.suffix.lower() in PHOTO_SUFFIXES)
    assert len(photos) >= 1000, "lfw-dev should have ~2100 photos"
    random.Random(6).shuffle(photos)
    return photos
