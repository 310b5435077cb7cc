"""FACEGATE_DETECTOR__MAX_FACES: a photo with more faces keeps its most confident ones, and every endpoint that
returns a photo's faces says how many the detector found. A real photo of three people (the dev set's group photo),
one app uncapped and one capped at 2 (and at 1 for the largest-face rule)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import api_settings, running

pytestmark = pytest.mark.model

Photo = Callable[[str], tuple[str, bytes, str]]
GROUP = "ariel_sharon/krasserm__Ariel_Sharon_0004.jpg"  # three faces (the main one and two bystanders)
AMY = "bbt_amy/face-api__amy1.png"


def capped_client(models_dir: Path, tmp: Path, max_faces: int) -> Iterator[TestClient]:
    with running(api_settings(models_dir, f"sqlite:///{tmp / 'gallery.db'}", detector={"max_faces": max_faces})) as c:
        yield c


@pytest.fixture(scope="module")
def uncapped(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from capped_client(models_dir, tmp_path_factory.mktemp("uncapped"), 100)


@pytest.fixture(scope="module")
def capped(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from capped_client(models_dir, tmp_path_factory.mktemp("capped"), 2)


def boxes(faces: list[dict[str, Any]]) -> list[dict[str, int]]:
    return [f["face"]["box"] if "face" in f else f["box"] for f in faces]


def test_identify_keeps_the_most_confident_faces(uncapped: TestClient, capped: TestClient, photo: Photo) -> None:
    whole = uncapped.post("/identify", files={"image": photo(GROUP)}).json()
    assert whole["faces_detected"] == len(whole["faces"]) == 3
    scores = [f["face"]["score"] for f in whole["faces"]]
    assert scores == sorted(scores, reverse=True)
    cut = capped.post("/identify", files={"image": photo(GROUP)})
    assert cut.status_code == 200, cut.text
    body = cut.json()
    assert body["faces_detected"] == 3 and len(body["faces"]) == 2
    assert boxes(body["faces"]) == boxes(whole["faces"])[:2]  # the two highest detector scores
    single = capped.post("/identify", files={"image": photo(AMY)}).json()
    assert single["faces_detected"] == len(single["faces"]) == 1


def test_embed_and_identify_batch_report_the_count_per_photo(capped: TestClient, photo: Photo) -> None:
    uploads = [("images", photo(GROUP)), ("images", photo(AMY))]
    embedded = capped.post("/embed", files=uploads).json()
    assert [(len(p["faces"]), p["faces_detected"]) for p in embedded["images"]] == [(2, 3), (1, 1)]
    assert embedded["n_faces"] == 3
    identified = capped.post("/identify/batch", files=uploads).json()
    results = [p["result"] for p in identified["images"]]
    assert [(len(r["faces"]), r["faces_detected"]) for r in results] == [(2, 3), (1, 1)]
    broken = capped.post("/embed", files=[("images", ("x.jpg", b"not a photo", "image/jpeg"))]).json()
    assert broken["images"][0]["faces_detected"] is None and broken["images"][0]["error"]["code"] == "invalid_image"


def test_cluster_names_the_capped_photo(capped: TestClient, photo: Photo) -> None:
    report = capped.post("/cluster", files=[("images", photo(AMY)), ("images", photo(GROUP))]).json()
    assert report["n_faces"] == 3
    problems = report["problems"]
    assert [(p["photo_index"], p["code"]) for p in problems] == [(1, "too_many_faces")]
    assert problems[0]["message"].startswith("3 faces were found; the 2 most confident were clustered")


def test_the_largest_face_is_chosen_among_all_detections(
    uncapped: TestClient, models_dir: Path, tmp_path: Path, photo: Photo
) -> None:
    """face=largest looks at every detection (only the chosen one is embedded): the cap does not change the face."""
    whole = uncapped.post("/identify", files={"image": photo(GROUP)}).json()
    areas = [(b["right"] - b["left"]) * (b["bottom"] - b["top"]) for b in boxes(whole["faces"])]
    assert areas.index(max(areas)) != 0  # the largest face is not the most confident: the cap of 1 would lose it
    for client in capped_client(models_dir, tmp_path, 1):
        enrolled = client.post("/enroll", files={"image": photo(GROUP)}, data={"name": "Ariel", "face": "largest"})
        assert enrolled.status_code == 201, enrolled.text
        assert enrolled.json()["face"]["box"] == boxes(whole["faces"])[areas.index(max(areas))]
