"""Structured logs: one access line per request (route template, status, latency, decision, key prefix), JSON on
request, and nothing personal in any log record: no embeddings, image bytes, names or keys."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from app.auth import Scope, store
from app.config import LogFormat, LogSettings
from app.logs import JsonFormatter, TextFormatter, uvicorn_log_config
from tests.api.conftest import api_settings, running

pytestmark = pytest.mark.model

Photo = Callable[[str], tuple[str, bytes, str]]
OBAMA = "barack_obama/face_recognition__obama.jpg"
OBAMA_2 = "barack_obama/face_recognition__obama2.jpg"
BIDEN = "joe_biden/face_recognition__biden.jpg"
NAME = "Zebulon Quartermain"  # personal data: must appear in no log line
FLOAT = re.compile(r"-?\d+\.\d{3,}")


@pytest.fixture
def app_and_key(models_dir: Path, tmp_path: Path) -> Iterator[tuple[TestClient, str, str]]:
    # cache 0: the key created below turns auth on for the very next request (else within auth.cache_seconds)
    settings = api_settings(models_dir, f"sqlite:///{tmp_path / 'g.db'}", auth={"cache_seconds": 0})
    with running(settings) as client:
        with client.app.state.service.gallery.session() as session:  # type: ignore[attr-defined]
            created = store.create_key(session, name="logs", scope=Scope.write)
        yield client, created.key, created.record.prefix


def test_one_json_line_per_request_without_personal_data(
    app_and_key: tuple[TestClient, str, str], photo: Photo, caplog: pytest.LogCaptureFixture
) -> None:
    client, key, prefix = app_and_key
    headers = {"X-API-Key": key}
    caplog.set_level(logging.INFO)  # every logger at the level `facegate serve` runs at: nothing personal anywhere
    caplog.clear()
    enrol = {"name": NAME, "metadata": '{"badge": 4711}'}
    r = client.post("/enroll", files={"image": photo(OBAMA)}, data=enrol, headers=headers)
    assert r.status_code == 201, r.text
    identity = r.json()["identity_id"]
    for probe, same in ((OBAMA_2, True), (BIDEN, False)):
        r = client.post("/verify", files={"image": photo(probe)}, data={"identity_id": identity}, headers=headers)
        assert r.json()["match"] is same
    assert client.post("/identify", files={"image": photo(OBAMA_2)}, headers=headers).status_code == 200
    assert client.get(f"/identities/{identity}", headers=headers).status_code == 200
    assert client.get("/identities").status_code == 401
    assert client.get("/no/such/route/" + "x" * 50).status_code == 404

    records = [r for r in caplog.records if not r.name.startswith("httpx")]  # the test client's own log, not ours
    lines = [JsonFormatter().format(r) for r in records]
    access = [json.loads(line) for line, rec in zip(lines, records) if rec.name == "facegate.access"]
    assert [(a["method"], a["route"], a["status"]) for a in access] == [
        ("POST", "/enroll", 201),
        ("POST", "/verify", 200),
        ("POST", "/verify", 200),
        ("POST", "/identify", 200),
        ("GET", "/identities/{identity_id}", 200),  # the template: no id in the log
        ("GET", "/identities", 401),
        ("GET", "unmatched", 404),
    ]
    assert [a.get("decision") for a in access] == [None, "match", "no_match", "match", None, None, None]
    assert [a.get("key") for a in access] == [prefix] * 5 + [None, None]
    assert access[5]["error"] == "unauthorized"
    for a in access:
        assert isinstance(a["latency_ms"], float) and a["latency_ms"] >= 0 and a["level"] == "INFO"
    text = "\n".join(lines)
    assert NAME not in text and "Quartermain" not in text and "4711" not in text
    assert key not in text and key.split("_", 2)[2] not in text
    assert identity not in text  # ids stay out too: routes are logged by template
    for line in lines:  # an embedding would be 128 floats; no line carries more than a handful of numbers
        assert len(FLOAT.findall(line)) < 10, line


def test_every_refusal_is_logged_with_its_route_and_code(
    models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refusals by the framework and the middlewares too (validation, unparsable body, body limit before routing,
    method, CORS), and the routes FastAPI serves itself; a 500 logs the template, not the path with its id."""
    settings = api_settings(
        models_dir,
        f"sqlite:///{tmp_path / 'g.db'}",
        image={"max_upload_bytes": 10_000},
        cors={"allow_origins": ["https://login.example.com"]},
    )
    with running(settings) as client:
        service = client.app.state.service  # type: ignore[attr-defined]

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug")

        service.delete_identity = broken
        caplog.set_level(logging.INFO)
        caplog.clear()
        multipart = {"content-type": "multipart/form-data; boundary=b"}
        preflight = {"Origin": "https://evil.example.net", "Access-Control-Request-Method": "POST"}
        answers = [
            client.post("/identify", content=b"x" * 20_000, headers=multipart),
            client.post("/identify", content=b"garbage", headers=multipart),
            client.post("/identify", files={"image": ("a.jpg", b"x")}, data={"top_k": "0"}),
            client.delete("/healthz"),
            client.options("/verify", headers=preflight),
            client.get("/docs"),
            client.delete(f"/identities/{'ab' * 16}"),
        ]
        assert [a.status_code for a in answers] == [413, 400, 422, 405, 400, 200, 500]
        crash = answers[-1]
    access = [r.__dict__["fields"] for r in caplog.records if r.name == "facegate.access"]
    assert [(a["method"], a["route"], a["status"], a.get("error")) for a in access] == [
        ("POST", "/identify", 413, "request_too_large"),
        ("POST", "/identify", 400, "invalid_request"),
        ("POST", "/identify", 422, "invalid_request"),
        ("DELETE", "/healthz", 405, "method_not_allowed"),
        ("OPTIONS", "/verify", 400, "cors_refused"),
        ("GET", "/docs", 200, None),
        ("DELETE", "/identities/{identity_id}", 500, "internal_error"),
    ]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name == "app.api.errors"]
    assert len(errors) == 1 and "/identities/{identity_id}" in errors[0] and "ab" * 16 not in errors[0]
    # One incident id in the reply, the access line and the traceback's line: they can be found together.
    incident = crash.json()["error"]["message"].split("incident ")[1].split(")")[0]
    assert access[-1]["incident"] == incident and incident in errors[0]
    # Every answer, whichever layer sent it (the body limit, CORS, the 500 sent outside every middleware), carries
    # the request id its access line names; the 500's log line names it too.
    ids = [a.headers["X-Request-ID"] for a in answers]
    assert ids == [a["request_id"] for a in access] and len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    crash_record = next(r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "app.api.errors")
    assert crash_record.__dict__["fields"]["request_id"] == ids[-1]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("req-7f3a.b:2/ab+c=@x", True),  # nginx's $request_id, a trace id: followed across services
        ("a" * 128, True),
        ("a" * 129, False),
        ("two words", False),  # would split a text log line
        ('x" status=200', False),  # would forge a log field
        ("", False),
    ],
)
def test_a_well_formed_request_id_is_kept_any_other_replaced(
    models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, sent: str, kept: bool
) -> None:
    settings = api_settings(
        models_dir, f"sqlite:///{tmp_path / 'g.db'}", cors={"allow_origins": ["https://login.example.com"]}
    )
    with running(settings) as client:
        caplog.set_level(logging.INFO)
        caplog.clear()
        r = client.get("/identities", headers={"X-Request-ID": sent, "Origin": "https://login.example.com"})
    assert r.status_code == 200
    answered = r.headers["X-Request-ID"]
    assert (answered == sent) is kept
    if not kept:
        assert re.fullmatch(r"[0-9a-f]{32}", answered)
    # A browser's script may read it (and Retry-After) from a cross-origin answer.
    exposed = {h.strip().lower() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-request-id", "retry-after"} <= exposed
    access = [r.__dict__["fields"] for r in caplog.records if r.name == "facegate.access"]
    assert [a["request_id"] for a in access] == [answered]


def test_text_format_puts_the_fields_after_the_message() -> None:
    record = logging.LogRecord("facegate.access", logging.INFO, __file__, 1, "GET %s", ("/x",), None)
    record.fields = {"status": 200, "key": "1a2b3c4d", "decision": None}
    assert TextFormatter().format(record).endswith("facegate.access: GET /x status=200 key=1a2b3c4d")
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "GET /x" and line["status"] == 200 and line["key"] == "1a2b3c4d"


def test_uvicorn_log_config_routes_everything_through_one_formatter(capsys: pytest.CaptureFixture[str]) -> None:
    import logging.config

    config = uvicorn_log_config(LogSettings(format=LogFormat.json, level="info"))
    assert config["root"]["level"] == "INFO"
    touched = [logging.getLogger(), *(logging.getLogger(name) for name in config["loggers"])]
    saved = [(lg, lg.level, list(lg.handlers), lg.propagate) for lg in touched]
    # Pillow logs every EXIF tag (camera owner, GPS, ...) at DEBUG: kept quiet even when the service debugs.
    assert uvicorn_log_config(LogSettings(level="DEBUG"))["loggers"]["PIL"]["level"] == "INFO"
    logging.config.dictConfig(config)
    try:
        logging.getLogger("uvicorn.error").info("Uvicorn running on %s", "http://127.0.0.1:1")
        logging.getLogger("facegate.access").info("GET /healthz 200", extra={"fields": {"status": 200}})
        err = capsys.readouterr().err.strip().splitlines()
    finally:  # leave logging as it was for the other tests
        for lg, level, handlers, propagate in saved:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
    parsed = [json.loads(line) for line in err[-2:]]
    assert parsed[0]["logger"] == "uvicorn.error" and parsed[0]["message"].endswith("127.0.0.1:1")
    assert parsed[1]["status"] == 200


def test_a_500_is_logged_once_uvicorns_copy_of_its_traceback_is_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    import logging.config

    from app.api.errors import unhandled_error_handler

    config = uvicorn_log_config(LogSettings(format=LogFormat.json, level="info"))
    touched = [logging.getLogger(), *(logging.getLogger(name) for name in config["loggers"])]
    saved = [(lg, lg.level, list(lg.handlers), lg.propagate) for lg in touched]
    logging.config.dictConfig(config)
    try:
        logged, other = RuntimeError("a bug"), RuntimeError("another bug")
        request = Request({"type": "http", "method": "GET", "path": "/x", "headers": [], "app": None})
        asyncio.run(unhandled_error_handler(request, logged))
        # What uvicorn logs once Starlette's ServerErrorMiddleware re-raises the exception it answered with a 500.
        logging.getLogger("uvicorn.error").error("Exception in ASGI application\n", exc_info=logged)
        logging.getLogger("uvicorn.error").error("Exception in ASGI application\n", exc_info=other)
        err = capsys.readouterr().err.strip().splitlines()
    finally:
        for lg, level, handlers, propagate in saved:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
    lines = [json.loads(line) for line in err]
    assert [(line["logger"], "a bug" in line["exception"]) for line in lines] == [
        ("app.api.errors", True),
        ("uvicorn.error", False),  # an exception nobody logged yet still is
    ]
