"""Time limits on a request's arrival (FACEGATE_REQUEST_TIMEOUT, FACEGATE_REQUEST_IDLE_TIMEOUT): uvicorn alone waits
for a silent or trickling client for ever.

A real uvicorn server runs in a thread with the protocol `facegate serve` uses, its limits cut to a fraction of a
second, and a small ASGI app that reads the whole body and answers with its length; clients are raw sockets, so
that they can stop half-way. The last test runs `facegate serve` itself, with the real app.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from app.api import request_timeouts
from app.api.request_timeouts import TimedH11Protocol
from tests.system.live import LiveServer

# Wide margins against a loaded machine: the steady client's gaps are under half of IDLE.
TIMEOUT = 1.5  # request_timeout, seconds
IDLE = 0.6  # request_idle_timeout


@dataclass
class Recorder:
    """A tiny app: reads the body (after `delay_before_read` seconds) and answers 200 with its length; with
    `answer_first`, answers 200 at once and reads nothing. Records whether it was told the client left."""

    delay_before_read: float = 0.0
    answer_first: bool = False
    close_first: bool = False  # answer_first, closing the connection (as a 413 for a body over the limit does)
    disconnects: list[str] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        if self.answer_first or self.close_first:
            await self._answer(send, b"early", close=self.close_first)
            return
        await asyncio.sleep(self.delay_before_read)
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects.append(scope["path"])
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await self._answer(send, str(size).encode())

    @staticmethod
    async def _answer(send: Any, body: bytes, *, close: bool = False) -> None:
        headers = [(b"content-length", str(len(body)).encode())] + ([(b"connection", b"close")] if close else [])
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@contextmanager
def serving(app: Recorder) -> Iterator[int]:
    """uvicorn on a free loopback port, in a thread, with TimedH11Protocol at TIMEOUT / IDLE."""
    protocol = type("QuickProtocol", (TimedH11Protocol,), {"request_timeout": TIMEOUT, "request_idle_timeout": IDLE})
    server = uvicorn.Server(uvicorn.Config(app, http=protocol, lifespan="off", log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port))
    conn.settimeout(10 * TIMEOUT)  # a server that never cuts the connection fails the test instead of hanging it
    return conn


def read_until_closed(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def answers(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each HTTP/1.1 answer in `data` (every one has a Content-Length)."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = answers_length(head)
        found.append((int(head.split()[1]), rest[:length]))
        data = rest[length:]
    return found


def read_answer(conn: socket.socket) -> bytes:
    """One whole answer, the connection left open."""
    data = b""
    while True:
        data += conn.recv(65536)
        head, found, body = data.partition(b"\r\n\r\n")
        if found and len(body) >= answers_length(head):
            return data


def answers_length(head: bytes) -> int:
    return int(next(line.split(b":")[1] for line in head.split(b"\r\n")[1:] if line.lower().startswith(b"content-length:")))


def head(data: bytes) -> bytes:
    """The head of the first answer in `data`, names lower-cased, ending in CRLF."""
    return data.partition(b"\r\n\r\n")[0].lower() + b"\r\n"


def post_head(length: int, path: str = "/upload") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()


def timed_out(body: bytes) -> dict[str, Any]:
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout"
    return dict(error)


def test_a_connection_that_sends_nothing_is_closed_without_an_answer() -> None:
    with serving(Recorder()) as port, connect(port) as conn:
        start = time.monotonic()
        assert read_until_closed(conn) == b""
        assert IDLE * 0.9 <= time.monotonic() - start < TIMEOUT


def test_headers_that_stop_coming_get_408() -> None:
    with serving(Recorder()) as port, connect(port) as conn:
        conn.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Le")
        start = time.monotonic()
        data = read_until_closed(conn)
        [(status, body)] = answers(data)
        assert IDLE * 0.9 <= time.monotonic() - start < TIMEOUT
    assert status == 408
    assert "FACEGATE_REQUEST_IDLE_TIMEOUT" in timed_out(body)["message"]
    assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}\r\n", head(data)), data  # README: every answer has one


def test_the_next_request_on_a_kept_alive_connection_gets_408_when_it_stops() -> None:
    with serving(Recorder()) as port, connect(port) as conn:
        conn.sendall(post_head(2) + b"xx")
        assert answers(read_answer(conn)) == [(200, b"2")]
        conn.sendall(b"GET / HTTP/1.1\r\nHo")
        [(status, body)] = answers(read_until_closed(conn))
    assert status == 408 and "FACEGATE_REQUEST_IDLE_TIMEOUT" in timed_out(body)["message"]


def test_a_body_that_stops_coming_gets_408_and_the_app_is_told_the_client_left() -> None:
    app = Recorder()
    with serving(app) as port, connect(port) as conn:
        conn.sendall(post_head(1000) + b"x" * 100)
        [(status, body)] = answers(read_until_closed(conn))
    assert status == 408 and f"no data came for {IDLE:g} s" in timed_out(body)["message"]
    deadline = time.monotonic() + 5
    while not app.disconnects and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app.disconnects == ["/upload"]


def test_a_trickle_is_cut_when_the_request_timeout_runs_out() -> None:
    """A byte every IDLE / 4 never lets the idle limit run out; the request's own limit does."""
    with serving(Recorder()) as port, connect(port) as conn:
        start = time.monotonic()
        conn.sendall(post_head(1000))
        with pytest.raises(OSError):  # the server closes the connection under the trickle
            for _ in range(int(10 * TIMEOUT / (IDLE / 4))):
                conn.sendall(b"x")
                time.sleep(IDLE / 4)
        elapsed = time.monotonic() - start
        data = read_until_closed(conn)
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 1.0
    [(status, body)] = answers(data)
    assert status == 408 and "FACEGATE_REQUEST_TIMEOUT" in timed_out(body)["message"]


def test_slow_but_steady_requests_pass_each_on_its_own_clock() -> None:
    """Two requests on one kept-alive connection, each taking ~60 % of the limit: together longer than it."""
    with serving(Recorder()) as port, connect(port) as conn:
        start = time.monotonic()
        for _ in range(2):
            conn.sendall(post_head(8))
            for _ in range(4):
                time.sleep(TIMEOUT * 0.15)
                conn.sendall(b"xx")
            assert answers(read_answer(conn)) == [(200, b"8")]
            time.sleep(0.1)  # well inside uvicorn's keep-alive (5 s)
        assert time.monotonic() - start > TIMEOUT


def test_the_clocks_stop_while_the_server_is_not_reading() -> None:
    """uvicorn stops reading a body the app has not taken yet (64 KiB ahead); the client is not late then."""
    body = b"x" * (4 * 1024 * 1024)
    app = Recorder(delay_before_read=2 * TIMEOUT)
    with serving(app) as port, connect(port) as conn:
        conn.sendall(post_head(len(body)) + body)  # blocks until the app reads, 2.4 s on
        [(status, answer)] = answers(read_answer(conn))
    assert (status, answer) == (200, str(len(body)).encode()) and app.disconnects == []


def test_an_answered_request_whose_body_stops_is_closed_without_a_second_answer() -> None:
    """The app may answer before the body is in (as the API-key check does); the rest of the body must still come."""
    with serving(Recorder(answer_first=True)) as port, connect(port) as conn:
        conn.sendall(post_head(1000) + b"x" * 10)
        assert answers(read_until_closed(conn)) == [(200, b"early")]


def test_an_answer_that_closes_before_the_body_is_in_reaches_a_client_still_sending() -> None:
    """A refusal sent before the body is read (413 for a body over the limit, 401 without a key) closes the
    connection. Closed with the client's bytes unread, the kernel answered them with a reset, which threw away the
    answer the client had not read yet: it saw "connection reset" instead of the 413 (as most clients read only
    once they have sent everything). The server now stops writing and reads and drops the rest for a while first."""
    body = 16 * 1024 * 1024  # far more than the socket buffers hold: the client is still sending when refused
    with serving(Recorder(close_first=True)) as port, connect(port) as conn:
        conn.sendall(post_head(body))
        time.sleep(0.2)  # the answer is written and the connection closed meanwhile
        conn.sendall(b"x" * body)
        assert answers(read_until_closed(conn)) == [(200, b"early")]


@pytest.mark.model
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"GET /identities?limit=\xff HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    ],
    ids=["negative-length", "two-lengths", "gzip-chunked", "raw-byte-in-target", "nul-in-header"],
)
def test_a_malformed_request_gets_the_json_error_format(request_bytes: bytes) -> None:
    """h11 refuses these before the app sees them, and uvicorn answered in plain text ("Invalid HTTP request
    received."): every error of the API is {"error": {"code", "message"}}."""
    with serving(Recorder()) as port, connect(port) as conn:
        conn.sendall(request_bytes)
        data = read_until_closed(conn)
    ((status, body),) = answers(data)
    head = data.partition(b"\r\n\r\n")[0].lower()
    assert status == 400 and b"content-type: application/json" in head and b"connection: close" in head
    assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}\r\n", head + b"\r\n"), head  # README: every answer has one
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_request" and "malformed" in error["message"]


def test_facegate_serve_cuts_a_stalled_upload(models_dir: Path, tmp_path: Path) -> None:
    """`facegate serve` runs uvicorn with the limits from the settings: an upload that stops half-way gets the 408
    in our error format, the worker holds none of its bytes afterwards, and the access log and metrics record the
    408 (not an error with a traceback)."""
    server = LiveServer(
        f"sqlite:///{tmp_path / 'serve.db'}",
        models_dir,
        tmp_path,
        workers=1,
        cli=True,
        environment={"FACEGATE_PRELOAD_MODELS": "false", "FACEGATE_REQUEST_IDLE_TIMEOUT": "0.5"},
    )
    server.start()
    try:
        request = (
            b"POST /enroll HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"X-Request-ID: upload-from-a-phone\r\nContent-Length: 100000\r\n\r\n"
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        )
        with connect(server.port) as conn:
            conn.sendall(request + b"\xff\xd8" + b"x" * 5000)
            data = read_until_closed(conn)
            [(status, body)] = answers(data)
        assert status == 408, server.log_text()
        # The id the client sent, as every answer carries it and as its access line names it: the 408 is written by
        # the protocol, past the app's middlewares, and had none.
        assert b"\r\nx-request-id: upload-from-a-phone\r\n" in head(data), data
        assert "FACEGATE_REQUEST_IDLE_TIMEOUT" in timed_out(body)["message"]
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
        assert "facegate_request_body_bytes_held 0.0" in metrics, metrics
        assert 'facegate_request_duration_seconds_count{method="POST",route="/enroll",status="408"} 1.0' in metrics, metrics
    finally:
        server.stop()
    text = server.log_text()
    assert "POST /enroll 408 " in text and "error=request_timeout" in text, text
    assert "request_id=upload-from-a-phone" in text, text
    assert "ERROR" not in text and "Traceback" not in text, text


def test_a_uvicorn_without_what_the_limits_read_serves_without_them(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The limits read uvicorn's internals (`RELIED_ON`). A uvicorn that renamed one must not fail every request:
    the connection is served as plain uvicorn would, and the log says the limits are off."""
    monkeypatch.setitem(request_timeouts.RELIED_ON, "flow", ("read_paused", "renamed_in_a_later_uvicorn"))
    with serving(Recorder()) as port, connect(port) as conn:
        conn.sendall(post_head(2) + b"xx")
        assert answers(read_answer(conn)) == [(200, b"2")]
        conn.sendall(post_head(4) + b"xx")  # stops half way: no limit cuts it
        conn.settimeout(TIMEOUT + IDLE)
        with pytest.raises(TimeoutError):
            conn.recv(1)
        conn.sendall(b"yy")
        conn.settimeout(10 * TIMEOUT)
        assert answers(read_answer(conn)) == [(200, b"4")]
    assert "request timeouts are off" in caplog.text and "flow.renamed_in_a_later_uvicorn" in caplog.text
