"""Client side of the system tests: HTTP calls with real photos, and a ledger of what the server acknowledged."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2

# Every enrolment takes the photo's largest face, accepts any quality and lets a lookalike through: the tests are
# about storage, so every photo with a face must become a row.
ENROL_FORM = {"face": "largest", "allow_low_quality": "true", "allow_duplicate": "true"}
CLIENT_TIMEOUT_S = 120.0


def upload(photo: Path) -> dict[str, tuple[str, bytes, str]]:
    return {"image": (photo.name, photo.read_bytes(), "image/jpeg")}


def error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "<not the error JSON>"


@dataclass
class Ledger:
    """What the server acknowledged with a 2xx, from every client thread (thread-safe)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    identities: dict[str, Path] = field(default_factory=dict)  # created identity -> photo of its first face
    faces: dict[str, tuple[str, Path]] = field(default_factory=dict)  # created face -> (identity, photo)
    deleted_identities: list[str] = field(default_factory=list)
    deleted_faces: list[str] = field(default_factory=list)
    outcomes: Counter[tuple[str, int, str]] = field(default_factory=Counter)  # (operation, status, error code)
    transport_errors: list[str] = field(default_factory=list)
    # Deletions sent (answered or not): a search may or may not see them yet.
    deleting_identities: set[str] = field(default_factory=set)
    deleting_faces: set[str] = field(default_factory=set)
    stale_searches: list[str] = field(default_factory=list)  # searches that missed an acknowledged change
    sent_names: set[str] = field(default_factory=set)  # names of every /enroll sent, answered or not
    _photos: Iterator[Path] | None = None

    def use_photos(self, photos: list[Path]) -> None:
        self._photos = iter(photos)

    def next_photo(self) -> Path | None:
        """A photo no request has sent before (None when all are used)."""
        assert self._photos is not None
        with self.lock:
            return next(self._photos, None)

    def record(self, operation: str, response: httpx.Response) -> None:
        code = "" if response.is_success else error_code(response)
        with self.lock:
            self.outcomes[(operation, response.status_code, code)] += 1

    def enrolled(self, body: dict[str, Any], photo: Path) -> None:
        with self.lock:
            if body["created"]:
                self.identities[body["identity_id"]] = photo
            self.faces[body["face_id"]] = (body["identity_id"], photo)

    def deleted(self, body: dict[str, Any]) -> None:
        with self.lock:
            if body["identity_deleted"]:
                self.deleted_identities.append(body["identity_id"])
            self.deleted_faces.extend(body["deleted_face_ids"])

    def expected(self) -> tuple[set[str], dict[str, str]]:
        """The identities and faces (face -> identity) the database must hold: every acknowledged creation not
        undone by an acknowledged deletion."""
        with self.lock:
            identities = set(self.identities) - set(self.deleted_identities)
            faces = {f: i for f, (i, _) in self.faces.items() if f not in set(self.deleted_faces)}
            return identities, faces

    def server_errors(self) -> dict[tuple[str, int, str], int]:
        with self.lock:
            return {key: n for key, n in self.outcomes.items() if key[1] >= 500}


def enrol(client: httpx.Client, ledger: Ledger, photo: Path, name: str) -> httpx.Response:
    with ledger.lock:
        ledger.sent_names.add(name)
    response = client.post("/enroll", files=upload(photo), data={"name": name, **ENROL_FORM})
    ledger.record("enrol", response)
    if response.status_code == 201:
        ledger.enrolled(response.json(), photo)
    return response


def enrol_until(
    stop: threading.Event,
    url: str,
    ledger: Ledger,
    tag: str,
    on_answer: Callable[[httpx.Response], None] | None = None,
) -> None:
    """One client: enrols new people (a photo and name never sent before, named `tag` and a count) until `stop` is
    set. A request the server drops (killed, or closing at shutdown) has an unknown outcome: it may or may not be
    stored, so it is only left out of the answers given to `on_answer`."""
    with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S) as http:
        n = 0
        while not stop.is_set():
            photo = ledger.next_photo()
            assert photo is not None, "ran out of photos"
            n += 1
            try:
                response = enrol(http, ledger, photo, f"{tag} n{n} {photo.parent.name}")
            except httpx.TransportError:
                continue
            if on_answer is not None:
                on_answer(response)


def top_candidate(client: httpx.Client | httpx2.Client, photo: Path) -> dict[str, Any] | None:
    """The nearest identity /identify names for the photo's largest face (None: no candidate): largest as /enroll's
    face=largest chooses, by area then score (two faces can be equally wide, e.g. 69x69 and 69x70 px in one LFW
    photo)."""
    response = client.post("/identify", files=upload(photo), data={"top_k": "1"})
    assert response.status_code == 200, response.text
    faces = response.json()["faces"]

    def area_then_score(found: dict[str, Any]) -> tuple[int, float]:
        box = found["face"]["box"]
        return (box["right"] - box["left"] + 1) * (box["bottom"] - box["top"] + 1), found["face"]["score"]

    largest = max(faces, key=area_then_score)
    return largest["candidates"][0] if largest["candidates"] else None
