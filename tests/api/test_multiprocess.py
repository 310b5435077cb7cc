"""The pieces of shared metrics that need no server: `facegate serve`'s private directory, telling a dead worker from a
live one (real processes), forgetting the dead, and the recent-request ring (tests/system/test_metrics.py runs them
all under `facegate serve --workers 2`)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.api.multiprocess import ENV, SharedRecent, forget_dead_processes, process_alive
from app.cli.serve import remove_abandoned_metrics, shared_metrics


@pytest.fixture
def sleeper() -> Iterator[int]:
    """The pid of a running process."""
    process = subprocess.Popen(["sleep", "60"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


class TestSharedDirectory:
    def test_several_workers_get_a_fresh_private_directory_removed_at_exit(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv(ENV, raising=False)
        paths = []
        for workers in (2, 3):  # two starts (or two servers: each its own directory)
            with shared_metrics(workers) as path:
                assert path is not None and os.environ[ENV] == path
                assert Path(path).is_dir() and not list(Path(path).iterdir())
                assert Path(path).stat().st_mode & 0o077 == 0  # private
                (Path(path) / "counter_1.db").write_bytes(b"x")
            assert not Path(path).exists() and ENV not in os.environ
            paths.append(path)
        assert paths[0] != paths[1]

    def test_inside_the_operators_directory(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv(ENV, str(tmp_path))
        with shared_metrics(2) as path:
            assert path is not None and Path(path).parent == tmp_path
        assert os.environ[ENV] == str(tmp_path) and list(tmp_path.iterdir()) == []

    def test_a_start_removes_the_directories_of_killed_servers_only(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A SIGKILLed server leaves its directory (MB of mapped files per worker): the next start removes it, but
        not a running server's (locked) nor one of the last minute (a server starting, maybe not locked yet)."""
        monkeypatch.setenv(ENV, str(tmp_path))
        old = time.time() - 3600
        dirs = {name: tmp_path / f"facegate-metrics-{name}" for name in ("killed", "running", "starting")}
        for name, folder in dirs.items():
            folder.mkdir()
            (folder / "counter_123.db").write_bytes(b"x" * 1000)
            if name != "starting":
                os.utime(folder, (old, old))
        (tmp_path / "other-tool-dir").mkdir()
        os.utime(tmp_path / "other-tool-dir", (old, old))
        held = os.open(dirs["running"], os.O_RDONLY)
        try:
            fcntl.flock(held, fcntl.LOCK_EX)  # as the running server holds its own
            with shared_metrics(2) as path:
                assert path is not None
                left = sorted(p.name for p in tmp_path.iterdir())
                assert left == sorted([Path(path).name, "facegate-metrics-running", "facegate-metrics-starting", "other-tool-dir"])
                assert remove_abandoned_metrics(str(tmp_path)) == []  # this server's own is locked too
        finally:
            os.close(held)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["facegate-metrics-running", "facegate-metrics-starting", "other-tool-dir"]
        assert (dirs["running"] / "counter_123.db").exists()

    def test_one_worker_keeps_its_metrics_in_memory(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv(ENV, str(tmp_path))
        with shared_metrics(1) as path:
            assert path is None and ENV not in os.environ
        assert os.environ[ENV] == str(tmp_path)


class TestDeadWorkers:
    def test_alive_dead_and_zombie(self, sleeper: int, dead_pid: int) -> None:
        assert process_alive(os.getpid()) and process_alive(sleeper)
        assert not process_alive(dead_pid)
        zombie = subprocess.Popen(["true"])
        try:
            os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
            assert not process_alive(zombie.pid)
        finally:
            zombie.wait()

    def test_a_dead_workers_gauges_and_recent_requests_go_its_counts_stay(
        self, tmp_path: Path, sleeper: int, dead_pid: int
    ) -> None:
        names = ["counter_{}.db", "histogram_{}.db", "gauge_livemax_{}.db", "gauge_livemostrecent_{}.db",
                 "gauge_all_{}.db", "recent_{}.bin"]
        for pid in (sleeper, dead_pid):
            for name in names:
                (tmp_path / name.format(pid)).write_bytes(b"")
        forget_dead_processes(tmp_path)
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {name.format(sleeper) for name in names} | {
            f"counter_{dead_pid}.db", f"histogram_{dead_pid}.db", f"gauge_all_{dead_pid}.db"
        }

    def test_scrapes_forgetting_the_same_dead_worker_at_once_do_not_fail(self, tmp_path: Path, dead_pid: int) -> None:
        """Two scrapes (threads of a worker, or two workers) that notice one dead worker at once: neither fails
        (prometheus_client's mark_process_dead globs then removes, and the loser got FileNotFoundError: a 500)."""
        failures: list[BaseException] = []
        for _ in range(300):
            for mode in ("livesum", "livemax", "livemostrecent"):
                (tmp_path / f"gauge_{mode}_{dead_pid}.db").write_bytes(b"")
            (tmp_path / f"recent_{dead_pid}.bin").write_bytes(b"")
            start = threading.Barrier(4)

            def scrape(start: threading.Barrier = start) -> None:
                start.wait()
                try:
                    forget_dead_processes(tmp_path)
                except BaseException as error:  # noqa: BLE001 - collected for the assertion below
                    failures.append(error)

            threads = [threading.Thread(target=scrape) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert failures == [] and list(tmp_path.iterdir()) == []


class TestSharedRecent:
    def test_keeps_the_latest_window_of_requests(self, tmp_path: Path) -> None:
        recent = SharedRecent(tmp_path, window=50)
        for i in range(120):
            recent.append("GET", "/healthz" if i % 2 else "/identities/{identity_id}", i / 1000)
        requests, workers = recent.latest()
        assert workers == 1 and len(requests) == 50
        assert [seconds for _, _, seconds in requests] == [i / 1000 for i in range(70, 120)]
        assert requests[-1] == ("GET", "/healthz", 0.119) and requests[-2][1] == "/identities/{identity_id}"
        recent.close()
        assert list(tmp_path.iterdir()) == []

    def test_merges_the_running_workers_and_drops_a_dead_ones(self, tmp_path: Path) -> None:
        def worker(route: str, seconds_alive: float) -> subprocess.Popen[str]:
            """Another process recording one request in its own ring (stopped without closing it, as by a kill)."""
            process = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), route, str(seconds_alive)],
                                       stdout=subprocess.PIPE, text=True)
            assert process.stdout is not None and process.stdout.readline() == "recorded\n"
            return process

        live, dead = worker("/identify", 60), worker("/enroll", 0)
        try:
            dead.wait()
            ours = SharedRecent(tmp_path, window=10)
            ours.append("POST", "/verify", 0.5)
            assert (tmp_path / f"recent_{dead.pid}.bin").exists()
            requests, workers = ours.latest()
            assert workers == 2 and sorted(route for _, route, _ in requests) == ["/identify", "/verify"]
            assert not (tmp_path / f"recent_{dead.pid}.bin").exists()
        finally:
            live.kill()
            live.wait()


WORKER = """
import sys, time
from pathlib import Path
from app.api.multiprocess import SharedRecent
ring = SharedRecent(Path(sys.argv[1]), window=10)
ring.append("POST", sys.argv[2], 0.25)
print("recorded", flush=True)
time.sleep(float(sys.argv[3]))
"""
