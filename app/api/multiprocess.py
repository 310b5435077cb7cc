"""Metrics shared by several worker processes (`facegate serve --workers N`): prometheus_client's multiprocess mode
and the recent requests behind GET /metrics/summary, both as files in one directory (PROMETHEUS_MULTIPROC_DIR).

prometheus_client picks its value store once, when it is first imported: with PROMETHEUS_MULTIPROC_DIR set, every
metric of the process lives in memory-mapped files `<kind>_<pid>.db` there, which MultiProcessCollector merges at a
scrape. Counters and histograms of a worker that died stay (its requests happened); gauges in a `live*` mode are
dropped with the worker (`mark_process_dead`). uvicorn's supervisor has no hook on a worker's exit, so a worker marks
itself dead when it stops cleanly and a scrape drops the gauges of any worker that is gone (killed, crashed).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
from prometheus_client import values

ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_GAUGE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")
_RECENT = re.compile(r"recent_(\d+)\.bin")

# One request of the shared window: when it ended (wall clock, comparable between processes), its latency, and its
# method and route template (bounded names: KNOWN_METHODS or OTHER, our own route templates; cut to fit).
RECORD = np.dtype([("at", "<f8"), ("seconds", "<f8"), ("method", "S8"), ("route", "S104")])
_HEADER = 8  # little-endian int64: requests written so far; slot = count % window


def shared_directory() -> Path | None:
    """The directory of the multiprocess mode when prometheus_client runs in it (decided at its import), else None:
    one process, metrics in its own memory."""
    path = os.environ.get(ENV)
    if not path or not getattr(values.ValueClass, "_multiprocess", False):
        return None
    return Path(path)


def process_alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie, killed but not yet reaped by its parent, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False  # gone since
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def forget_process(directory: Path, pid: int) -> None:
    """A worker is gone: drop its live gauges and its recent requests; its counters and histograms stay.

    Not prometheus_client's `mark_process_dead`, which globs then removes: two scrapes (threads or workers) that
    notice the same dead worker at once raced there, and the loser's FileNotFoundError answered /metrics with a 500."""
    for entry in os.scandir(directory):
        match = _LIVE_GAUGE.fullmatch(entry.name)
        if match and int(match.group(1)) == pid:
            Path(entry.path).unlink(missing_ok=True)
    (directory / f"recent_{pid}.bin").unlink(missing_ok=True)


def forget_dead_processes(directory: Path) -> None:
    """Forget every worker whose files are in `directory` but which no longer runs (before a scrape)."""
    pids = set()
    for entry in os.scandir(directory):
        match = _LIVE_GAUGE.fullmatch(entry.name) or _RECENT.fullmatch(entry.name)
        if match:
            pids.add(int(match.group(1)))
    for pid in pids - {os.getpid()}:
        if not process_alive(pid):
            forget_process(directory, pid)


class SharedRecent:
    """This worker's latest `window` requests in a memory-mapped ring `recent_<pid>.bin` of the shared directory:
    recording is one slot write (no system call); reading merges every worker's ring. A reader may catch a slot
    half-written: at worst one request's figures are wrong for one summary."""

    def __init__(self, directory: Path, window: int) -> None:
        self.directory = directory
        self.window = window
        path = directory / f"recent_{os.getpid()}.bin"
        self._map = np.memmap(path, dtype=np.uint8, mode="w+", shape=(_HEADER + window * RECORD.itemsize,))
        self._count = self._map[:_HEADER].view("<i8")
        self._records = self._map[_HEADER:].view(RECORD)

    def append(self, method: str, route: str, seconds: float) -> None:
        count = int(self._count[0])
        self._records[count % self.window] = (time.time(), seconds, method.encode()[:8], route.encode()[:104])
        self._count[0] = count + 1  # after the record: a reader sees it whole (a single int64 store)

    def latest(self) -> tuple[list[tuple[str, str, float]], int]:
        """The `window` most recent requests of every running worker, oldest first, and how many workers have any."""
        forget_dead_processes(self.directory)
        rings = [ring for ring in _read_rings(self.directory) if len(ring)]
        if not rings:
            return [], 0
        merged = np.concatenate(rings)
        merged = merged[np.argsort(merged["at"], kind="stable")][-self.window :]
        rows = [(m.decode(), r.decode(), float(s)) for m, r, s in zip(merged["method"], merged["route"], merged["seconds"])]
        return rows, len(rings)

    def close(self) -> None:
        """At a clean stop: this worker's requests leave the window with it."""
        self._map.flush()
        (self.directory / f"recent_{os.getpid()}.bin").unlink(missing_ok=True)


def _read_rings(directory: Path) -> Iterator[npt.NDArray[np.void]]:
    for entry in os.scandir(directory):
        if not _RECENT.fullmatch(entry.name):
            continue
        try:
            data = Path(entry.path).read_bytes()
        except FileNotFoundError:
            continue  # its worker was forgotten meanwhile
        if len(data) < _HEADER:
            continue
        count = int(np.frombuffer(data[:_HEADER], "<i8")[0])
        slots = (len(data) - _HEADER) // RECORD.itemsize
        records = np.frombuffer(data, RECORD, count=slots, offset=_HEADER)[: min(count, slots)]
        yield records[records["at"] > 0]
