"""How `facegate serve --workers N` lets go of its port when it stops (app/cli/supervisor.py); the whole stop under
load is tests/system/test_shutdown.py."""

from __future__ import annotations

import socket

import pytest
import uvicorn

from app.cli.supervisor import StoppingSupervisor, run_server, supervisor


def _config(workers: int) -> uvicorn.Config:
    return uvicorn.Config("app.main:create_app", factory=True, host="127.0.0.1", port=0, workers=workers)


def test_the_supervisor_stops_listening_before_its_workers_finish() -> None:
    """Each worker closes its copy of the listening socket as its shutdown begins; the supervisor kept its own until
    it exited, so during the shutdown timeout a new connection was let in, never answered, then reset. Stopping
    (terminate_all, before the workers are signalled) now closes it: with the workers' copies closed, a new
    connection is refused at once, as with one worker."""
    config = _config(workers=2)
    sock = config.bind_socket()
    sock.listen()  # as a worker does (asyncio's create_server); the state belongs to the socket all processes share
    port = sock.getsockname()[1]
    stopping = supervisor(uvicorn.Server(config), [sock])
    socket.create_connection(("127.0.0.1", port), timeout=5).close()  # listening while it runs
    stopping.terminate_all()  # no worker was started: nothing else holds the port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_several_workers_run_under_the_stopping_supervisor(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[type] = []
    monkeypatch.setattr(StoppingSupervisor, "run", lambda self: ran.append(type(self)))
    monkeypatch.setattr(uvicorn.Config, "bind_socket", lambda self: socket.socket())
    run_server(_config(workers=2))
    assert ran == [StoppingSupervisor]
