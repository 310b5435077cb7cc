"""A real facegate server for system tests: `uvicorn --factory app.main:create_app --workers N` in its own process
group (so that `kill()` can SIGKILL the supervisor and every worker at once, like a power cut of the host's
processes), configured only through FACEGATE_* environment variables, as in production."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.config import REPO_ROOT

START_TIMEOUT_S = 180.0  # two workers loading the models on a loaded 2-core machine


def free_port() -> int:
    """A free port on 127.0.0.1: any the system hands out, or one of SYSTEM_TEST_PORTS ("8120-8129") when set, for
    machines where the tests' servers must keep to a range."""
    first, _, last = os.environ.get("SYSTEM_TEST_PORTS", "").partition("-")
    candidates = range(int(first), int(last or first) + 1) if first else [0]
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError(f"no free port in SYSTEM_TEST_PORTS={os.environ['SYSTEM_TEST_PORTS']}")


@dataclass
class LiveServer:
    """One uvicorn process tree on a fixed port; `start()` may be called again after `kill()` (a restart)."""

    database_url: str
    models_dir: Path
    log_dir: Path
    workers: int = 2
    # `facegate serve` (the CLI, as the Docker image runs it: its logging, signal handling and shutdown timeout)
    # instead of uvicorn itself.
    cli: bool = False
    environment: dict[str, str] = field(default_factory=dict)  # more FACEGATE_* settings
    # An admin key for the start-up wait (GET /admin/index), for a gallery that already has API keys: the server then
    # starts with authentication on, as it does in production once keys exist.
    api_key: str | None = None
    port: int = field(default_factory=free_port)
    starts: int = 0
    _process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
        env.update(
            FACEGATE_DATABASE_URL=self.database_url,
            FACEGATE_MODELS_DIR=str(self.models_dir),
            FACEGATE_RUNTIME__PROVIDERS='["CPUExecutionProvider"]',
            # Two workers share two cores with the test's clients: one ONNX thread each keeps them from fighting.
            FACEGATE_RUNTIME__INTRA_OP_THREADS="1",
            OMP_NUM_THREADS="1",
            OPENBLAS_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.environment)
        return env

    def command(self) -> list[str]:
        if self.cli:
            return [
                str(Path(sys.executable).with_name("facegate")), "serve",
                "--port", str(self.port), "--workers", str(self.workers),
            ]
        return [
            sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
            "--log-level", "warning",
        ]

    def log_path(self, start: int | None = None) -> Path:
        return self.log_dir / f"server-{self.starts if start is None else start}.log"

    def start(self) -> None:
        """Start the server and wait until every worker answers (each has loaded models, migrated and built its
        index: a worker only accepts connections after its lifespan has started)."""
        assert self._process is None, "already running"
        self.starts += 1
        log = self.log_path().open("wb")
        self._process = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill() reaches every worker
        )
        log.close()
        try:
            self.worker_states(timeout=START_TIMEOUT_S)
        except BaseException:
            self.kill()
            raise

    def worker_states(self, timeout: float = 60.0) -> dict[int, dict[str, object]]:
        """GET /admin/index (each call first replays the change log) on fresh connections until every worker's
        pid has answered; the last answer of each worker."""
        states: dict[int, dict[str, object]] = {}
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"the server exited ({self._process.returncode}):\n{self.log_text()[-4000:]}")
            try:
                # A new connection each time: the kernel hands it to whichever worker accepts first.
                headers = {"X-API-Key": self.api_key} if self.api_key else {}
                response = httpx.get(f"{self.url}/admin/index", headers=headers, timeout=30.0)
            except httpx.TransportError:
                response = None
            if response is not None:
                assert response.status_code == 200, response.text
                body = response.json()
                states[int(body["pid"])] = body
                if len(states) >= self.workers:
                    return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"saw {len(states)} of {self.workers} workers:\n{self.log_text()[-4000:]}")
            time.sleep(0.05 if response is not None else 0.5)

    def kill(self) -> None:
        """SIGKILL the whole process group (supervisor and workers): no shutdown code runs."""
        if self._process is None:
            return
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.wait(timeout=30)
        self._process = None
        self._wait_port_free()

    def kill_worker(self, pid: int) -> None:
        """SIGKILL one worker; uvicorn's supervisor starts a new one (which loads the index while the other serves)."""
        os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """A clean shutdown (SIGTERM: lifespan shutdown runs), SIGKILL if it takes too long."""
        if self._process is None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=30)
        self._process = None

    def terminate(self, timeout: float) -> tuple[int, float]:
        """SIGTERM to the server's process alone, as `docker stop` sends it to PID 1: (exit status, seconds it
        took). A server still running after `timeout` s is killed (with its workers) and the test fails."""
        assert self._process is not None, "not running"
        started = time.monotonic()
        self._process.send_signal(signal.SIGTERM)
        try:
            code = self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running {timeout} s after SIGTERM:\n{self.log_text()[-4000:]}") from None
        self._process = None
        return code, time.monotonic() - started

    def _wait_port_free(self) -> None:
        # Orphaned workers of a killed group could still hold the socket for a moment.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", self.port))
                    return
                except OSError:
                    time.sleep(0.1)
        raise RuntimeError(f"port {self.port} still in use after the kill")

    def log_text(self, start: int | None = None) -> str:
        path = self.log_path(start)
        return path.read_text(errors="replace") if path.exists() else ""
