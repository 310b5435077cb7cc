"""POST /evaluate/identify: issue 9's open-set protocol on a live gallery gives the numbers `eval-identify` gives on
the folder the gallery was enrolled from.

The dev photos' embeddings (the session's `dev_results`: the real models, largest face per photo) are enrolled one
face at a time, person by person in file order, each person under their folder name; the endpoint's figures must
then equal `evaluate_embeddings` on the same photos (the folder protocol).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.config import Settings
from app.gallery import Gallery
from app.identify_eval import evaluate_embeddings
from app.vision.models import load_manifest
from app.vision.types import Box
from tests.api.conftest import api_settings, running
from tests.dev_embeddings import DevResults

pytestmark = [pytest.mark.model, pytest.mark.slow]


def _enrol(settings: Settings, photos: list[str], embeddings: np.ndarray) -> None:
    version = load_manifest(settings.models_dir, verify=False).model_version
    gallery = Gallery.open(settings.database_url, version, migrate=True)
    try:
        ids: dict[str, str] = {}
        for photo, embedding in zip(photos, embeddings, strict=True):
            person = photo.split("/", 1)[0]
            box = Box(0, 0, 99, 99)
            if person in ids:
                gallery.enroll_face(embedding=embedding, box=box, score=1.0, identity_id=ids[person])
            else:
                ids[person] = gallery.enroll_face(embedding=embedding, box=box, score=1.0, name=person).identity_id
    finally:
        gallery.close()


def test_live_gallery_gives_the_folder_protocol_numbers(
    dev_results: DevResults, models_dir: Path, tmp_path: Path
) -> None:
    largest = dev_results.largest("ours")
    photos = sorted(largest)
    embeddings = np.stack([largest[p] for p in photos]).astype(np.float32)
    settings = api_settings(models_dir, f"sqlite:///{tmp_path / 'gallery.db'}")
    _enrol(settings, photos, embeddings)
    expected = evaluate_embeddings(photos, embeddings, settings=settings)

    with running(settings) as client:
        r = client.post("/evaluate/identify")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n_faces"] == len(photos)
    assert body["n_identities"] == len({p.split("/", 1)[0] for p in photos})
    assert (body["n_enrolled"], body["n_probes"], body["n_strangers"]) == (
        expected.n_enrolled,
        expected.n_probes,
        expected.n_strangers,
    )
    assert body["rank1"] == pytest.approx(expected.rank1)
    got = {rule["rule"]: rule["dir_at_fpir"] for rule in body["rules"]}
    assert set(got) == set(expected.dir_at_fpir) == {"raw", "ratio", "facegate"}
    for rule, table in expected.dir_at_fpir.items():
        assert got[rule] == pytest.approx(table), rule
    default = expected.default_point
    assert body["default"]["fpir"] == pytest.approx(default["fpir"])
    assert body["default"]["dir"] == pytest.approx(default["dir"])
    assert body["default"]["gallery_size"] == default["gallery_size"] == expected.n_enrolled
    assert body["default"]["stranger_reasons"] == default["stranger_reasons"]
    lo, hi = body["default"]["fpir_interval"]
    assert lo <= body["default"]["fpir"] <= hi
    # the numbers the README quotes for dev: the facegate rule lets no stranger in at the default settings
    assert body["default"]["fpir"] <= 0.03


def test_the_threshold_in_force_is_the_one_evaluated(
    dev_results: DevResults, models_dir: Path, tmp_path: Path
) -> None:
    """With a calibrated deployment threshold stored, /identify uses it: so does the evaluation of its rule (it took
    FACEGATE_THRESHOLD before, and measured a rule /identify did not apply)."""
    largest = dev_results.largest("ours")
    photos = sorted(largest)
    embeddings = np.stack([largest[p] for p in photos]).astype(np.float32)
    settings = api_settings(models_dir, f"sqlite:///{tmp_path / 'gallery.db'}")
    _enrol(settings, photos, embeddings)
    version = load_manifest(settings.models_dir, verify=False).model_version
    gallery = Gallery.open(settings.database_url, version, migrate=True)
    try:
        gallery.set_setting("threshold", {"threshold": 0.25, "model_version": version}, source="test")
    finally:
        gallery.close()
    at_025 = evaluate_embeddings(photos, embeddings, settings=settings.model_copy(update={"threshold": 0.25}))
    at_setting = evaluate_embeddings(photos, embeddings, settings=settings)
    assert at_025.raw_threshold_point != at_setting.raw_threshold_point  # the two thresholds differ in effect

    with running(settings) as client:
        assert client.get("/calibration").json()["threshold"] == 0.25
        body = client.post("/evaluate/identify").json()
    assert body["raw_threshold_point"] == pytest.approx(at_025.raw_threshold_point)
    assert body["default"]["fpir"] == pytest.approx(at_025.default_point["fpir"])
    assert body["default"]["dir"] == pytest.approx(at_025.default_point["dir"])


def test_a_gallery_too_small_for_the_protocol_is_a_409(
    dev_results: DevResults, models_dir: Path, tmp_path: Path
) -> None:
    largest = dev_results.largest("ours")
    photos = sorted(largest)[:2]  # one person, two photos: no stranger
    settings = api_settings(models_dir, f"sqlite:///{tmp_path / 'gallery.db'}")
    _enrol(settings, photos, np.stack([largest[p] for p in photos]).astype(np.float32))
    with running(settings) as client:
        r = client.post("/evaluate/identify")
        before = client.get("/identities").json()["total"]
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "insufficient_data"
    message = r.json()["error"]["message"]
    assert "needs at least 3 identities: 2 enrolled (at even positions in name order)" in message
    assert message.endswith("this gallery gives 1 enrolled, 1 probes, 0 strangers")
    assert before == 1
