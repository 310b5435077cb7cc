"""The worker's budget of request-body bytes held at once (FACEGATE_IMAGE__MAX_INFLIGHT_BYTES).

Photos are kept in memory, so without it many large uploads at once would take a worker past its memory. Requests
are driven straight through the real app's ASGI interface, on the event loop its lifespan runs on (the test client's
portal), with a receive() that hands the body over chunk by chunk and can stop half-way until told to go on: several
requests are then in flight at once, deterministically. The app's models are never loaded: POST /calibrate with
labelled distances (JSON) is the body-reading route that needs none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Scope

from app.api.middleware import BodyBudget
from app.config import ImageSettings, Settings, describe_settings_error
from app.main import create_app
from tests.api.conftest import api_settings, error_of, running

pytestmark = pytest.mark.model  # the app opens the built models' manifest (they are never loaded)

LIMIT = 4_000  # image.max_upload_bytes
BUDGET = 2 * LIMIT  # image.max_inflight_bytes
CHUNK = 1_000
JSON = {"content-type": "application/json"}
T = TypeVar("T")


def calibrate_body(size: int) -> bytes:
    """A valid POST /calibrate body (labelled distances, so no model runs) of exactly `size` bytes."""
    text = json.dumps({"source": "pairs", "same": [0.1] * 20, "different": [0.9] * 20})
    assert len(text) <= size
    return (text + " " * (size - len(text))).encode()  # JSON allows trailing whitespace


def budget_settings(models_dir: Path, tmp_path: Path) -> Settings:
    return api_settings(
        models_dir,
        f"sqlite:///{tmp_path / 'gallery.db'}",
        image={"max_upload_bytes": LIMIT, "max_inflight_bytes": BUDGET},
        preload_models=False,
    )


@pytest.fixture
def budget_client(models_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    """An app whose body limit is 4 kB and whose budget is 8 kB."""
    with running(budget_settings(models_dir, tmp_path)) as c:
        yield c


def budget_of(client: TestClient) -> BodyBudget:
    budget = client.app.state.body_budget  # type: ignore[attr-defined]
    assert isinstance(budget, BodyBudget)
    return budget


def on_app_loop(client: TestClient, scenario: Callable[[], Awaitable[T]]) -> T:
    """Run `scenario` on the event loop the app's lifespan runs on, as a worker's requests all run on its one loop."""
    assert client.portal is not None
    return client.portal.call(scenario)


class Upload:
    """One POST driven through the ASGI app. Its body goes in `chunks`, one per receive(); with `hold_at`, the
    receive() for that chunk waits until `resume()` (a client uploading slowly). `disconnect_at`: that receive()
    answers that the client has gone instead. The Content-Length is declared unless `declare` is False (chunked).
    `request_headers` are sent too (an API key), or instead of the JSON Content-Type."""

    def __init__(
        self,
        app: ASGIApp,
        body: bytes,
        *,
        path: str = "/calibrate",
        declare: bool = True,
        hold_at: int | None = None,
        disconnect_at: int | None = None,
        request_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.request_headers = {"content-type": "application/json"} | {
            name.lower(): value for name, value in (request_headers or {}).items()
        }
        self.path = path
        self.chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
        self.declare = declare
        self.hold_at = hold_at
        self.disconnect_at = disconnect_at
        self.reads = 0  # receive() calls the app made
        self.sent: list[Message] = []
        self.error: BaseException | None = None
        self.held = asyncio.Event()  # set once the upload waits at hold_at
        self._resume = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Upload:
        self.task = asyncio.create_task(self._run())
        return self

    def resume(self) -> None:
        self._resume.set()

    async def finished(self) -> Upload:
        assert self.task is not None
        await self.task
        return self

    async def _run(self) -> None:
        headers = [(b"host", b"testserver")]
        headers += [(name.encode(), value.encode()) for name, value in self.request_headers.items()]
        if self.declare:
            headers.append((b"content-length", str(sum(map(len, self.chunks))).encode()))
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        try:
            await self.app(scope, self._receive, self._send)
        except Exception as error:  # a real server logs it; the test looks at what the client got
            self.error = error

    async def _receive(self) -> Message:
        index = self.reads
        self.reads += 1
        if index == self.hold_at:
            self.held.set()
            await self._resume.wait()
        if index == self.disconnect_at:
            return {"type": "http.disconnect"}
        if index >= len(self.chunks):
            await asyncio.Event().wait()  # the whole body was sent: nothing more until the answer
        more = index < len(self.chunks) - 1
        return {"type": "http.request", "body": self.chunks[index], "more_body": more}

    async def _send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode().lower(): v.decode() for k, v in self.sent[0]["headers"]}

    def json(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))


def assert_busy(upload: Upload) -> None:
    assert upload.error is None and upload.status == 503, upload.sent
    assert upload.headers["retry-after"] == "1" and upload.headers["connection"] == "close"
    error = upload.json()["error"]
    assert error["code"] == "server_busy" and error["message"]
    assert error["details"] == {"limit_bytes": BUDGET, "retry_after_seconds": 1}


def test_uploads_over_the_budget_are_refused_while_those_that_fit_are_answered(budget_client: TestClient) -> None:
    """Two slow uploads have sent 6 of the 8 kB budget: a third that declares 3 kB is refused before a byte is read,
    a chunked one is cut at the chunk that would go over (nothing after it is read), one of 2 kB still fits and is
    answered; once the slow ones are answered, the budget is whole again."""
    budget = budget_of(budget_client)

    async def scenario() -> list[Upload]:
        slow = [Upload(budget_client.app, calibrate_body(4_000), hold_at=3).start() for _ in range(2)]
        for upload in slow:
            await upload.held.wait()
        assert budget.held == 6_000  # what has arrived (3 of each one's 4 chunks), not what was declared
        scraped = budget_client.app.state.metrics.render().decode()  # type: ignore[attr-defined]  # as /metrics
        assert "facegate_request_body_bytes_held 6000.0" in scraped
        declared = await Upload(budget_client.app, calibrate_body(3_000)).start().finished()
        chunked = await Upload(budget_client.app, calibrate_body(4_000), declare=False).start().finished()
        fits = await Upload(budget_client.app, calibrate_body(2_000)).start().finished()
        assert budget.held == 6_000  # the refused and the answered gave their bytes back
        for upload in slow:
            upload.resume()
        return [declared, chunked, fits, *[await upload.finished() for upload in slow]]

    declared, chunked, fits, *slow = on_app_loop(budget_client, scenario)
    assert_busy(declared)
    assert declared.reads == 0  # refused before reading
    assert_busy(chunked)
    assert chunked.reads == 3  # 7 kB, 8 kB, then the chunk that would make 9 kB; the fourth was never read
    for answered in (fits, *slow):
        assert answered.error is None and answered.status == 200, answered.sent
        assert answered.json()["applied"] is False
    assert budget.held == 0
    full = budget_client.post("/calibrate", content=calibrate_body(LIMIT), headers=JSON)
    assert full.status_code == 200, full.text
    assert budget.held == 0
    assert "facegate_request_body_bytes_held 0.0" in budget_client.get("/metrics").text


def test_a_body_over_the_size_limit_is_still_413_when_the_budget_has_no_room(budget_client: TestClient) -> None:
    """A body too large for any worker is the client's error, whatever the load: retrying would not help."""

    async def scenario() -> tuple[Upload, Upload]:
        slow = [Upload(budget_client.app, calibrate_body(LIMIT), hold_at=3).start() for _ in range(2)]
        for upload in slow:
            await upload.held.wait()
        too_large = await Upload(budget_client.app, calibrate_body(LIMIT + 1)).start().finished()
        for upload in slow:
            upload.resume()
            await upload.finished()
        return too_large, slow[0]

    too_large, answered = on_app_loop(budget_client, scenario)
    assert too_large.status == 413 and too_large.json()["error"]["code"] == "request_too_large"
    assert answered.status == 200
    assert budget_of(budget_client).held == 0


def test_declaring_a_body_holds_nothing_until_it_is_sent(budget_client: TestClient) -> None:
    """Clients that declare the largest body and then send nothing do not lock the others out: only bytes that have
    arrived are held (else a few idle connections would refuse every upload, for free)."""
    budget = budget_of(budget_client)

    async def scenario() -> tuple[list[Upload], Upload]:
        idle = [Upload(budget_client.app, calibrate_body(LIMIT), hold_at=0).start() for _ in range(3)]
        for upload in idle:
            await upload.held.wait()
        assert budget.held == 0  # 12 kB declared against an 8 kB budget
        answered = await Upload(budget_client.app, calibrate_body(LIMIT)).start().finished()
        for upload in idle:
            upload.resume()
        return [await upload.finished() for upload in idle], answered

    idle, answered = on_app_loop(budget_client, scenario)
    assert answered.status == 200, answered.sent
    # Once they all send at once (12 kB, chunk by chunk in turn), the one whose chunk finds no room is refused and
    # gives its bytes back, and the others finish.
    assert [upload.status for upload in idle] == [200, 200, 503]
    assert budget.held == 0


def test_busy_answers_are_our_error_json(budget_client: TestClient) -> None:
    """As an HTTP client sees it, through the outer middleware (no-store), while two slow uploads hold 6 of the 8 kB
    budget."""

    async def hold() -> list[Upload]:
        slow = [Upload(budget_client.app, calibrate_body(4_000), hold_at=3).start() for _ in range(2)]
        for upload in slow:
            await upload.held.wait()
        return slow

    async def finish(slow: list[Upload]) -> list[int]:
        for upload in slow:
            upload.resume()
        return [(await upload.finished()).status for upload in slow]

    slow = on_app_loop(budget_client, hold)
    refused = budget_client.post("/calibrate", content=calibrate_body(3_000), headers=JSON)
    assert on_app_loop(budget_client, lambda: finish(slow)) == [200, 200]
    error = error_of(refused, 503, "server_busy")
    assert error["details"] == {"limit_bytes": BUDGET, "retry_after_seconds": 1}
    assert refused.headers["retry-after"] == "1" and refused.headers["cache-control"] == "no-store"
    assert budget_of(budget_client).held == 0


@pytest.mark.parametrize("declare", [True, False], ids=["declared", "chunked"])
def test_a_client_gone_mid_body_gives_its_bytes_back(budget_client: TestClient, declare: bool) -> None:
    async def scenario() -> Upload:
        upload = Upload(budget_client.app, calibrate_body(3_000), declare=declare, hold_at=2, disconnect_at=2).start()
        await upload.held.wait()
        assert budget_of(budget_client).held == 2_000  # the two chunks read, whatever was declared
        upload.resume()  # and the client is gone
        return await upload.finished()

    gone = on_app_loop(budget_client, scenario)
    assert gone.reads == 3
    assert budget_of(budget_client).held == 0


@pytest.mark.parametrize("path", ["/calibrate", "/enroll"])
def test_a_client_gone_mid_body_is_recorded_as_499_not_as_an_error(
    budget_client: TestClient, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A phone that drops its upload is not a server error: no traceback, no 500 in the metrics. The answer goes
    nowhere; the access log and metrics record nginx's 499. Both kinds of body: JSON (FastAPI reads it) and
    multipart (the form route reads it first)."""
    if path == "/enroll":
        body = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n' + b"x" * 2_500
        headers = {"content-type": "multipart/form-data; boundary=b"}
    else:
        body, headers = calibrate_body(3_000), {}

    async def scenario() -> Upload:
        return await Upload(budget_client.app, body, path=path, disconnect_at=2, request_headers=headers).start().finished()

    with caplog.at_level("INFO"):
        gone = on_app_loop(budget_client, scenario)
    assert gone.error is None and gone.status == 499, gone.sent
    assert gone.json()["error"]["code"] == "client_disconnected"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any(r.getMessage().startswith(f"POST {path} 499 ") for r in caplog.records if r.name == "facegate.access")
    assert budget_of(budget_client).held == 0


def test_a_cancelled_request_gives_its_bytes_back(budget_client: TestClient) -> None:
    """uvicorn cancels the requests still running at the end of the shutdown timeout."""

    async def scenario() -> None:
        upload = Upload(budget_client.app, calibrate_body(3_000), hold_at=1).start()
        await upload.held.wait()
        assert budget_of(budget_client).held == 1_000
        assert upload.task is not None
        upload.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upload.task  # ShutdownCutMiddleware answers it 503 shutting_down rather than re-raise

    on_app_loop(budget_client, scenario)
    assert budget_of(budget_client).held == 0


def test_bytes_count_until_the_answer_even_when_the_app_fails(models_dir: Path, tmp_path: Path) -> None:
    """The app holds a body while it works on it: its bytes still count after they have all been read, and are given
    back when the app fails too (a 500)."""
    app: FastAPI = create_app(budget_settings(models_dir, tmp_path))
    seen: list[int] = []

    @app.post("/boom")
    async def boom(request: Request) -> None:
        await request.body()
        seen.append(app.state.body_budget.held)
        raise RuntimeError("the app failed while it held the body")

    with TestClient(app, raise_server_exceptions=False) as client:
        error_of(client.post("/boom", content=b"x" * 3_000), 500, "internal_error")
        assert seen == [3_000]
        assert budget_of(client).held == 0
        chunked = client.post("/boom", content=iter([b"x" * 1_500, b"x" * 1_500]))
        error_of(chunked, 500, "internal_error")
        assert seen == [3_000, 3_000]
        assert budget_of(client).held == 0


def test_the_budget_must_hold_the_largest_body() -> None:
    defaults = ImageSettings()
    assert defaults.max_inflight_bytes == 256 * 1024 * 1024 >= defaults.max_upload_bytes
    with pytest.raises(ValidationError) as refused:
        Settings(image={"max_upload_bytes": 1_000, "max_inflight_bytes": 999})
    described = describe_settings_error(refused.value)
    assert "image.max_inflight_bytes (999) must be at least image.max_upload_bytes (1000)" in described
    assert Settings(image={"max_upload_bytes": 1_000, "max_inflight_bytes": 1_000}).image.max_inflight_bytes == 1_000


def test_every_route_that_reads_a_body_documents_server_busy() -> None:
    openapi = create_app().openapi()  # routes only: no I/O until the lifespan starts
    bodies = [
        (path, method, operation)
        for path, item in openapi["paths"].items()
        for method, operation in item.items()
        if "requestBody" in operation
    ]
    assert len(bodies) >= 9  # enrol, verify, identify (one and batch), embed, cluster, add face, patch, calibrate
    for path, method, operation in bodies:
        responses = operation["responses"]
        assert "server_busy" in responses["503"]["description"], (method, path)
        assert "request_too_large" in responses["413"]["description"], (method, path)
