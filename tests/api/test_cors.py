"""CORS: off by default; with allowed origins, a browser page of that origin may call the API (preflights answered,
errors readable), any other origin is refused with our JSON error, and a misspelt origin stops start-up."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.auth.keys import generate_key
from app.config import CorsSettings
from tests.api.conftest import api_settings, error_of, running

Photo = Callable[[str], tuple[str, bytes, str]]
PAGE = "https://login.example.com"
AMY = "bbt_amy/face-api__amy1.png"


def preflight(
    client: TestClient, path: str, origin: str, method: str = "POST", headers: str = "x-api-key"
) -> httpx2.Response:
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
    )


@pytest.fixture(scope="module")
def admin_key() -> str:
    return generate_key()


@pytest.fixture(scope="module")
def cors_client(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, admin_key: str) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("cors") / "gallery.db"
    settings = api_settings(
        models_dir,
        f"sqlite:///{db}",
        cors={"allow_origins": [PAGE], "max_age": 120},
        auth={"required": True, "bootstrap_key": admin_key},
        image={"max_upload_bytes": 2_000_000},
    )
    with running(settings) as client:
        yield client


@pytest.mark.model
class TestAllowedOrigin:
    def test_preflight_is_answered_without_a_key(self, cors_client: TestClient) -> None:
        r = preflight(cors_client, "/verify", PAGE)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == PAGE
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
        assert r.headers["access-control-max-age"] == "120"
        assert "access-control-allow-credentials" not in r.headers  # keys travel in headers, never cookies

    def test_a_real_call_from_the_page(self, cors_client: TestClient, admin_key: str, photo: Photo) -> None:
        r = cors_client.post(
            "/enroll",
            files={"image": photo(AMY)},
            data={"name": "Amy"},
            headers={"Origin": PAGE, "X-API-Key": admin_key},
        )
        assert r.status_code == 201, r.text
        assert r.headers["access-control-allow-origin"] == PAGE

    def test_errors_are_readable_by_the_page(self, cors_client: TestClient, admin_key: str) -> None:
        no_key = cors_client.post("/identify", files={"image": ("x.jpg", b"x", "image/jpeg")}, headers={"Origin": PAGE})
        error_of(no_key, 401, "unauthorized")
        assert no_key.headers["access-control-allow-origin"] == PAGE
        too_big = cors_client.post(
            "/identify",
            files={"image": ("x.jpg", b"\xff" * 2_100_000, "image/jpeg")},
            headers={"Origin": PAGE, "X-API-Key": admin_key},
        )
        error_of(too_big, 413, "request_too_large")
        assert too_big.headers["access-control-allow-origin"] == PAGE
        not_image = cors_client.post(
            "/identify",
            files={"image": ("x.jpg", b"text", "image/jpeg")},
            headers={"Origin": PAGE, "X-API-Key": admin_key},
        )
        error_of(not_image, 422, "invalid_image")
        assert not_image.headers["access-control-allow-origin"] == PAGE

    def test_a_server_failure_is_readable_by_the_page(
        self, cors_client: TestClient, admin_key: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """README: every answer carries an X-Request-ID readable across origins, to quote when reporting a failure,
        and every API answer is no-store. A 500 was sent by Starlette's outermost middleware, past CORS and no-store:
        without Access-Control-Allow-Origin the browser hid the whole answer from the page, its request id included."""

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(cors_client.app.state.service, "delete_identity", broken)  # type: ignore[attr-defined]
        caplog.set_level(logging.INFO)
        r = cors_client.delete(f"/identities/{'ab' * 16}", headers={"Origin": PAGE, "X-API-Key": admin_key})
        error_of(r, 500, "internal_error")
        assert r.headers["access-control-allow-origin"] == PAGE
        assert "X-Request-ID" in r.headers["access-control-expose-headers"]
        assert r.headers["cache-control"] == "no-store"
        [request_id] = r.headers.get_list("X-Request-ID")  # one, not one per layer
        crashes = [x for x in caplog.records if x.name == "app.api.errors" and x.levelno >= logging.ERROR]
        assert len(crashes) == 1 and crashes[0].__dict__["fields"]["request_id"] == request_id  # logged once
        [access] = [x.__dict__["fields"] for x in caplog.records if x.name == "facegate.access"]
        assert access["status"] == 500 and access["request_id"] == request_id and access["error"] == "internal_error"
        assert access["incident"] in r.json()["error"]["message"] and access["incident"] in crashes[0].getMessage()


@pytest.mark.model
class TestRefused:
    def test_other_origin_preflight_gets_our_error(self, cors_client: TestClient) -> None:
        r = preflight(cors_client, "/verify", "https://evil.example.net")
        assert error_of(r, 400, "cors_refused")["details"] == {"refused": ["origin"]}
        assert "access-control-allow-origin" not in r.headers

    def test_preflights_are_in_the_request_metrics(self, cors_client: TestClient) -> None:
        """The access log recorded every preflight, allowed or refused; the request metrics recorded none of them."""
        for origin, status in ((PAGE, 200), ("https://evil.example", 400)):
            series = f'facegate_request_duration_seconds_count{{method="OPTIONS",route="/identify",status="{status}"}}'
            before = _sample(cors_client, series)
            assert preflight(cors_client, "/identify", origin).status_code == status
            assert _sample(cors_client, series) == before + 1

    def test_unlisted_method_and_header(self, cors_client: TestClient) -> None:
        r = preflight(cors_client, "/identities", PAGE, method="PUT", headers="x-api-key, x-custom")
        assert error_of(r, 400, "cors_refused")["details"] == {"refused": ["method", "headers"]}

    def test_other_origin_gets_no_cors_headers_on_a_call(self, cors_client: TestClient, admin_key: str) -> None:
        r = cors_client.get("/identities", headers={"Origin": "https://evil.example.net", "X-API-Key": admin_key})
        assert r.status_code == 200  # the server answers; the browser keeps the answer from the other page
        assert "access-control-allow-origin" not in r.headers


@pytest.mark.model
def test_off_by_default(shared_client: TestClient) -> None:
    r = shared_client.get("/identities", headers={"Origin": PAGE})
    assert r.status_code == 200
    assert not [h for h in r.headers if h.lower().startswith("access-control-")]
    assert preflight(shared_client, "/verify", PAGE).status_code == 405  # no CORS layer: OPTIONS is not a route


@pytest.mark.parametrize(
    "origin",
    [
        "https://login.example.com/",
        "https://login.example.com/path",
        "login.example.com",
        "ftp://x.org",
        "",
        # A browser sends its origin in lower case, without the default port, a non-ASCII host as xn--: these
        # were accepted and never matched (every call from the page failed in the browser, silently).
        "https://Login.Example.com",
        "https://login.example.com:443",
        "http://login.example.com:80",
        "https://bücher.example",
    ],
)
def test_origins_that_a_browser_never_sends_are_refused_at_start(origin: str) -> None:
    with pytest.raises(ValidationError, match="is not an origin"):
        CorsSettings(allow_origins=[origin])


def test_well_formed_origins() -> None:
    origins = ["*", "http://localhost:3000", "https://login.example.com", "http://[::1]:8080"]
    assert CorsSettings(allow_origins=origins).allow_origins == origins


def _sample(client: TestClient, series: str) -> float:
    """The value of one series of /metrics (0 if absent)."""
    for line in client.get("/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return 0.0
