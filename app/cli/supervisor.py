"""How `facegate serve` runs uvicorn: as uvicorn.run does, with a supervisor of its own for several workers (imported
by the command alone: uvicorn stays out of the other commands' start)."""

from __future__ import annotations

import inspect
import socket
from typing import Any

import typer
import uvicorn
from uvicorn.supervisors.multiprocess import Multiprocess

STARTUP_FAILURE = 3  # uvicorn.run's exit status when the app's start-up fails (its constant moved between releases)


class StoppingSupervisor(Multiprocess):
    """uvicorn's supervisor of `--workers N`, which also closes its copy of the listening socket when the server
    stops, before it signals the workers. Each worker closes its own copy as its shutdown begins, but uvicorn's
    supervisor kept one until it exited: the port went on listening with nobody accepting, so for as long as the
    requests in flight took to finish (up to FACEGATE_SHUTDOWN_TIMEOUT) a new connection was let in, left without
    an answer and then reset, where one worker refuses it at once. No worker is started after this (the supervisor
    only restarts workers while it runs)."""

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()


def supervisor(server: uvicorn.Server, sockets: list[socket.socket]) -> StoppingSupervisor:
    """A StoppingSupervisor of `server`'s workers, listening on `sockets`."""
    arguments: dict[str, Any] = {"sockets": sockets}
    if "target" in inspect.signature(Multiprocess.__init__).parameters:
        arguments["target"] = server.run  # uvicorn up to 0.40 took the workers' function (pyproject: >=0.30)
    return StoppingSupervisor(server.config, **arguments)


def run_server(config: uvicorn.Config) -> None:
    """What uvicorn.run does with `config` (an import string as the app), several workers under a
    StoppingSupervisor."""
    server = uvicorn.Server(config)
    try:
        if config.workers > 1:
            supervisor(server, [config.bind_socket()]).run()
            return
        server.run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn raises it again after its clean stop
        pass
    if config.workers == 1 and not server.started:  # the app's start-up failed: uvicorn.run's exit status
        raise typer.Exit(STARTUP_FAILURE)
