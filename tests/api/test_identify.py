"""Open-set identification through HTTP on real photos: a gallery of 24 dev people, one photo each.

Protocol (fixed, deterministic): the first 24 people (alphabetical) with >= 5 photos are enrolled with their first
photo (`face=largest`: a few dev photos show bystanders). Probes: each enrolled person's next 3 photos. Strangers:
the first 2 photos of every other dev person (30 people). Each probe is one POST /identify; a probe photo with
several faces is judged on its largest face. Defaults: threshold 0.36, identify_fpir 0.01, ambiguity margin 0.02.

Measured with this code (CPU provider, models built from face_recognition_models 0.3.0): top-1 correct (the right
person named) 57/72 = 79.2 %; strangers not named 54/54 = 100 %. The open-set rule trades recall for strangers
staying unknown: with a plain distance threshold the same probes give 90.3 % / 96.3 %, and at identify_fpir 0.1
the rule gives 90.3 % / 96.3 % too. The floors asserted (70 % and 95 %) leave room for a handful of decisions
near the cut flipping on another CPU, while failing if the pipeline, search or decision is broken (a random
gallery gives ~4 % top-1; a rule that names the nearest identity regardless makes every stranger a match).

Module-scoped: the gallery is enrolled once and each probe runs once (~130 photos, ~1 minute on 2 cores).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import api_settings, error_of, running

pytestmark = [pytest.mark.model, pytest.mark.slow]

GALLERY_PEOPLE = 24
PROBES_PER_PERSON = 3
STRANGER_PHOTOS = 2
TOP1_FLOOR = 0.70
STRANGER_FLOOR = 0.95


@dataclass(frozen=True)
class Probe:
    person: str
    photo: Path
    enrolled: bool
    response: dict[str, Any]

    @property
    def main_face(self) -> dict[str, Any]:
        def area(f: dict[str, Any]) -> int:
            b = f["face"]["box"]
            return int((b["right"] - b["left"] + 1) * (b["bottom"] - b["top"] + 1))

        return max(self.response["faces"], key=area)


@dataclass(frozen=True)
class World:
    client: TestClient
    ids: dict[str, str]  # person -> identity id
    probes: list[Probe]


def _upload(path: Path) -> tuple[str, bytes]:
    return path.name, path.read_bytes()


@pytest.fixture(scope="module")
def world(models_dir: Path, people: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    db = tmp_path_factory.mktemp("identify") / "gallery.db"
    enrolled = [name for name, photos in people.items() if len(photos) >= 5][:GALLERY_PEOPLE]
    strangers = [name for name in people if name not in enrolled]
    with running(api_settings(models_dir, f"sqlite:///{db}")) as client:
        ids = {}
        for name in enrolled:
            # The gallery is fixed by the protocol, so the enrolment gates are switched off: bbt_leonard's first
            # photo matches arnold_schwarzenegger's at 0.359 (< 0.36), which 409 possible_duplicate would refuse.
            r = client.post(
                "/enroll",
                files={"image": _upload(people[name][0])},
                data={"name": name, "face": "largest", "allow_duplicate": "true", "allow_low_quality": "true"},
            )
            assert r.status_code == 201, (name, r.text)
            ids[name] = r.json()["identity_id"]
        probes = []
        for name in enrolled:
            for path in people[name][1 : 1 + PROBES_PER_PERSON]:
                probes.append(Probe(name, path, True, _identify(client, path)))
        for name in strangers:
            for path in people[name][:STRANGER_PHOTOS]:
                probes.append(Probe(name, path, False, _identify(client, path)))
        yield World(client, ids, probes)


def _identify(client: TestClient, path: Path) -> dict[str, Any]:
    r = client.post("/identify", files={"image": _upload(path)})
    if r.status_code == 422:  # the detector found no face: counted as a miss below
        assert r.json()["error"]["code"] == "no_face", r.text
        return {"faces": []}
    assert r.status_code == 200, (path, r.text)
    body: dict[str, Any] = r.json()
    return body


def test_gallery_of_at_least_20_people(world: World) -> None:
    assert len(world.ids) == GALLERY_PEOPLE >= 20
    r = world.client.get("/identities", params={"limit": 100})
    assert r.status_code == 200
    assert r.json()["total"] == GALLERY_PEOPLE
    assert {i["name"] for i in r.json()["items"]} == set(world.ids)
    assert all(i["face_count"] == 1 for i in r.json()["items"])


def test_top1_on_other_photos_of_enrolled_people(world: World) -> None:
    probes = [p for p in world.probes if p.enrolled]
    correct = 0
    misses = []
    for p in probes:
        match = p.main_face["match"] if p.response["faces"] else None
        if match is not None and match["identity_id"] == world.ids[p.person]:
            correct += 1
        else:
            misses.append((p.photo.name, match and match["name"]))
    rate = correct / len(probes)
    print(f"\nidentify top-1 correct: {correct}/{len(probes)} = {rate:.1%}; misses: {misses}")
    assert len(probes) >= 60
    assert rate >= TOP1_FLOOR, misses


def test_strangers_come_back_unknown(world: World) -> None:
    probes = [p for p in world.probes if not p.enrolled]
    unknown = 0
    false_accepts = []
    for p in probes:
        if not p.response["faces"] or all(f["match"] is None for f in p.response["faces"]):
            unknown += 1
        else:
            false_accepts.append(p.photo.name)
    rate = unknown / len(probes)
    print(f"\nstrangers not named: {unknown}/{len(probes)} = {rate:.1%}; named as someone: {false_accepts}")
    assert len(probes) >= 40
    assert rate >= STRANGER_FLOOR, false_accepts


def test_identify_response_is_consistent(world: World) -> None:
    """Candidates nearest first, one per identity, at most top_k; a match only when accepted, and then it is the
    nearest candidate within the threshold; the threshold and FPIR target are echoed; the names are those enrolled."""
    names = {v: k for k, v in world.ids.items()}
    reasons = set()
    for p in world.probes:
        body = p.response
        if not body["faces"]:
            continue
        assert body["threshold"] == pytest.approx(0.36)
        assert body["threshold_source"] == "settings"
        assert body["target_fpir"] == pytest.approx(0.01)
        assert body["gallery_size"] == body["identities"] == GALLERY_PEOPLE
        for f in body["faces"]:
            distances = [c["distance"] for c in f["candidates"]]
            assert distances == sorted(distances)
            assert 1 <= len(f["candidates"]) <= 5
            assert len({c["identity_id"] for c in f["candidates"]}) == len(f["candidates"])
            for c in f["candidates"]:
                assert names[c["identity_id"]] == c["name"]
            reasons.add(f["reason"])
            assert (f["match"] is not None) == (f["reason"] == "accepted")
            assert f["ambiguous"] == (f["reason"] == "ambiguous")
            if f["match"] is not None:
                assert f["match"] == f["candidates"][0]
                assert f["match"]["distance"] <= body["threshold"]
            if distances[0] > body["threshold"]:
                assert f["reason"] == "unknown"
            assert f["margin"] == pytest.approx(distances[1] - distances[0], abs=1e-6)
            assert 0 < f["fpir_estimate"] <= 1
            # The explanation is the rule itself: the score from the two nearest distances, and the decision
            # follows from score vs score_threshold (or the same test as a distance).
            d1, d2 = distances[0], distances[1]
            assert f["ratio"] == pytest.approx(d1 / d2, rel=1e-5)
            assert f["score"] == pytest.approx(math.log(d1) - 0.75 * math.log(min(d2, 0.45)), abs=1e-4)
            assert (f["score"] <= f["score_threshold"]) == (d1 <= f["accept_distance"] * (1 + 1e-9))
            if f["reason"] == "accepted":
                assert f["score"] <= f["score_threshold"]
            elif d1 <= body["threshold"] and f["margin"] >= 0.02:
                assert f["score"] > f["score_threshold"]  # not named although within the threshold: the score failed
    assert {"accepted", "unknown"} <= reasons


def test_identify_multiple_faces_in_one_photo(world: World, dev_faces: Path) -> None:
    """Every face of a group photo is searched; each gets its own candidates."""
    r = world.client.post(
        "/identify", files={"image": _upload(dev_faces / "ariel_sharon/krasserm__Ariel_Sharon_0004.jpg")}
    )
    assert r.status_code == 200, r.text
    faces = r.json()["faces"]
    assert len(faces) >= 2
    scores = [f["face"]["score"] for f in faces]
    assert scores == sorted(scores, reverse=True)
    assert all(f["candidates"] for f in faces)


def test_top_k_and_threshold_override(world: World, people: dict[str, list[Path]]) -> None:
    photo = _upload(people[next(iter(world.ids))][1])
    r = world.client.post("/identify", files={"image": photo})
    assert r.status_code == 200, r.text
    default = r.json()["faces"][0]
    assert default["reason"] == "accepted"
    r = world.client.post("/identify", files={"image": photo}, data={"top_k": "1", "threshold": "0.0001"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["threshold"] == pytest.approx(0.0001) and body["threshold_source"] == "request"
    face = body["faces"][0]
    assert len(face["candidates"]) == 1 and face["match"] is None and face["reason"] == "unknown"
    assert face["margin"] == pytest.approx(default["margin"], abs=1e-6)  # the runner-up is still used
    r = world.client.post("/identify", files={"image": photo}, data={"top_k": "100"})
    assert r.status_code == 200, r.text
    face = r.json()["faces"][0]
    assert len(face["candidates"]) == GALLERY_PEOPLE  # top_k above the gallery size gives everyone
    assert face["candidates"][:5] == default["candidates"] and face["match"] == default["match"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", "0"),
        ("top_k", "101"),
        ("top_k", "two"),
        ("threshold", "0"),
        ("threshold", "4.5"),
        ("threshold", "nan"),
        ("threshold", "-inf"),
    ],
)
def test_out_of_range_parameters(world: World, people: dict[str, list[Path]], field: str, value: str) -> None:
    photo = _upload(people[next(iter(world.ids))][1])
    error = error_of(
        world.client.post("/identify", files={"image": photo}, data={field: value}), 422, "invalid_request"
    )
    assert any(field in e["loc"] for e in error["details"]["errors"])
    if value in ("nan", "-inf"):  # not "should be less than or equal to 4", which NaN fails too
        assert error["message"] == f"invalid request: {field}: Input should be a finite number"


def test_metrics_count_the_decisions(world: World) -> None:
    text = world.client.get("/metrics").text
    decided = sum(len(p.response["faces"]) for p in world.probes)
    matches = sum(1 for p in world.probes for f in p.response["faces"] if f["match"] is not None)
    unknown = sum(1 for p in world.probes for f in p.response["faces"] if f["reason"] == "unknown")
    assert decided > 0 and 0 < matches < decided and unknown > 0
    # counters only grow: later tests in this module add decisions
    assert _metric(text, 'facegate_decisions_total{endpoint="identify",outcome="match"}') >= matches
    assert _metric(text, 'facegate_decisions_total{endpoint="identify",outcome="unknown"}') >= unknown
    assert _metric(text, 'facegate_decision_distance_count{endpoint="identify"}') >= decided
    assert _metric(text, "facegate_gallery_faces") == GALLERY_PEOPLE
    assert _metric(
        text, 'facegate_request_duration_seconds_count{method="POST",route="/identify",status="200"}'
    ) >= len([p for p in world.probes if p.response["faces"]])
    assert (
        _metric(text, 'facegate_request_duration_seconds_count{method="POST",route="/enroll",status="201"}')
        == GALLERY_PEOPLE
    )


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_identify_on_an_empty_gallery(
    models_dir: Path, tmp_path: Path, photo: Callable[[str], tuple[str, bytes, str]]
) -> None:
    """An empty gallery answers every face with no candidates (and no match), not an error."""
    with running(api_settings(models_dir, f"sqlite:///{tmp_path / 'g.db'}")) as client:
        r = client.post("/identify", files={"image": photo("bbt_amy/face-api__amy1.png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["gallery_size"] == 0
        assert [f["candidates"] for f in body["faces"]] == [[]]
        assert body["faces"][0]["match"] is None and body["faces"][0]["reason"] == "unknown"
        error_of(
            client.post("/identify", files={"image": ("x.png", b"not a photo", "image/png")}), 422, "invalid_image"
        )
