"""POST /cluster on real photos: three people, three photos each, plus photos that give no face."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.api.conftest import api_settings, error_of, running

pytestmark = pytest.mark.model

Photo = Callable[[str], tuple[str, bytes, str]]

# Three people from three sources (TV stills, LFW crops): photo name -> person.
PEOPLE = {
    "bbt_amy/face-api__amy1.png": "amy",
    "bbt_amy/face-api__amy2.png": "amy",
    "bbt_amy/face-api__amy4.png": "amy",
    "george_w_bush/krasserm__George_W_Bush_0001.jpg": "bush",
    "george_w_bush/krasserm__George_W_Bush_0002.jpg": "bush",
    "george_w_bush/krasserm__George_W_Bush_0003.jpg": "bush",
    "bbt_raj/face-api__raj1.png": "raj",
    "bbt_raj/face-api__raj2.png": "raj",
    "bbt_raj/face-api__raj3.png": "raj",
}


def _blank() -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(buffer, format="PNG")
    return "blank.png", buffer.getvalue(), "image/png"


def test_three_people_give_three_clusters(shared_client: TestClient, photo: Photo) -> None:
    names = list(PEOPLE)
    order = [names[i] for i in (0, 3, 6, 1, 4, 7, 2, 5, 8)]  # interleaved: clusters do not follow upload order
    files = [("images", photo(n)) for n in order]
    files.insert(4, ("images", _blank()))
    files.append(("images", ("notes.jpg", b"not a photo", "image/jpeg")))
    files.append(("images", ("empty.jpg", b"", "image/jpeg")))
    r = shared_client.post("/cluster", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n_photos"] == 12 and body["n_faces"] == 9
    assert body["threshold"] == pytest.approx(0.25) and body["threshold_source"] == "settings"
    assert body["sizes"] == [3, 3, 3] and [c["size"] for c in body["clusters"]] == [3, 3, 3]
    assert body["unclustered"] == []
    by_upload = [f[1][0] for f in files]
    groups = []
    for cluster in body["clusters"]:
        people = set()
        for m in cluster["members"]:
            assert by_upload[m["photo_index"]] == m["photo"]
            people.add(PEOPLE[next(n for n in PEOPLE if n.endswith(m["photo"]))])
            box = m["box"]
            assert box["right"] > box["left"] and box["bottom"] > box["top"] and m["score"] > 0
        assert len(people) == 1, cluster
        groups.append(people.pop())
    assert sorted(groups) == ["amy", "bush", "raj"]
    problems = {p["photo"]: p["code"] for p in body["problems"]}
    assert problems == {"blank.png": "no_face", "notes.jpg": "invalid_image", "empty.jpg": "invalid_image"}
    assert [p["photo_index"] for p in body["problems"]] == [4, 10, 11]


def test_a_tiny_threshold_leaves_every_face_alone(shared_client: TestClient, photo: Photo) -> None:
    files = [("images", photo(n)) for n in list(PEOPLE)[:3]]
    r = shared_client.post("/cluster", files=files, data={"threshold": "0.01"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["clusters"] == [] and len(body["unclustered"]) == 3
    assert body["threshold_source"] == "request"


def test_photo_count_limit(models_dir: Path, tmp_path: Path, photo: Photo) -> None:
    settings = api_settings(models_dir, f"sqlite:///{tmp_path / 'g.db'}", cluster={"max_photos": 2})
    with running(settings) as client:
        files = [("images", photo(n)) for n in list(PEOPLE)[:3]]
        error = error_of(client.post("/cluster", files=files), 422, "invalid_request")
        assert error["details"]["limit"] == 2
        error_of(client.post("/cluster", data={"threshold": "0.3"}), 422, "invalid_request")
        error_of(client.post("/cluster", files=files[:2], data={"tolerance": "0.3"}), 422, "invalid_request")


def test_a_graph_of_too_many_links_is_refused_before_it_is_built(
    shared_client: TestClient, photo: Photo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Faces that all match each other make n^2 links (10,000 faces: 800 MB): a request is refused past
    CLUSTER_MAX_LINKS, here lowered so that three photos of Amy (3 x 3 links, self-links included) pass it."""
    monkeypatch.setattr("app.service.CLUSTER_MAX_LINKS", 8)
    files = [("images", photo(n)) for n in list(PEOPLE)[:3]]
    error = error_of(shared_client.post("/cluster", files=files), 422, "invalid_request")
    assert error["message"].startswith("the 3 faces of these photos match each other in more than 8 pairs")
    assert error["details"] == {"field": "images", "faces": 3, "max_links": 8}
    monkeypatch.setattr("app.service.CLUSTER_MAX_LINKS", 9)
    r = shared_client.post("/cluster", files=files)
    assert r.status_code == 200 and r.json()["sizes"] == [3], r.text
