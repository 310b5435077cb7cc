"""`facegate serve` in a child process, for the tests that need the real command: its uvicorn options, its output."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def facegate_serve(env: Mapping[str, str], log: Path, *, path: str = "/healthz") -> Iterator[tuple[int, httpx.Response]]:
    """`facegate serve --port P` with `env`, its output (both streams) in `log`, until GET `path` answers; yields P
    and that answer, and stops the server (SIGTERM) on the way out. Fails with the log if it never answers."""
    port = free_port()
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-c", "from app.cli import main; main()", "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
        )
    try:
        deadline = time.monotonic() + 60
        answer = None
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2)
            except httpx.TransportError:
                time.sleep(0.2)
        assert answer is not None, log.read_text()
        yield port, answer
    finally:
        server.terminate()
        server.wait(timeout=30)
