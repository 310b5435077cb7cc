"""Shared fixtures. Real photos come from FACEGATE_FACES_DIR (default ../shared/faces beside the checkout)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from app.config import DEFAULT_MODELS_DIR, REPO_ROOT, Settings

if TYPE_CHECKING:
    from tests.dev_embeddings import DevResults

FACES_DIR = Path(os.environ.get("FACEGATE_FACES_DIR", REPO_ROOT.parent / "shared" / "faces"))
MODELS_DIR = Path(os.environ.get("FACEGATE_MODELS_DIR", DEFAULT_MODELS_DIR))
POSTGRES_URL = os.environ.get("FACEGATE_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")


def _require(path: Path, what: str) -> Path:
    """Skip with a clear message when a data folder is absent; on CI (CI=true) its absence is a failure."""
    if not path.exists():
        message = f"{what} not found at {path} (set FACEGATE_FACES_DIR / FACEGATE_MODELS_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def dev_faces() -> Path:
    """54 people, mixed sources, with pairs.csv."""
    return _require(FACES_DIR / "dev", "the dev face set")


@pytest.fixture(scope="session")
def lfw_faces() -> Path:
    return _require(FACES_DIR / "lfw-dev", "the lfw-dev face set")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return _require(MODELS_DIR / "manifest.json", "built models (make models)").parent


@pytest.fixture
def settings(models_dir: Path, tmp_path: Path) -> Settings:
    """Settings for one test: real models, a fresh SQLite file, CPU provider."""
    return Settings(
        models_dir=models_dir,
        database_url=f"sqlite:///{tmp_path / 'gallery.db'}",
        runtime={"providers": ["CPUExecutionProvider"]},
    )


@pytest.fixture(scope="session")
def dev_results(request: pytest.FixtureRequest, dev_faces: Path, models_dir: Path) -> DevResults:
    """Every dev photo through facegate's models and dlib-bin's (tests/dev_embeddings.py), computed once per
    session and kept in pytest's cache folder under a key of everything the numbers depend on."""
    from tests.dev_embeddings import CACHE_FOLDER, load_or_compute

    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    return load_or_compute(dev_faces, models_dir, cache.mkdir(CACHE_FOLDER) if cache is not None else None)
