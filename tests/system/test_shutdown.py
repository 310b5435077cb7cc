"""SIGTERM to `facegate serve` (one worker, as the Docker image runs it) in the middle of concurrent POST /enroll, as
`docker stop` sends it: new connections are refused at once, the requests in flight finish (an upload still arriving
after the signal is answered), one still unfinished when FACEGATE_SHUTDOWN_TIMEOUT runs out is cut (503
shutting_down) and stores nothing, and the process exits 0 soon after. Nothing is half-written: every 201 is stored, every stored
identity is one whole enrolment some request sent. SQLite (WAL) and PostgreSQL."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.system.consistency import identity_names, read_database
from tests.system.live import LiveServer
from tests.system.traffic import CLIENT_TIMEOUT_S, ENROL_FORM, Ledger, enrol_until

pytestmark = [pytest.mark.model, pytest.mark.slow]

SHUTDOWN_TIMEOUT_S = 2  # FACEGATE_SHUTDOWN_TIMEOUT of the server under test
CLIENTS = 6
ACKS_BEFORE_SIGTERM = 4
BOUNDARY = "facegate-shutdown-test"


class RawUpload:
    """POST /enroll over a plain socket, its body sent in two parts, so that the request is surely in flight (headers
    and half the photo received) when the signal comes."""

    def __init__(self, port: int, photo: Path, name: str) -> None:
        fields = {**ENROL_FORM, "name": name}
        parts = [
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
            for key, value in fields.items()
        ]
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{photo.name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode()
            + photo.read_bytes()
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
        body = b"".join(parts)
        head = (
            f"POST /enroll HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.rest = body[len(body) // 2 :]
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S)
        self.socket.sendall(head + body[: len(body) // 2])

    def finish(self) -> tuple[int, dict[str, Any]]:
        """Send the rest of the body; the answer."""
        self.socket.sendall(self.rest)
        return self.answer()

    def answer(self) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) of the answer, read until the server closes the connection (Connection: close)."""
        chunks = []
        while chunk := self.socket.recv(65536):
            chunks.append(chunk)
        self.socket.close()
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" not in head.lower(), head
        return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"])
def test_sigterm_during_enrolments_finishes_them_and_exits_0(
    backend: str, request: pytest.FixtureRequest, models_dir: Path, lfw_photos: list[Path], tmp_path: Path
) -> None:
    url = request.getfixturevalue("pg_schema_url") if backend == "postgresql" else f"sqlite:///{tmp_path / 'g.db'}"
    server = LiveServer(
        url,
        models_dir,
        tmp_path,
        workers=1,
        cli=True,
        environment={"FACEGATE_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S), "FACEGATE_LOG__FORMAT": "json"},
    )
    ledger = Ledger()
    ledger.use_photos(lfw_photos)
    answered_after_sigterm: list[int] = []
    sigterm_at = float("inf")
    stop = threading.Event()

    def answered(response: httpx.Response) -> None:  # those sent as the server closed are refused or cut
        if time.monotonic() > sigterm_at:
            answered_after_sigterm.append(response.status_code)

    def client(k: int) -> None:
        enrol_until(stop, server.url, ledger, f"c{k}", answered)

    server.start()
    try:
        slow_photo, stalled_photo = ledger.next_photo(), ledger.next_photo()
        assert slow_photo is not None and stalled_photo is not None
        slow = RawUpload(server.port, slow_photo, "slow upload")
        stalled = RawUpload(server.port, stalled_photo, "stalled upload")  # never finished
        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(ledger.faces) < ACKS_BEFORE_SIGTERM:
            assert time.monotonic() < deadline, "enrolments did not get through"
            time.sleep(0.005)

        sigterm_at = time.monotonic()
        exited: list[tuple[int, float]] = []
        terminating = threading.Thread(target=lambda: exited.append(server.terminate(timeout=30)))
        terminating.start()
        time.sleep(0.5)
        stop.set()
        with pytest.raises(httpx.ConnectError):  # no new connection once the signal is in
            httpx.get(f"{server.url}/healthz", timeout=5)
        status, body = slow.finish()  # the upload in flight is still read and answered
        assert status == 201, body
        cut = stalled.answer()  # ... while the one that never finishes is cut at the timeout
        terminating.join()
        for thread in threads:
            thread.join()
    finally:
        server.kill()

    assert exited, "terminate() failed"
    code, seconds = exited[0]
    log = server.log_text()
    assert code == 0, log[-4000:]
    assert seconds < SHUTDOWN_TIMEOUT_S + 10, f"stopped after {seconds:.1f} s"
    assert cut[0] == 503 and cut[1]["error"]["code"] == "shutting_down", cut
    assert answered_after_sigterm and set(answered_after_sigterm) <= {201}, answered_after_sigterm

    database = read_database(url)  # no orphan face, whole embeddings, the change log replays to the face table
    _, acknowledged = ledger.expected()
    assert {f: i for f, i in acknowledged.items() if database.faces.get(f) != i} == {}, "acknowledged enrolments lost"
    assert database.faces[str(body["face_id"])] == body["identity_id"]
    faces_per_identity = dict.fromkeys(database.identities, 0)
    for identity_id in database.faces.values():
        faces_per_identity[identity_id] += 1
    assert set(faces_per_identity.values()) == {1}  # each identity one whole enrolment
    names = set(identity_names(url).values())
    assert names <= ledger.sent_names | {"slow upload"} and "stalled upload" not in names
    assert ledger.server_errors() == {}

    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    problems = [line for line in lines if line["level"] not in ("INFO", "WARNING")]
    # uvicorn's own line when it cuts the stalled upload; no traceback (app/api/middleware.py, ShutdownCutMiddleware)
    assert [line["message"] for line in problems] == ["Cancel 1 running task(s), timeout graceful shutdown exceeded"]
    assert "Traceback" not in log
    access = [(line["route"], line["status"], line.get("error")) for line in lines if line["logger"] == "facegate.access"]
    assert access.count(("/enroll", 503, "shutting_down")) == 1
