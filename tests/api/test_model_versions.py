"""Which stored faces the service searches: its own model version's, plus earlier builds' of the same plain
embeddings (the manifest's `earlier_versions`), never another scale's."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from app.gallery import Gallery
from app.vision.models import load_manifest
from app.vision.types import Box
from tests.api.conftest import api_settings, running

CONVERTER_2 = "dlib-resnet-v1+onnx2-5d326777ddf3"  # what the service stored before converter version 3


def _store_face(url: str, version: str) -> None:
    gallery = Gallery.open(url, version)
    try:
        vector = np.random.default_rng(0).normal(size=128).astype(np.float32)
        gallery.enroll_face(embedding=0.1 * vector, box=Box(0, 0, 9, 9), score=1.0, name="enrolled before")
    finally:
        gallery.close()


def test_the_manifest_lists_the_earlier_builds(models_dir: Path) -> None:
    manifest = load_manifest(models_dir)
    assert CONVERTER_2 in manifest.earlier_versions and manifest.model_version not in manifest.earlier_versions


def test_faces_of_an_earlier_build_stay_searchable(models_dir: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gallery.db'}"
    _store_face(url, CONVERTER_2)
    with running(api_settings(models_dir, url, embedding={"flip": True})) as flip:
        ready = flip.get("/readyz").json()
        assert (ready["gallery_size"], ready["stale_faces"]) == (0, 1)  # mirror-averaged: another scale
    with running(api_settings(models_dir, url)) as client:
        ready = client.get("/readyz").json()
        assert (ready["gallery_size"], ready["stale_faces"]) == (1, 0)


def test_faces_of_an_unknown_version_are_stale(
    models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stale faces are not searched: the start says so at WARNING, with what to do (it was an INFO count only)."""
    url = f"sqlite:///{tmp_path / 'gallery.db'}"
    _store_face(url, "some-other-model-v9")
    caplog.set_level(logging.WARNING, logger="app.service")
    with running(api_settings(models_dir, url)) as client:
        ready = client.get("/readyz").json()
        assert (ready["gallery_size"], ready["stale_faces"]) == (0, 1)
    warnings = [r.getMessage() for r in caplog.records if r.name == "app.service" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("1 stored faces were made by another model version than")
    assert "are not searched (0 are): run `facegate reindex`" in warnings[0]
    caplog.clear()
    own = f"sqlite:///{tmp_path / 'own.db'}"
    _store_face(own, load_manifest(models_dir).model_version)  # this version's face: searched, no warning
    with running(api_settings(models_dir, own)) as client:
        assert client.get("/readyz").json()["gallery_size"] == 1
    assert not [r for r in caplog.records if r.name == "app.service" and r.levelno >= logging.WARNING]


def test_mirror_averaged_faces_of_an_earlier_build_stay_searchable(models_dir: Path, tmp_path: Path) -> None:
    """An earlier build's mirror-averaged faces are the same numbers as this build's: with FACEGATE_EMBEDDING__FLIP on
    they were stale for good (and `facegate reindex` left them so: "enrol them again"); plain, they stay stale."""
    url = f"sqlite:///{tmp_path / 'gallery.db'}"
    _store_face(url, f"{CONVERTER_2}+flip")
    with running(api_settings(models_dir, url)) as client:
        ready = client.get("/readyz").json()
        assert (ready["gallery_size"], ready["stale_faces"]) == (0, 1)  # plain: another scale
    with running(api_settings(models_dir, url, embedding={"flip": True})) as flip:
        ready = flip.get("/readyz").json()
        assert (ready["gallery_size"], ready["stale_faces"]) == (1, 0)
