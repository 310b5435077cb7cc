"""FACEGATE_EMBEDDING__FLIP: each face's embedding averaged with its mirror image's, served end to end with its own
model version, FAR table and open-set calibration (app/matching/data/flip/)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.matching.calibration import load_default_table
from app.matching.data_files import OPENSET_FILE, TABLE_FILE, data_dir
from app.matching.openset import load_default_model
from app.vision.align import face_chips
from app.vision.decode import load_image
from app.vision.pipeline import Pipeline
from tests.api.conftest import api_settings, running

PhotoFn = Callable[[str], tuple[str, bytes, str]]
ENROL = "alex_lacamoire/face_recognition__alex_lacamoire1.jpg"
SAME = "alex_lacamoire/face_recognition__img1.jpg"


@pytest.fixture(scope="module")
def flip_client(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("flip") / "gallery.db"
    with running(api_settings(models_dir, f"sqlite:///{db}", embedding={"flip": True})) as client:
        yield client


def test_embedding_is_the_mean_of_the_face_and_its_mirror_image(models_dir: Path, dev_faces: Path) -> None:
    plain = Pipeline.from_settings(Settings(models_dir=models_dir, runtime={"providers": ["CPUExecutionProvider"]}))
    flip = Pipeline.from_settings(
        Settings(models_dir=models_dir, runtime={"providers": ["CPUExecutionProvider"]}, embedding={"flip": True})
    )
    try:
        image = load_image(dev_faces / ENROL, max_pixels=40_000_000)
        (face,) = flip.find_faces(image)
        (reference,) = plain.find_faces(image)
        assert face.box == reference.box and np.array_equal(face.landmarks, reference.landmarks)
        work, (detection,) = plain.detect(image)  # the chip is cut from the working copy the models see
        chip = face_chips(work.pixels, [plain.landmarks.predict(work.pixels, detection.box)])
        mirrored = np.ascontiguousarray(chip[:, :, ::-1])
        expected = (plain.embedder.embed(chip)[0] + plain.embedder.embed(mirrored)[0]) / 2
        assert np.abs(face.embedding - expected).max() < 1e-5
        assert np.abs(face.embedding - reference.embedding).max() > 1e-3  # the mirror image really counts
        assert flip.model_version == f"{plain.model_version}+flip"
        assert flip.embedding_name == f"{plain.manifest.model_name}+flip"
    finally:
        plain.close()
        flip.close()


def test_each_variant_ships_calibrations_made_for_it() -> None:
    for flip, name in ((False, "dlib-resnet-v1"), (True, "dlib-resnet-v1+flip")):
        assert load_default_table(data_dir(flip) / TABLE_FILE).model_version == name
        assert load_default_model(data_dir(flip) / OPENSET_FILE).meta["model_name"] == name
    plain, mirrored = (load_default_table(data_dir(f) / TABLE_FILE) for f in (False, True))
    assert mirrored.far_at(0.36) > plain.far_at(0.36)  # averaged embeddings sit closer: more FAR at one threshold


def test_served_end_to_end_with_its_own_version_and_far(flip_client: TestClient, photo: PhotoFn) -> None:
    ready = flip_client.get("/readyz").json()
    assert ready["model_version"].endswith("+flip")
    enrolled = flip_client.post("/enroll", files={"image": photo(ENROL)}, data={"name": "Alex"})
    assert enrolled.status_code == 201, enrolled.text
    identity = enrolled.json()["identity_id"]
    verified = flip_client.post("/verify", files={"image": photo(SAME)}, data={"identity_id": identity}).json()
    assert verified["match"] is True
    table = load_default_table(data_dir(True) / TABLE_FILE)
    assert verified["far_estimate"] == pytest.approx(table.far_at(verified["threshold"]))
    found = flip_client.post("/identify", files={"image": photo(SAME)}).json()
    assert found["faces"][0]["match"]["identity_id"] == identity


def test_a_plain_gallery_is_stale_under_flip(models_dir: Path, tmp_path: Path, photo: PhotoFn) -> None:
    """Turning the setting on never mixes the two kinds of embeddings: faces enrolled without it are stale."""
    url = f"sqlite:///{tmp_path / 'gallery.db'}"
    with running(api_settings(models_dir, url)) as plain:
        assert plain.post("/enroll", files={"image": photo(ENROL)}, data={"name": "Alex"}).status_code == 201
    with running(api_settings(models_dir, url, embedding={"flip": True})) as flip:
        ready = flip.get("/readyz").json()
        assert ready["stale_faces"] == 1 and ready["gallery_size"] == 0
        assert flip.post("/identify", files={"image": photo(SAME)}).json()["faces"][0]["match"] is None


def test_a_threshold_calibrated_on_plain_distances_is_not_applied_to_flip(models_dir: Path, tmp_path: Path) -> None:
    """A deployment threshold belongs to the distance scale it was calibrated on; another build of the same scale
    keeps it."""
    url = f"sqlite:///{tmp_path / 'gallery.db'}"
    # 10 different pairs (applying needs 1/FAR), of which one may be accepted: the threshold sits under 0.05
    body = {"source": "pairs", "same": [0.01], "different": [0.04, 0.05] + [0.9] * 8, "target_far": 0.1, "apply": True}
    with running(api_settings(models_dir, url)) as plain:
        applied = plain.post("/calibrate", json=body)
        assert applied.status_code == 200, applied.text
        assert plain.get("/calibration").json()["threshold_source"] == "deployment"
    with running(api_settings(models_dir, url, embedding={"flip": True})) as flip:
        status = flip.get("/calibration").json()
        assert status["threshold_source"] == "settings" and status["threshold"] == 0.36
    with running(api_settings(models_dir, url)) as plain_again:
        assert plain_again.get("/calibration").json()["threshold_source"] == "deployment"
