"""The service on the pgvector backend, end to end: real photos through the real model, a gallery large enough that
the nearest faces are found inside PostgreSQL (more faces than index.candidates), and a deletion that leaves the
server's vector table before DELETE answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.gallery import Gallery, synthetic
from tests.api.conftest import api_settings, running
from tests.gallery.test_pgvector import pgvector_server, pgvector_url, stored_vector_faces  # noqa: F401

pytestmark = [pytest.mark.model, pytest.mark.pgvector]

CANDIDATES = 16
SYNTHETIC_PEOPLE = 60  # within what a search applies to the table itself (pgvector.INLINE_CHANGES)


def _largest_face(body: dict[str, Any]) -> dict[str, Any]:
    def area(face: dict[str, Any]) -> int:
        box = face["face"]["box"]
        return int((box["right"] - box["left"]) * (box["bottom"] - box["top"]))

    return max(body["faces"], key=area)


def test_identify_and_delete_through_pgvector(models_dir: Path, dev_faces: Path, pgvector_url: str) -> None:  # noqa: F811
    sharon = sorted((dev_faces / "ariel_sharon").glob("*.jpg"))
    settings = api_settings(models_dir, pgvector_url, index={"backend": "pgvector", "candidates": CANDIDATES})
    with running(settings) as client:
        ready = client.get("/readyz").json()
        assert ready["ready"], ready
        enrolled = client.post("/enroll", files={"image": (sharon[0].name, sharon[0].read_bytes())}, data={"name": "Sharon"})
        assert enrolled.status_code == 201, enrolled.text
        sharon_id, sharon_face = enrolled.json()["identity_id"], enrolled.json()["face_id"]
        # Strangers enough that a search goes to PostgreSQL (the in-memory exact search answers up to `candidates`).
        seeded = synthetic.gallery(SYNTHETIC_PEOPLE, faces_per_identity=1, seed=81)
        other_worker = Gallery.open(pgvector_url, ready["model_version"])
        try:
            others = other_worker.bulk_enrol(names=[f"s{i}" for i in range(SYNTHETIC_PEOPLE)], embeddings=seeded.embeddings)
        finally:
            other_worker.close()

        found = client.post("/identify", files={"image": (sharon[3].name, sharon[3].read_bytes())})
        assert found.status_code == 200, found.text
        match = _largest_face(found.json())["match"]
        assert match is not None and (match["identity_id"], match["name"]) == (sharon_id, "Sharon")
        # The search mirrored the other worker's faces into PostgreSQL before it ran there.
        assert stored_vector_faces(pgvector_url) == {sharon_face} | {r.id for r in others}

        assert client.delete(f"/identities/{sharon_id}").status_code == 200
        assert sharon_face not in stored_vector_faces(pgvector_url)  # gone before DELETE answered, not at the next search
        after = client.post("/identify", files={"image": (sharon[3].name, sharon[3].read_bytes())})
        assert after.status_code == 200, after.text
        assert _largest_face(after.json())["match"] is None
