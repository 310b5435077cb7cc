"""What the web console needs from the API besides the existing routes: its files, the FAR/VAL curve, recent latency,
and landmarks with every face (no browser here)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.matching.calibration import DEFAULT_TABLE_PATH
from tests.api.conftest import error_of

pytestmark = pytest.mark.model

Upload = Callable[[str], tuple[str, bytes, str]]
AMY = ["bbt_amy/face-api__amy1.png", "bbt_amy/face-api__amy2.png", "bbt_amy/face-api__amy3.png"]
RAJ = ["bbt_raj/face-api__raj1.png", "bbt_raj/face-api__raj2.png"]


def test_console_files_are_served_without_a_key_and_only_from_this_origin(client: TestClient) -> None:
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert '<script src="/ui/app.js"' in page.text and 'name="viewport"' in page.text
    assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/app.css").headers["content-type"].startswith("text/css")
    assert client.get("/ui/", follow_redirects=False).headers["location"] == "/ui"
    for missing in ("/ui/secrets.txt", "/ui/..%2Fconfig.py", "/ui/index.htm"):
        error_of(client.get(missing), 404, "not_found")
    assert not any(path.startswith("/ui") for path in client.get("/openapi.json").json()["paths"])


def test_console_files_send_security_headers(client: TestClient) -> None:
    for path in ("/ui", "/ui/app.js", "/ui/app.css"):
        headers = client.get(path).headers
        csp = {d.split()[0]: d.split()[1:] for d in headers["content-security-policy"].split("; ")}
        assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]  # no inline script or style
        assert csp["object-src"] == csp["form-action"] == csp["frame-ancestors"] == ["'none'"], path
        assert headers["x-frame-options"] == "DENY", path  # clickjacking, for browsers without frame-ancestors
        assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
        assert headers["cache-control"] == "no-cache", path


def test_enrol_reply_has_the_five_landmarks_inside_the_box(client: TestClient, photo: Upload) -> None:
    face = client.post("/enroll", files={"image": photo(AMY[0])}, data={"name": "Amy"}).json()["face"]
    box, points = face["box"], face["landmarks"]
    assert len(points) == 5
    for x, y in points:
        assert box["left"] <= x <= box["right"] and box["top"] <= y <= box["bottom"]
    nose_y = points[4][1]
    assert all(y < nose_y for _, y in points[:4])  # eye corners above the point under the nose


def test_shipped_curve_is_the_table_shipped_with_the_model(client: TestClient) -> None:
    table = json.loads(DEFAULT_TABLE_PATH.read_text())
    curve = client.get("/calibration/curve").json()
    assert curve["source"] == "shipped" and curve["threshold"] == 0.36 and curve["threshold_source"] == "settings"
    assert (curve["n_same"], curve["n_different"]) == (table["n_same"], table["n_different"])
    assert [[r["threshold"], r["far"], r["val"], r["far_upper"]] for r in curve["rows"]] == table["rows"]
    error_of(client.get("/calibration/curve?source=everything"), 422, "invalid_request")


def test_gallery_curve_agrees_with_calibrate_on_the_same_pairs(client: TestClient, photo: Upload) -> None:
    error_of(client.get("/calibration/curve?source=gallery"), 409, "insufficient_data")
    amy = client.post("/enroll", files={"image": photo(AMY[0])}, data={"name": "Amy"}).json()["identity_id"]
    raj = client.post("/enroll", files={"image": photo(RAJ[0])}, data={"name": "Raj"}).json()["identity_id"]
    for identity, path in ((amy, AMY[1]), (amy, AMY[2]), (raj, RAJ[1])):
        assert client.post(f"/identities/{identity}/faces", files={"image": photo(path)}).status_code == 201
    curve = client.get("/calibration/curve?source=gallery").json()
    # 2 people: 3 + 1 same-person pairs, 3 x 2 different-person pairs.
    assert (curve["n_identities"], curve["n_same"], curve["n_different"]) == (2, 4, 6)
    calibrated = client.post("/calibrate", json={"source": "gallery", "target_far": 0.2}).json()
    below = [r for r in curve["rows"] if r["threshold"] <= calibrated["threshold"]]
    assert below[-1]["far"] <= 0.2
    far = [r["far"] for r in curve["rows"]]
    val = [r["val"] for r in curve["rows"]]
    assert far == sorted(far) and val == sorted(val)
    assert {round(f * 6, 9) % 1 for f in far} == {0.0} and {round(v * 4, 9) % 1 for v in val} == {0.0}
    assert val[-1] == 1.0 and far[0] == 0.0 < far[-1]


def test_metrics_summary_gives_recent_latency_per_route(client: TestClient, photo: Upload) -> None:
    for _ in range(3):
        assert client.get("/healthz").status_code == 200
    client.post("/identify", files={"image": photo(RAJ[0])})
    summary = client.get("/metrics/summary").json()
    routes = {(r["method"], r["route"]): r for r in summary["routes"]}
    assert routes[("GET", "/healthz")]["count"] == 3
    identify = routes[("POST", "/identify")]
    assert identify["count"] == 1 and 0 < identify["p50_ms"] == identify["p95_ms"] == identify["max_ms"]
    assert summary["requests"] == sum(r["count"] for r in summary["routes"]) and summary["window"] == 500
    assert summary["workers"] == 1  # one process: its own requests
