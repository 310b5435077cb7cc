"""GET /admin/index: the answering worker's index after replaying the change log (used by tests/system/ to check
that every uvicorn worker agrees with the database)."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.gallery import Gallery, face_ids_digest
from app.vision.types import Box

pytestmark = pytest.mark.model

Photo = Callable[[str], tuple[str, bytes, str]]


def test_index_state_follows_enrolments_and_other_workers(client: TestClient, settings: Settings, photo: Photo) -> None:
    empty = client.get("/admin/index")
    assert empty.status_code == 200
    body = empty.json()
    assert set(body) == {"pid", "model_version", "size", "identities", "stale", "last_change_id", "face_ids_sha256"}
    assert (body["pid"], body["size"], body["identities"], body["last_change_id"]) == (os.getpid(), 0, 0, 0)
    assert body["face_ids_sha256"] == face_ids_digest([])

    enrolled = client.post("/enroll", files={"image": photo("bbt_amy/face-api__amy1.png")}, data={"name": "Amy"})
    assert enrolled.status_code == 201, enrolled.text
    mine = enrolled.json()["face_id"]

    # Another process (a second worker) writes to the same database: the endpoint replays it before answering.
    other = Gallery.open(settings.database_url, body["model_version"])
    try:
        theirs = other.enroll_face(
            embedding=np.full(128, 0.05, np.float32), box=Box(0, 0, 9, 9), score=1.0, name="Other worker"
        ).face.id
    finally:
        other.close()
    state = client.get("/admin/index").json()
    assert (state["size"], state["identities"], state["last_change_id"]) == (2, 2, 2)
    assert state["face_ids_sha256"] == face_ids_digest([mine, theirs])
