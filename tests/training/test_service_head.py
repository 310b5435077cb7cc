"""The service with a trained head: faces enrolled with the base, `facegate reindex`, then enrol / verify /
identify through HTTP with the head active (its version in every stored embedding, its threshold used)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from typer.testing import CliRunner

from app.cli import cli
from app.gallery.tables import Face
from app.training import EmbeddingSet, TrainConfig, register_head, split_identities, train_head
from app.vision.models import load_manifest
from tests.api.conftest import api_settings, running

pytestmark = pytest.mark.model

AMY = ["bbt_amy/face-api__amy1.png", "bbt_amy/face-api__amy2.png"]
RAJ = ["bbt_raj/face-api__raj1.png", "bbt_raj/face-api__raj2.png"]


def _upload(dev_faces: Path, relative: str) -> dict[str, tuple[str, bytes, str]]:
    return {"image": (Path(relative).name, (dev_faces / relative).read_bytes(), "image/png")}


def test_enrol_reindex_then_serve_with_a_head(
    models_dir: Path, dev_faces: Path, dev_embeddings: EmbeddingSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_version = load_manifest(models_dir, verify=False).model_version
    heads = tmp_path / "heads"
    train, val = split_identities(dev_embeddings, val_fraction=0.3, seed=0)
    result = train_head(train, val, TrainConfig(epochs=2, patience=2, p=8, k=4, lr=3e-4, seed=0))
    assert 0.05 < result.threshold < 0.36  # unit-sphere distances: smaller than dlib's
    register_head(result, name="office", heads_dir=heads, base_model_version=base_version, opset=17)
    head_version = json.loads((heads / "office" / "head.json").read_text())["version"]
    url = f"sqlite:///{tmp_path / 'gallery.db'}"

    # 1. enrolled while the base is served
    with running(api_settings(models_dir, url)) as client:
        r = client.post("/enroll", files=_upload(dev_faces, AMY[0]), data={"name": "Amy", "allow_low_quality": "true"})
        assert r.status_code == 201, r.text
        amy = r.json()["identity_id"]
        assert r.json()["model_version"] == base_version

    # 2. the head is switched on and the gallery recomputed from the stored base embeddings
    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("FACEGATE_DATABASE_URL", url)
    monkeypatch.setenv("FACEGATE_HEAD__NAME", "office")
    monkeypatch.setenv("FACEGATE_HEAD__DIR", str(heads))
    outcome = CliRunner().invoke(cli, ["reindex"])
    assert outcome.exit_code == 0, outcome.output
    assert "1 faces recomputed" in outcome.output
    assert "0 left stale" in outcome.output and "enrol them again" not in outcome.output  # no remedy for nothing

    # 3. served with the head: the old face is searchable, new faces carry the head's version and a base embedding
    settings = api_settings(models_dir, url, head={"name": "office", "dir": heads})
    with running(settings) as client:
        ready = client.get("/readyz").json()
        assert head_version in json.dumps(ready)
        r = client.post("/enroll", files=_upload(dev_faces, RAJ[0]), data={"name": "Raj", "allow_low_quality": "true"})
        assert r.status_code == 201, r.text
        raj = r.json()["identity_id"]
        assert r.json()["model_version"] == f"{base_version}+{head_version}"

        r = client.post("/verify", files=_upload(dev_faces, AMY[1]), data={"identity_id": amy})
        assert r.status_code == 200, r.text
        assert r.json()["threshold"] == pytest.approx(result.threshold)  # the head's, FACEGATE_THRESHOLD unset
        assert r.json()["match"] is True
        assert r.json()["far_estimate"] is None  # the shipped FAR table is the base's

        for photo, expected in ((AMY[1], amy), (RAJ[1], raj)):
            r = client.post("/identify", files=_upload(dev_faces, photo))
            assert r.status_code == 200, r.text
            assert r.json()["faces"][0]["candidates"][0]["identity_id"] == expected

        assert client.get("/calibration").json()["threshold"] == pytest.approx(result.threshold)
    # an explicit FACEGATE_THRESHOLD still wins over the head's own
    explicit = api_settings(models_dir, url, head={"name": "office", "dir": heads}, threshold=0.3)
    with running(explicit) as client:
        assert client.get("/calibration").json()["threshold"] == pytest.approx(0.3)

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(Face.model_version, Face.base_embedding)).all()
    finally:
        engine.dispose()
    assert {row.model_version for row in rows} == {f"{base_version}+{head_version}"}
    assert all(row.base_embedding is not None and len(row.base_embedding) == 512 for row in rows)
