"""The HTTP surface itself: error JSON everywhere, body limit, health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app import errors
from app.api.errors import status_for
from app.config import Settings
from app.logs import JsonFormatter
from tests.api.conftest import api_settings, error_of, running

Photo = Callable[[str], tuple[str, bytes, str]]
AMY = "bbt_amy/face-api__amy1.png"  # 12.7 kB


def test_every_core_error_has_an_http_status() -> None:
    """An exception added to app/errors.py without a status here would become a 500: catch that at test time."""
    classes = [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.FacegateError) and cls is not errors.FacegateError
    ]
    assert len(classes) >= 10
    for cls in classes:
        status = status_for(cls("x"))
        assert status is not None and 400 <= status < 600, cls
    assert status_for(errors.FacegateError("x")) is None  # the base class is not an answer: generic 500


@pytest.mark.parametrize("answer_started", [False, True])
def test_a_request_cut_at_shutdown_is_answered_503(answer_started: bool) -> None:
    """uvicorn cancels the requests still running when the shutdown timeout runs out: one not yet answering gets 503
    shutting_down (JSON, Connection: close) instead of uvicorn's plain 500 and a logged traceback; one whose answer had
    begun is left to uvicorn, which closes the connection."""
    from starlette.types import Message, Receive, Scope, Send

    from app.api.middleware import ShutdownCutMiddleware

    async def stuck(scope: Scope, receive: Receive, send: Send) -> None:
        if answer_started:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.Event().wait()  # an upload that never ends, or a request waiting on its thread

    async def main() -> list[Message]:
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        scope: Scope = {"type": "http", "method": "POST", "path": "/enroll", "headers": []}
        task = asyncio.create_task(ShutdownCutMiddleware(stuck)(scope, receive, send))
        await asyncio.sleep(0.01)
        task.cancel()  # what uvicorn does at the end of --timeout-graceful-shutdown
        if answer_started:
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            await task
            assert scope["state"]["error_code"] == "shutting_down"
        return sent

    sent = asyncio.run(main())
    if answer_started:
        assert [m["type"] for m in sent] == ["http.response.start"]
        return
    assert sent[0]["status"] == 503 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "shutting_down"


def test_creating_the_app_opens_nothing(tmp_path: Path) -> None:
    """create_app only wires things up: models and database are opened by the lifespan, which refuses to start
    when the models are missing."""
    from app.main import create_app

    settings = Settings(models_dir=tmp_path / "no-models", database_url=f"sqlite:///{tmp_path / 'gallery.db'}")
    app = create_app(settings)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(errors.ModelUnavailable), TestClient(app):
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def small_limit_client(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """An app whose body limit (image.max_upload_bytes) is 64 kB."""
    db = tmp_path_factory.mktemp("limit") / "gallery.db"
    with running(api_settings(models_dir, f"sqlite:///{db}", image={"max_upload_bytes": 64_000})) as c:
        yield c


@pytest.mark.model
class TestErrorShape:
    def test_unknown_route_and_method(self, shared_client: TestClient) -> None:
        error_of(shared_client.get("/no/such/route"), 404, "not_found")
        error_of(shared_client.delete("/healthz"), 405, "method_not_allowed")
        error_of(shared_client.get("/enroll"), 405, "method_not_allowed")

    def test_answers_are_not_cached(self, shared_client: TestClient, photo: Photo, settings: Settings) -> None:
        """Names, metadata and decisions about people are personal data: no browser or proxy cache keeps them."""
        enrolled = shared_client.post("/enroll", files={"image": photo(AMY)}, data={"name": "Cache Test"})
        identity = enrolled.json()["identity_id"]
        answers = [
            enrolled,
            shared_client.get("/identities"),
            shared_client.get(f"/identities/{identity}"),
            shared_client.post("/identify", files={"image": photo(AMY)}),
            shared_client.get("/no/such/route"),  # errors too
            shared_client.post("/enroll", data={"name": "x"}),
        ]
        for r in answers:
            assert r.headers["cache-control"] == "no-store", r.request.url
        assert shared_client.delete(f"/identities/{identity}").headers["cache-control"] == "no-store"
        assert shared_client.get("/ui").headers["cache-control"] == "no-cache"  # the console's own policy stays
        with running(api_settings(settings.models_dir, settings.database_url, image={"max_upload_bytes": 1000})) as c:
            refused = c.post("/identify", files={"image": photo(AMY)})
            assert (refused.status_code, refused.headers["cache-control"]) == (413, "no-store")

    def test_trailing_slashes(self, shared_client: TestClient, photo: Photo) -> None:
        """No absolute http:// redirect (wrong behind a TLS proxy) and no 307 that makes a client upload again: reads
        get a relative 308, writes a 404 that names the path meant."""
        for method, path, location in [
            ("GET", "/identities/?limit=2", "/identities?limit=2"),
            ("HEAD", "/healthz/", "/healthz"),
            ("GET", "/docs/", "/docs"),
        ]:
            r = shared_client.request(method, path, follow_redirects=False)
            assert (r.status_code, r.headers["location"]) == (308, location), path
        assert shared_client.get("/identities/").status_code == 200  # followed
        enrol = shared_client.post("/enroll/", files={"image": photo(AMY)}, data={"name": "x"})
        message = error_of(enrol, 404, "not_found")["message"]
        assert message == "no route POST /enroll/; did you mean /enroll? (facegate's paths have no trailing slash)"
        error_of(shared_client.get("/no/such/route/"), 404, "not_found")
        # A path that would become another host as a Location ("//host") is never a redirect.
        error_of(shared_client.get("http://testserver//identities/", follow_redirects=False), 404, "not_found")

    def test_validation_errors_are_never_fastapis_default_shape(self, shared_client: TestClient) -> None:
        r = shared_client.post("/enroll", data={"name": "x"})  # no image
        error = error_of(r, 422, "invalid_request")
        assert "detail" not in r.json()
        assert error["details"]["errors"][0]["loc"] == ["image"]
        assert "input" not in error["details"]["errors"][0]  # inputs (uploads, secrets) are never echoed

    def test_json_sent_to_a_multipart_endpoint(self, shared_client: TestClient) -> None:
        error_of(shared_client.post("/identify", json={"image": "aGVsbG8="}), 422, "invalid_request")

    def test_malformed_json_body(self, shared_client: TestClient) -> None:
        r = shared_client.patch(
            f"/identities/{'0' * 32}", content=b"{not json", headers={"content-type": "application/json"}
        )
        error_of(r, 422, "invalid_request")

    def test_unexpected_failures_are_a_generic_500(self, settings: Settings) -> None:
        from app.main import create_app

        app = create_app(settings)

        @app.get("/boom")
        async def boom() -> None:
            raise RuntimeError("secret internals at /srv/facegate/db.py line 42")

        with TestClient(app, raise_server_exceptions=False) as client:
            r = client.get("/boom")
        error = error_of(r, 500, "internal_error")
        assert "secret" not in r.text and "/srv" not in r.text and "RuntimeError" not in r.text
        assert "incident" in error["message"]


@pytest.mark.model
class TestBodyLimit:
    def test_declared_length_over_the_limit(self, small_limit_client: TestClient, photo: Photo) -> None:
        big = ("big.jpg", b"\xff" * 100_000, "image/jpeg")
        error = error_of(
            small_limit_client.post("/enroll", files={"image": big}, data={"name": "x"}), 413, "request_too_large"
        )
        assert error["details"] == {"limit_bytes": 64_000}
        assert small_limit_client.get("/identities").json()["total"] == 0  # nothing stored

    def test_streamed_body_without_length(self, small_limit_client: TestClient) -> None:
        def chunks() -> Iterator[bytes]:
            for _ in range(20):
                yield b"x" * 10_000

        r = small_limit_client.post(
            "/identify", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert "content-length" not in {k.lower() for k in r.request.headers}
        error_of(r, 413, "request_too_large")

    def test_every_route_is_covered(self, small_limit_client: TestClient) -> None:
        error_of(
            small_limit_client.patch(f"/identities/{'0' * 32}", json={"metadata": {"blob": "x" * 100_000}}),
            413,
            "request_too_large",
        )

    def test_a_photo_under_the_limit_still_works(self, small_limit_client: TestClient, photo: Photo) -> None:
        r = small_limit_client.post("/enroll", files={"image": photo(AMY)}, data={"name": "Amy"})
        assert r.status_code == 201, r.text


@pytest.mark.model
class TestHealth:
    def test_healthz(self, shared_client: TestClient) -> None:
        r = shared_client.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}

    def test_probes_may_use_head(self, shared_client: TestClient) -> None:
        for path in ("/healthz", "/readyz"):
            r = shared_client.head(path)
            assert r.status_code == 200 and r.content == b"", path

    def test_every_get_route_answers_head(self, shared_client: TestClient, photo: Photo) -> None:
        """RFC 9110: a server that answers GET answers HEAD (uptime checks, link checkers): the GET route's status and
        headers, no body. It was 405 on every route but the probes, the console and the docs."""
        enrolled = shared_client.post("/enroll", files={"image": photo(AMY)}, data={"name": "Head Test"}).json()
        schema = shared_client.get("/openapi.json").json()
        gets = [path for path, item in schema["paths"].items() if "get" in item]
        assert {"/identities", "/identities/{identity_id}", "/calibration", "/metrics", "/admin/index"} <= set(gets)
        for path in gets:
            url = path.replace("{identity_id}", enrolled["identity_id"]).replace("{face_id}", enrolled["face_id"])
            head, get = shared_client.head(url), shared_client.get(url)
            assert (head.status_code, head.content) == (get.status_code, b""), url
            assert head.headers["content-type"] == get.headers["content-type"], url
            if path != "/identities/{identity_id}/faces/{face_id}/image":  # no photo is stored by default: 404
                assert get.status_code == 200, url
        missing = shared_client.head(f"/identities/{'0' * 32}")
        assert (missing.status_code, missing.content) == (404, b"")
        # HEAD adds no operation to the schema (only the probes document theirs).
        assert [path for path, item in schema["paths"].items() if "head" in item] == ["/healthz", "/readyz"]

    def test_a_405_names_every_method_of_the_path(self, shared_client: TestClient) -> None:
        """The Allow header lists what the path takes, from all its routes: the router's own named only the first
        route's methods (`GET` for `PUT /identities/{id}`, which also takes PATCH and DELETE)."""
        for method, path, allow in [
            ("PUT", f"/identities/{'0' * 32}", "DELETE, GET, HEAD, PATCH"),
            ("DELETE", "/metrics", "GET, HEAD"),
            ("GET", "/enroll", "POST"),
            ("POST", "/calibration", "DELETE, GET, HEAD"),
            ("POST", "/ui", "GET, HEAD"),
        ]:
            r = shared_client.request(method, path)
            error_of(r, 405, "method_not_allowed")
            assert r.headers["allow"] == allow, (method, path)

    def test_readyz(self, client: TestClient, photo: Photo) -> None:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["ready"] is True and body["problems"] == []
        assert body["models_loaded"] is True and body["database"] is True
        assert body["providers"] == {"detector": "CPUExecutionProvider", "embedder": "CPUExecutionProvider"}
        assert body["gallery_size"] == 0 and body["stale_faces"] == 0
        assert body["model_version"].startswith("dlib-resnet-v1")
        assert client.post("/enroll", files={"image": photo(AMY)}, data={"name": "Amy"}).status_code == 201
        assert client.get("/readyz").json()["gallery_size"] == 1

    def test_readyz_counts_what_other_workers_wrote(self, settings: Settings, photo: Photo) -> None:
        # Two apps on one database, as two uvicorn workers: a probe of the idle one shows the other's enrolment.
        with running(settings) as writer, running(settings) as idle:
            assert idle.get("/readyz").json()["gallery_size"] == 0
            assert writer.post("/enroll", files={"image": photo(AMY)}, data={"name": "Amy"}).status_code == 201
            ready = idle.get("/readyz").json()
            assert (ready["gallery_size"], ready["identities"]) == (1, 1)
            assert "facegate_gallery_faces 1.0" in idle.get("/metrics").text

    def test_not_ready_without_a_database(self, settings: Settings) -> None:
        with running(settings) as client:
            client.app.state.service.gallery.engine.dispose()  # type: ignore[attr-defined]
            # point the engine at a database that cannot be opened
            from sqlalchemy import create_engine

            client.app.state.service.gallery.engine = create_engine(  # type: ignore[attr-defined]
                f"sqlite:///{settings.models_dir}/missing-dir/x.db"
            )
            r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["ready"] is False and r.json()["database"] is False
        assert r.json()["problems"] == ["database unreachable"]

    def test_metrics(self, client: TestClient, photo: Photo) -> None:
        client.post("/verify", files={"image_a": photo(AMY), "image_b": photo(AMY)})
        client.get(f"/identities/{'0' * 32}")
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        for expected in (
            'facegate_decisions_total{endpoint="verify",outcome="match"} 1.0',
            'facegate_decision_distance_count{endpoint="verify"} 1.0',
            'facegate_request_duration_seconds_count{method="POST",route="/verify",status="200"} 1.0',
            # route templates, not raw paths: ids do not explode the label set
            'facegate_request_duration_seconds_count{method="GET",route="/identities/{identity_id}",status="404"} 1.0',
            "facegate_gallery_faces 0.0",
            'facegate_provider_info{network="detector",provider="CPUExecutionProvider"} 1.0',
            'facegate_provider_info{network="embedder",provider="CPUExecutionProvider"} 1.0',
            # the micro-batcher's calls: two photos, each alone (so with every core), one face each
            'facegate_inference_batch_items_count{network="detector",wide="true"} 2.0',
            'facegate_inference_batch_size_sum{network="detector"} 2.0',
            'facegate_inference_batch_size_sum{network="embedder"} 2.0',
        ):
            assert expected in text, expected
        assert "0" * 32 not in text

    def test_a_scrape_does_not_wait_for_a_busy_index(self, client: TestClient) -> None:
        """The scrape runs on the event loop: while a load, a replay or an index build holds the index's lock, it
        answers at once with the gauge it had (blocking there would stall every request of the worker)."""
        index = client.app.state.service.gallery.index  # type: ignore[attr-defined]
        answers: list[int] = []
        scrape = threading.Thread(target=lambda: answers.append(client.get("/metrics").status_code), daemon=True)
        with index._lock:  # what a rebuild holds
            scrape.start()
            scrape.join(timeout=10)
            answered_while_busy = not scrape.is_alive()
        scrape.join(timeout=10)
        assert answered_while_busy and answers == [200]
        assert "facegate_gallery_faces " in client.get("/metrics").text

    def test_metrics_series_are_bounded_and_impersonal(
        self, client: TestClient, photo: Photo, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A scanner's random paths, ids, methods and query strings add no series after the first round of each
        kind, and nothing a client sent (a name, metadata, an id, a key in a query) appears in /metrics or a log."""
        name, badge, key = "Zebulon Quartermain", "badge-Q7ZXW", "fg_0123abcd_" + "k" * 40
        r = client.post("/enroll", files={"image": photo(AMY)}, data={"name": name, "metadata": f'{{"badge": "{badge}"}}'})
        assert r.status_code == 201, r.text
        identity = r.json()["identity_id"]
        client.get(f"/identities/{identity}")
        sent: list[str] = [name, badge, key, identity]

        def probe(round_no: int) -> set[str]:
            token = f"zz{round_no}q{uuid.uuid4().hex[:10]}"
            sent.append(token)
            client.get(f"/identities/{token}")
            client.get(f"/identities/{token}/faces/{token}")
            client.delete(f"/identities/{token}")
            client.get(f"/{token}")
            client.get(f"/{token}/{token}/")
            client.get(f"/ui/{token}")
            client.post(f"/enroll/{token}")
            client.request(token.upper(), "/enroll")  # uvicorn (h11) passes any method token
            client.request(token.upper(), f"/{token}")
            client.get(f"/identities?name={token}&api_key={key}")
            client.get(f"/healthz?api_key={key}&{token}=1")
            text = client.get("/metrics").text
            return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}

        caplog.set_level(logging.INFO)
        probe(0)  # each kind of request once (and /metrics itself)
        series = probe(1)
        assert probe(2) == series and probe(3) == series  # new random values, no new series
        text = client.get("/metrics").text
        assert 'method="OTHER",route="/enroll",status="405"' in text
        ours = [record for record in caplog.records if not record.name.startswith("httpx")]  # not the test client's
        logged = "\n".join(JsonFormatter().format(record) for record in ours)
        assert '"method": "OTHER"' in logged
        for value in sent:
            assert value not in text, value
            assert value not in logged and value.upper() not in logged, value


@pytest.mark.model
def test_openapi_documents_every_error(shared_client: TestClient) -> None:
    schema = shared_client.get("/openapi.json").json()
    assert "ErrorResponse" in schema["components"]["schemas"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # FastAPI's default 422 shape is gone
    routes = {(path, method) for path, item in schema["paths"].items() for method in item}
    assert {
        ("/enroll", "post"),
        ("/verify", "post"),
        ("/identify", "post"),
        ("/identities/{identity_id}", "delete"),
    } <= routes
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            if path in ("/healthz", "/metrics"):
                continue
            for status in ("422", "500", "503"):
                ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
                expected = "/Readiness" if (path, status) == ("/readyz", "503") else "/ErrorResponse"  # not ready
                assert ref.endswith(expected), (path, method, status)
            assert "shutting_down" in responses["503"]["description"], (path, method)  # any request, at shutdown
    assert {"404", "413", "422"} <= set(schema["paths"]["/enroll"]["post"]["responses"])
    docs = shared_client.get("/docs")
    assert docs.status_code == 200 and "cdn." not in docs.text and "https://" not in docs.text
    for asset, kind in (("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css")):
        served = shared_client.get(f"/docs/{asset}")
        assert f'"/docs/{asset}"' in docs.text
        assert served.status_code == 200 and served.headers["content-type"].startswith(kind)
        assert served.headers["cache-control"] == "public, max-age=86400" and len(served.content) > 100_000
    error_of(shared_client.get("/docs/..%2Fconfig.py"), 404, "not_found")
    # HEAD, as uptime checks and link checkers send it: the headers of GET, no body (405 before)
    for path in ("/docs", "/docs/swagger-ui.css", "/ui", "/ui/app.js"):
        head, get = shared_client.head(path), shared_client.get(path)
        assert head.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
        assert head.headers["content-length"] == str(len(get.content)), path
    assert shared_client.head("/ui/nothing.js").status_code == 404
    behind_proxy = TestClient(shared_client.app, root_path="/facegate").get("/docs").text  # a proxy's prefix
    assert "url: '/facegate/openapi.json'" in behind_proxy and '"/facegate/docs/swagger-ui-bundle.js"' in behind_proxy
    # Client generators name methods after operation ids: two operations with one id collide (GET and HEAD on one route
    # had that), so every id is unique and the probes' HEAD is documented.
    ids = [operation["operationId"] for item in schema["paths"].values() for operation in item.values()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert {"get", "head"} <= set(schema["paths"]["/healthz"]) and {"get", "head"} <= set(schema["paths"]["/readyz"])


def test_the_docs_page_cannot_be_framed_and_runs_only_its_own_scripts(shared_client: TestClient) -> None:
    """/docs is where an operator types an admin key and clicks "Execute" on DELETEs: another site may not frame it
    (clickjacking), and its CSP allows this origin's script and the page's own inline one, by hash, nothing else."""
    for client in (shared_client, TestClient(shared_client.app, root_path="/facegate")):
        page = client.get("/docs")
        policy = {d.split()[0]: d.split()[1:] for d in page.headers["content-security-policy"].split("; ")}
        assert policy["frame-ancestors"] == ["'none'"] and policy["object-src"] == ["'none'"]
        inline = re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL)
        assert len(inline) == 1 and "'unsafe-inline'" not in policy["script-src"]
        digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
        assert policy["script-src"] == ["'self'", f"'sha256-{digest}'"]
        assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert client.head("/docs").headers["content-security-policy"] == page.headers["content-security-policy"]


def test_unknown_and_repeated_query_parameters_are_refused(shared_client: TestClient) -> None:
    """Every API route: a query parameter it does not take is refused, not ignored (`POST /verify?threshold=0.2`
    decided at the default threshold), and so is one sent twice; the probes, metrics, console and docs take any."""
    schema = shared_client.get("/openapi.json").json()
    checked = 0
    for path, item in schema["paths"].items():
        url = path.replace("{identity_id}", "0" * 32).replace("{face_id}", "1" * 32)
        for method, operation in item.items():
            takes = sorted(p["name"] for p in operation.get("parameters", []) if p["in"] == "query")
            if path in ("/healthz", "/readyz", "/metrics", "/metrics/summary"):
                assert shared_client.request(method, f"{url}?verbose=1").status_code == 200, (method, path)
                continue
            details = error_of(shared_client.request(method, f"{url}?thresold=0.2"), 422, "invalid_request")["details"]
            assert details["unknown_query_parameters"] == ["thresold"], (method, path)
            assert details["allowed_query_parameters"] == takes, (method, path)
            for name in takes:
                repeated = shared_client.request(method, f"{url}?{name}=1&{name}=2")
                assert error_of(repeated, 422, "invalid_request")["details"] == {"repeated_query_parameters": [name]}
            checked += 1
    assert checked >= 15  # every operation of the API but the four above
    assert shared_client.get("/identities?limit=2&name=x").status_code == 200  # what a route takes still works
    for path in ("/ui?v=2", "/docs?v=2", "/docs/swagger-ui.css?v=2"):
        assert shared_client.get(path).status_code == 200, path


@pytest.mark.model
def test_large_photos_never_touch_the_disk(
    shared_client: TestClient, dev_faces: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starlette spools uploads over 1 MB to a temporary file; a photo (biometric data) must stay in memory."""
    import io
    import tempfile

    from PIL import Image

    rolled: list[int] = []
    original = tempfile.SpooledTemporaryFile.rollover

    def watched(self: tempfile.SpooledTemporaryFile[bytes]) -> None:
        rolled.append(1)
        original(self)

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", watched)
    with Image.open(dev_faces / AMY) as small:
        big = small.convert("RGB").resize((small.width * 6, small.height * 6))
    buffer = io.BytesIO()
    big.save(buffer, format="PNG", compress_level=0)  # uncompressed: over the 1 MB spool size
    data = buffer.getvalue()
    assert 1_500_000 < len(data) < 20 * 1024 * 1024
    r = shared_client.post("/identify", files={"image": ("big.png", data, "image/png")})
    assert r.status_code in (200, 422), r.text  # whatever the answer, the bytes were read in memory
    assert rolled == []
