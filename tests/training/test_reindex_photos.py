"""`facegate reindex --from-photos`: after the embedder's variant changes (FACEGATE_EMBEDDING__FLIP), faces whose photo
was kept are embedded again from it, exactly as a new enrolment would be; faces without one stay stale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, select
from typer.testing import CliRunner

from app.cli import cli
from app.config import EmbeddingSettings
from app.gallery.tables import Face
from app.vision.decode import decode_image
from tests.api.conftest import api_settings, running

pytestmark = pytest.mark.model

AMY = "bbt_amy/face-api__amy1.png"
RAJ = "bbt_raj/face-api__raj1.png"


def _enrol(client: object, dev_faces: Path, relative: str, name: str) -> dict[str, str]:
    upload = {"image": (Path(relative).name, (dev_faces / relative).read_bytes(), "image/png")}
    r = client.post("/enroll", files=upload, data={"name": name, "allow_low_quality": "true"})  # type: ignore[attr-defined]
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_reindex_from_photos_after_the_variant_changes(
    models_dir: Path, dev_faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'gallery.db'}"
    with running(api_settings(models_dir, url, store_images=True)) as client:
        amy = _enrol(client, dev_faces, AMY, "Amy")
    with running(api_settings(models_dir, url)) as client:  # photos no longer kept
        raj = _enrol(client, dev_faces, RAJ, "Raj")
    plain_version = amy["model_version"]

    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("FACEGATE_DATABASE_URL", url)
    monkeypatch.setenv("FACEGATE_RUNTIME__PROVIDERS", '["CPUExecutionProvider"]')
    monkeypatch.setenv("FACEGATE_EMBEDDING__FLIP", "true")
    before = CliRunner().invoke(cli, ["identify", str(dev_faces / AMY)])  # nothing searchable until the reindex
    assert before.exit_code == 0, before.output
    stale = "gallery of 0 faces of 0 identities searched (2 more made by another model version: run `facegate reindex`)"
    assert stale in before.output
    plain = CliRunner().invoke(cli, ["reindex"])  # the stored plain numbers cannot serve the mirror-averaged model
    assert plain.exit_code == 1, plain.output
    assert "0 faces recomputed" in plain.output and "2 left stale" in plain.output
    assert "--from-photos uses stored photos: enrol them again" in plain.output
    outcome = CliRunner().invoke(cli, ["reindex", "--from-photos"])
    assert outcome.exit_code == 1, outcome.output  # Raj has no photo
    assert "1 faces recomputed" in outcome.output and "1 of them from their photos" in outcome.output
    assert "1 left stale" in outcome.output

    flip = api_settings(models_dir, url, embedding=EmbeddingSettings(flip=True))
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = {r.id: r for r in connection.execute(select(Face.id, Face.model_version, Face.embedding))}
    finally:
        engine.dispose()
    assert rows[amy["face_id"]].model_version == f"{plain_version}+flip"
    assert rows[raj["face_id"]].model_version == plain_version  # stale, not relabelled
    with running(flip) as client:
        # Amy's face now holds exactly what enrolling her photo in the mirror-averaged mode gives
        pipeline = client.app.state.service.pipeline  # type: ignore[attr-defined]
        want = pipeline.embed_photo(decode_image((dev_faces / AMY).read_bytes(), max_pixels=40_000_000)).embedding
        got = np.frombuffer(rows[amy["face_id"]].embedding, dtype="<f4")
        np.testing.assert_allclose(got, want, atol=1e-6)
        r = client.post(
            "/identify", files={"image": (Path(AMY).name, (dev_faces / AMY).read_bytes(), "image/png")}
        )
        assert r.status_code == 200, r.text
        assert r.json()["faces"][0]["match"]["identity_id"] == amy["identity_id"]
