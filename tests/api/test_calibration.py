"""Calibration through HTTP: POST /calibrate (from distances and from the gallery), GET / DELETE /calibration,
and `far_estimate` in every verify / identify response (from the default table shipped with the model)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.matching.calibration import load_default_table, threshold_for_far
from app.vision.models import load_manifest
from app.vision.types import Box
from tests.api.conftest import error_of

pytestmark = pytest.mark.model

Photo = Callable[[str], tuple[str, bytes, str]]

AMY = ["bbt_amy/face-api__amy1.png", "bbt_amy/face-api__amy2.png"]
RAJ = ["bbt_raj/face-api__raj1.png", "bbt_raj/face-api__raj2.png"]
SHELDON = ["bbt_sheldon/face-api__sheldon1.png", "bbt_sheldon/face-api__sheldon2.png"]


def _verify(client: TestClient, photo: Photo, **data: str) -> dict[str, object]:
    r = client.post("/verify", files={"image_a": photo(AMY[0]), "image_b": photo(RAJ[0])}, data=data)
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def test_shipped_table_fits_the_served_model_and_gives_far_estimates(
    client: TestClient, photo: Photo, models_dir: Path
) -> None:
    table = load_default_table()
    manifest = load_manifest(models_dir, verify=False)
    assert table.model_version in (manifest.model_name, manifest.model_version)

    status = client.get("/calibration")
    assert status.status_code == 200, status.text
    body = status.json()
    assert body["threshold"] == pytest.approx(0.36) and body["threshold_source"] == "settings"
    assert body["deployment"] is None
    shipped = body["default_table"]
    assert shipped["model_version"] == table.model_version and len(shipped["rows"]) == table.thresholds.size
    far = [row["far"] for row in shipped["rows"]]
    assert far == sorted(far) and far[0] == 0.0 and far[-1] > 0.5
    assert body["far_estimate"] == pytest.approx(table.far_at(0.36))
    assert 1e-4 < body["far_estimate"] < 1e-2  # dev pairs: 0.19 % of different-person pairs under 0.36

    verified = _verify(client, photo)
    assert verified["far_estimate"] == pytest.approx(table.far_at(0.36))
    looser = _verify(client, photo, threshold="0.5")
    assert looser["far_estimate"] == pytest.approx(table.far_at(0.5))
    assert looser["far_estimate"] > verified["far_estimate"]  # type: ignore[operator]

    r = client.post("/identify", files={"image": photo(AMY[1])})
    assert r.status_code == 200, r.text
    assert r.json()["far_estimate"] == pytest.approx(table.far_at(0.36))


def test_calibrate_from_distances_then_apply_changes_the_verify_threshold(client: TestClient, photo: Photo) -> None:
    rng = np.random.default_rng(5)
    same = rng.uniform(0.05, 0.35, 400).round(6).tolist()
    different = rng.uniform(0.3, 1.0, 2000).round(6).tolist()
    body = {"source": "pairs", "same": same, "different": different, "target_far": 0.01}

    dry = client.post("/calibrate", json=body)
    assert dry.status_code == 200, dry.text
    result = dry.json()
    expected = threshold_for_far(np.array(different), 0.01)
    assert result["threshold"] == pytest.approx(expected, abs=1e-12)
    assert result["far"] == pytest.approx(np.mean(np.array(different) <= expected))
    assert result["far"] <= 0.01
    assert result["val"] == pytest.approx(np.mean(np.array(same) <= expected))
    lo, hi = result["far_interval"]
    assert lo <= result["far"] <= hi < 0.02
    assert (result["n_same"], result["n_different"], result["n_pairs"]) == (400, 2000, 2400)
    assert result["applied"] is False and result["source"] == "pairs"
    assert _verify(client, photo)["threshold_source"] == "settings"  # a dry run changes nothing

    applied = client.post("/calibrate", json={**body, "apply": True})
    assert applied.status_code == 200 and applied.json()["applied"] is True
    verified = _verify(client, photo)
    assert verified["threshold_source"] == "deployment"
    assert verified["threshold"] == pytest.approx(expected, abs=1e-9)

    status = client.get("/calibration").json()
    assert status["threshold_source"] == "deployment" and status["threshold"] == pytest.approx(expected, abs=1e-9)
    stored = status["deployment"]
    assert stored["source"] == "calibration:pairs"
    assert stored["value"]["target_far"] == 0.01 and stored["value"]["n_pairs"] == 2400
    assert stored["value"]["computed_at"].startswith(stored["updated_at"][:10])

    # A request's own threshold still wins, and forgetting the calibration goes back to the setting.
    assert _verify(client, photo, threshold="0.2")["threshold_source"] == "request"
    reset = client.delete("/calibration")
    assert reset.status_code == 200
    assert reset.json() == {"removed": True, "threshold": 0.36, "threshold_source": "settings"}
    assert _verify(client, photo)["threshold_source"] == "settings"
    assert client.delete("/calibration").json()["removed"] is False


def test_calibrate_from_the_gallery(client: TestClient, photo: Photo) -> None:
    early = client.post("/calibrate", json={"source": "gallery"})
    assert error_of(early, 409, "insufficient_data")

    for name, photos in (("Amy", AMY), ("Raj", RAJ), ("Sheldon", SHELDON)):
        first = client.post("/enroll", files={"image": photo(photos[0])}, data={"name": name})
        assert first.status_code == 201, first.text
        second = client.post(
            "/enroll", files={"image": photo(photos[1])}, data={"identity_id": first.json()["identity_id"]}
        )
        assert second.status_code == 201, second.text
    # One more identity with a single face: it cannot give a same pair, so it takes no part.
    single = client.post("/enroll", files={"image": photo("bbt_penny/face-api__penny1.png")}, data={"name": "Penny"})
    assert single.status_code == 201, single.text

    r = client.post("/calibrate", json={"source": "gallery", "target_far": 0.001})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["n_identities"] == 3
    assert (result["n_same"], result["n_different"]) == (3, 12)  # 3 same pairs; 6 faces give 15 pairs in all
    # 12 different pairs cannot show a FAR of 1e-3: the threshold sits just under the nearest different pair, and
    # the interval says how little 0 false accepts out of 12 proves (Clopper-Pearson upper bound 1 - 0.025^(1/12)).
    assert result["far"] == 0.0
    assert result["far_interval"][0] == 0.0
    assert result["far_interval"][1] == pytest.approx(1 - 0.025 ** (1 / 12), rel=1e-6)
    assert result["val"] == 1.0  # same-person pairs measured 0.12-0.2, different ones above 0.5
    assert 0.2 < result["threshold"] < 0.8
    # ... so that threshold is not stored: it would have verify and identify claim a FAR nothing measured
    refused = error_of(
        client.post("/calibrate", json={"source": "gallery", "target_far": 0.001, "apply": True}),
        409,
        "insufficient_data",
    )
    assert refused["message"].startswith("applying a threshold for FAR 0.001 needs at least 1000 different-person")
    assert f"{result['threshold']:.4f}" in refused["message"] and "under 0.26" in refused["message"]
    assert _verify(client, photo)["threshold_source"] == "settings"

    # 12 pairs can show a FAR of 1/10 (one false accept allowed): stored
    r = client.post("/calibrate", json={"source": "gallery", "target_far": 0.1, "apply": True})
    assert r.status_code == 200 and r.json()["applied"] is True, r.text
    assert r.json()["far"] == pytest.approx(1 / 12) and r.json()["threshold"] > result["threshold"]
    verified = _verify(client, photo)
    assert verified["threshold_source"] == "deployment"
    assert verified["threshold"] == pytest.approx(r.json()["threshold"])
    assert math.isfinite(verified["far_estimate"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        {"source": "pairs", "same": [0.1]},
        {"source": "pairs", "same": [], "different": [0.5]},
        {"source": "gallery", "same": [0.1], "different": [0.5]},
        {"source": "pairs", "same": [0.1], "different": [0.5], "target_far": 1.5},
        {"source": "pairs", "same": [0.1], "different": [-0.5]},
        {"source": "pairs", "same": [0.1], "different": [0.5, 4.0000001]},
        {"source": "somewhere"},
        {"source": "gallery", "threshold": 0.3},
    ],
)
def test_calibrate_refuses_bad_requests(shared_client: TestClient, body: dict[str, object]) -> None:
    error_of(shared_client.post("/calibrate", json=body), 422, "invalid_request")


@pytest.mark.parametrize(
    ("same", "different", "field", "outside"),
    [
        ([5, 5.5], [7, 8], "same", "2 outside, the first at index 0: 5.0"),  # was applied: 7.99, then ignored
        ([0.1], [0.5, 1e308], "different", "1 outside, the first at index 1: 1e+308"),  # was applied: 1.7e308
        ([0.1, -0.0001], [0.5], "same", "1 outside, the first at index 1: -0.0001"),
    ],
)
def test_calibrate_refuses_distances_outside_0_4_and_keeps_the_stored_threshold(
    shared_client: TestClient, same: list[float], different: list[float], field: str, outside: str
) -> None:
    """Squared L2 distances of unit-norm embeddings lie in [0, 4]: anything else is refused, naming the field, and
    the threshold stored before stays (it was overwritten by one that deployment_threshold() then ignored)."""
    client = shared_client
    good = {"source": "pairs", "same": [0.1, 0.2], "different": [0.5, 0.6, 0.7], "target_far": 0.5, "apply": True}
    assert client.post("/calibrate", json=good).status_code == 200
    before = client.get("/calibration").json()
    assert before["threshold_source"] == "deployment" and 0 < before["threshold"] < 1

    body = {"source": "pairs", "same": same, "different": different, "target_far": 0.5, "apply": True}
    error = error_of(client.post("/calibrate", json=body), 422, "invalid_request")
    assert error["details"] == {"field": field}
    assert error["message"] == f"`{field}` distances must be squared L2 distances in [0, 4] ({outside})"
    assert client.get("/calibration").json() == before
    assert client.delete("/calibration").json()["removed"] is True


def test_calibrate_takes_any_target_far_in_0_1(shared_client: TestClient) -> None:
    """The smallest float above 0 (1 / it is inf) and the largest below 1 were 500s (OverflowError, IndexError)."""
    before = shared_client.get("/calibration").json()
    body = {"source": "pairs", "same": [0.1, 0.2], "different": [0.5, 0.6], "target_far": 5e-324}
    r = shared_client.post("/calibrate", json=body)
    assert r.status_code == 200 and r.json()["threshold"] < 0.5, r.text
    error = error_of(shared_client.post("/calibrate", json=body | {"apply": True}), 409, "insufficient_data")
    assert "needs at least inf different-person pairs" in error["message"]
    tiny = body | {"target_far": 1e-300, "apply": True}
    error = error_of(shared_client.post("/calibrate", json=tiny), 409, "insufficient_data")
    assert "needs at least 1e+300 different-person pairs" in error["message"]
    r = shared_client.post("/calibrate", json=body | {"target_far": 0.9999999999999999})
    assert r.status_code == 200 and 0.5 <= r.json()["threshold"] < 0.6, r.text
    assert shared_client.get("/calibration").json() == before


def test_calibrate_accepts_the_ends_of_the_range(shared_client: TestClient) -> None:
    body = {"source": "pairs", "same": [0.0, 0.1], "different": [3.9, 4.0], "target_far": 0.5}
    r = shared_client.post("/calibrate", json=body)
    assert r.status_code == 200, r.text
    assert 0 < r.json()["threshold"] < 4 and r.json()["applied"] is False


def test_calibrate_never_stores_a_threshold_over_4(client: TestClient) -> None:
    """A gallery whose embeddings are far from unit norm (none the served model makes) could give a threshold over
    4: refused, and nothing stored."""
    gallery = client.app.state.service.gallery  # type: ignore[attr-defined]
    directions = np.eye(128, dtype=np.float32)[:3] * 10  # different people 200 apart, the same person 0.01
    for person, direction in enumerate(directions):
        first = gallery.enroll_face(embedding=direction, box=Box(0, 0, 9, 9), score=1.0, name=f"Far {person}")
        nudged = direction + np.float32(0.1) * np.eye(128, dtype=np.float32)[100]
        gallery.enroll_face(embedding=nudged, box=Box(0, 0, 9, 9), score=1.0, identity_id=first.identity_id)
    before = client.get("/calibration").json()

    r = client.post("/calibrate", json={"source": "gallery", "target_far": 0.5, "apply": True})
    error = error_of(r, 409, "insufficient_data")
    assert "is over 4: not a usable threshold" in error["message"]
    assert client.get("/calibration").json() == before and before["deployment"] is None


def test_a_field_sent_twice_in_the_json_body_is_refused(client: TestClient, photo: Photo) -> None:
    """README: a repeated field is refused (422), JSON fields as form fields. A JSON object naming a key twice was
    decided on its last value without a word: a threshold for FAR 0.5 was stored from a body that also asked for
    0.001, and PATCH renamed an identity to the second of two names."""
    headers = {"Content-Type": "application/json"}
    pairs = '"source": "pairs", "same": [0.1, 0.2], "different": [0.5, 0.6, 0.7], "apply": true'
    body = "{" + pairs + ', "target_far": 0.001, "target_far": 0.5}'
    error = error_of(client.post("/calibrate", content=body, headers=headers), 422, "invalid_request")
    assert error["details"] == {"repeated_fields": ["target_far"]}
    assert client.get("/calibration").json()["deployment"] is None  # nothing stored
    # Not declared JSON: refused as not JSON (which FastAPI does not read it as), not for a key it names twice.
    text = client.post("/calibrate", content=body, headers={"Content-Type": "text/plain"})
    assert "takes a JSON body (Content-Type: application/json), not text/plain" in error_of(text, 422, "invalid_request")["message"]
    once = client.post("/calibrate", content="{" + pairs + ', "target_far": 0.5}', headers=headers)
    assert once.status_code == 200 and once.json()["applied"] is True

    created = client.post("/enroll", data={"name": "amy"}, files={"image": photo("bbt_amy/face-api__amy1.png")})
    assert created.status_code == 201, created.text
    url = f"/identities/{created.json()['identity_id']}"
    body = '{"name": "amy", "metadata": {"team": "a"}, "name": "raj"}'
    error = error_of(client.patch(url, content=body, headers=headers), 422, "invalid_request")
    assert error["details"] == {"repeated_fields": ["name"]}
    assert client.get(url).json()["name"] == "amy"
    nested = '{"metadata": {"tags": [{"door": 1, "door": 2}], "team": "b"}}'
    error = error_of(client.patch(url, content=nested, headers=headers), 422, "invalid_request")
    assert error["details"] == {"repeated_fields": ["metadata.tags[0].door"]}
    assert client.get(url).json()["metadata"] == {}  # unchanged: enrolled without any
    renamed = client.patch(url, content='{"name": "raj", "metadata": {"team": "b"}}', headers=headers)
    assert renamed.status_code == 200 and renamed.json()["name"] == "raj"
