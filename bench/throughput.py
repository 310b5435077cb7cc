"""Throughput of POST /identify through real HTTP, micro-batching on vs off, in the same run on the same photos.

    python -m bench.throughput [--seconds 20] [--rounds 2] [--concurrency 1,8,32] [--gallery 10000] [--stack 4]

What it does, bounded and on loopback only:
1. takes the first `--photos` large dev photos that keep a detectable face as 640x480 JPEG crops (bench/common.py),
   and seeds a temporary SQLite gallery with `--gallery` synthetic identities (as bench/http.py does);
2. starts one uvicorn server (1 worker, default settings) per mode on that gallery: `off`
   (FACEGATE_BATCHING__ENABLED=false: every request thread calls ONNX Runtime itself) and `on` (the default
   micro-batching); with `--stack N` also `on+stackN` (FACEGATE_BATCHING__DETECTOR_MAX_BATCH=N);
3. for each round, each concurrency (1, 8, 32) and each mode in turn (the order flips every round, so that load
   drifts on a shared machine hit the modes alike): `concurrency` client threads (one keep-alive httpx client each)
   POST /identify with the photos in turn for `--seconds`; counts the faces answered (every face of a 200 reply)
   and the latency of each request;
4. reports per mode and concurrency the median over rounds of faces/s and requests/s, p50/p95 latency, the
   server's CPU time per face (from /proc: on a shared machine the steadier figure), any non-200 answers, and the
   on/off ratio of faces/s (issue 7's target: >= 1.5x at concurrency 8 on 2 cores).

Client threads share the machine with the server (~1 ms of CPU per request). Writes bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from app.config import Settings
from app.vision.pipeline import Pipeline
from bench.common import bench_photos, load_average, summary, write
from bench.http import seed_gallery, server

TARGET_RATIO_AT_8 = 1.5


def log(message: str) -> None:
    print(f"[throughput] {message} (load {load_average()[0]})", file=sys.stderr, flush=True)


def server_pid(base: str) -> int | None:
    """The uvicorn process listening on `base`'s port (bench.http.server does not hand it out)."""
    needle = f"--port\0{base.rsplit(':', 1)[1]}\0".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except OSError:
                continue
    return None


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process, all its threads (0 when unknown)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `values` set while the block runs (bench.http.server passes it to the server)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def timed_load(
    base: str,
    request: Callable[[httpx.Client, int], tuple[str, int, int]],
    *,
    concurrency: int,
    seconds: float,
    pid: int | None,
) -> dict[str, Any]:
    """`concurrency` threads (one keep-alive client each) call `request(client, turn)` -> (outcome, faces, photos)
    until `seconds` have passed, turns numbered across threads; each thread makes one warm-up call first. Rates are
    over the wall time from the start to the last reply; outcomes are counted ("200" for a right answer) and only
    those count faces and photos; the server's CPU time per face bounds faces/s on a busy machine (at most
    cores x 1000 / cpu_ms_per_face)."""
    lock = threading.Lock()
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    faces = photos = 0
    turn = itertools.count()
    barrier = threading.Barrier(concurrency + 1)
    deadline = 0.0

    def next_turn() -> int:
        with lock:
            return next(turn)

    def worker() -> None:
        nonlocal faces, photos
        with httpx.Client(base_url=base, timeout=300.0) as client:
            request(client, next_turn())  # warm the connection and the server's thread
            barrier.wait()
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                outcome, found, sent = request(client, next_turn())
                elapsed = (time.perf_counter() - t0) * 1000
                with lock:
                    latencies.append(elapsed)
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    faces += found
                    photos += sent

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    deadline = time.perf_counter() + 3600  # set properly once every thread is warm
    barrier.wait()
    cpu0, start = cpu_seconds(pid), time.perf_counter()
    deadline = start + seconds
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    cpu = cpu_seconds(pid) - cpu0
    stats = summary(latencies)
    return {
        "requests": len(latencies),
        "faces": faces,
        "wall_s": wall,
        "faces_per_s": faces / wall,
        "photos_per_s": photos / wall,
        "requests_per_s": len(latencies) / wall,
        "server_cpu_ms_per_face": cpu * 1000 / faces if faces and pid is not None else None,
        "p50_ms": stats["median_ms"],
        "p95_ms": stats["p95_ms"],
        "statuses": {k: v for k, v in sorted(outcomes.items())},
        "load_avg": load_average(),
    }


def load(
    base: str, uploads: Sequence[bytes], *, concurrency: int, seconds: float, pid: int | None
) -> dict[str, Any]:
    """`timed_load` of POST /identify with the photos in turn: every face of a 200 reply counts."""

    def identify(client: httpx.Client, turn: int) -> tuple[str, int, int]:
        data = uploads[turn % len(uploads)]
        response = client.post("/identify", files={"image": ("photo.jpg", data, "image/jpeg")})
        found = len(response.json().get("faces", ())) if response.status_code == 200 else 0
        return str(response.status_code), found, 1

    return timed_load(base, identify, concurrency=concurrency, seconds=seconds, pid=pid)


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one mode and concurrency: medians of the rates, latencies pooled as medians of the rounds'."""
    statuses: dict[str, int] = {}
    for run in runs:
        for code, n in run["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    return {
        "faces_per_s": statistics.median(r["faces_per_s"] for r in runs),
        "requests_per_s": statistics.median(r["requests_per_s"] for r in runs),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p95_ms": statistics.median(r["p95_ms"] for r in runs),
        "server_cpu_ms_per_face": statistics.median(
            r["server_cpu_ms_per_face"] for r in runs if r["server_cpu_ms_per_face"] is not None
        )
        if any(r["server_cpu_ms_per_face"] is not None for r in runs)
        else None,
        "requests": sum(r["requests"] for r in runs),
        "statuses": statuses,
        "rounds": runs,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="load per mode, concurrency and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--photos", type=int, default=6, help="distinct 640x480 photos sent in turn")
    parser.add_argument("--gallery", type=int, default=10_000, help="synthetic identities seeded before start")
    parser.add_argument("--stack", type=int, default=0, help="also measure detector stacking of N photos (0: no)")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    settings = Settings()
    pipeline = Pipeline.from_settings(settings.model_copy(update={"batching": settings.batching.model_copy(
        update={"enabled": False})}))  # fmt: skip
    chosen = bench_photos(pipeline, limit=args.photos)
    model_version = pipeline.model_version
    del pipeline  # the bench process keeps no model while the servers run
    log(f"{len(chosen)} photos: {', '.join(p.person for p in chosen)}")
    modes: dict[str, dict[str, str]] = {
        "off": {"FACEGATE_BATCHING__ENABLED": "false"},
        "on": {"FACEGATE_BATCHING__ENABLED": "true"},
    }
    if args.stack > 1:
        modes[f"on+stack{args.stack}"] = {
            "FACEGATE_BATCHING__ENABLED": "true",
            "FACEGATE_BATCHING__DETECTOR_MAX_BATCH": str(args.stack),
        }
    result: dict[str, Any] = {
        "photos": [p.source for p in chosen],
        "photo_people": [p.person for p in chosen],
        "gallery_synthetic": args.gallery,
        "seconds_per_run": args.seconds,
        "rounds": args.rounds,
        "modes": {name: env for name, env in modes.items()},
        "batching_defaults": Settings().batching.model_dump(),
        "load_avg_before": load_average(),
    }
    uploads = [p.jpeg for p in chosen]
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {m: {c: [] for c in levels} for m in modes}
    with tempfile.TemporaryDirectory(prefix="facegate-throughput-") as tmp, ExitStack() as servers:
        url = f"sqlite:///{Path(tmp) / 'gallery.db'}"
        log(f"seeding {args.gallery} synthetic identities")
        result["seed_s"] = seed_gallery(url, model_version, args.gallery)
        bases, pids = {}, {}
        for name, env in modes.items():
            log(f"starting the server, batching {name}")
            with environment(env):
                base, ready_s, _ = servers.enter_context(server(url, Path(tmp) / f"server-{name}.log"))
            bases[name] = base
            pids[name] = server_pid(base)
            result.setdefault("startup_to_ready_s", {})[name] = ready_s
        for round_index in range(args.rounds):
            order = list(modes) if round_index % 2 == 0 else list(reversed(modes))
            for c in levels:
                for name in order:
                    run = load(bases[name], uploads, concurrency=c, seconds=args.seconds, pid=pids[name])
                    runs[name][c].append(run)
                    log(f"round {round_index + 1}, {name:>10}, concurrency {c:>2}: {run['faces_per_s']:.2f} faces/s, "
                        f"p50 {run['p50_ms']:.0f} ms, server CPU {run['server_cpu_ms_per_face'] or 0:.0f} ms/face, "
                        f"statuses {run['statuses']}")  # fmt: skip
    result["results"] = {name: {str(c): combine(runs[name][c]) for c in levels} for name in modes}
    result["ratio_on_off"] = {
        str(c): result["results"]["on"][str(c)]["faces_per_s"] / result["results"]["off"][str(c)]["faces_per_s"]
        for c in levels
    }
    result["cpu_ratio_off_on"] = {
        str(c): off / on
        for c in levels
        if (off := result["results"]["off"][str(c)]["server_cpu_ms_per_face"])
        and (on := result["results"]["on"][str(c)]["server_cpu_ms_per_face"])
    }
    if "8" in result["ratio_on_off"]:
        result["target_ratio_at_8"] = TARGET_RATIO_AT_8
        result["met"] = result["ratio_on_off"]["8"] >= TARGET_RATIO_AT_8
    result["load_avg_after"] = load_average()
    path = write("throughput", result)
    for name in modes:
        for c in levels:
            r = result["results"][name][str(c)]
            print(f"{name:>10} c={c:>2}: {r['faces_per_s']:.2f} faces/s, {r['requests_per_s']:.2f} req/s, "
                  f"p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, server CPU "
                  f"{r['server_cpu_ms_per_face'] or 0:.0f} ms/face, statuses {r['statuses']}")  # fmt: skip
    print(f"on/off faces/s: {', '.join(f'c={c}: {v:.2f}x' for c, v in result['ratio_on_off'].items())}")
    print(f"off/on server CPU per face: {', '.join(f'c={c}: {v:.2f}x' for c, v in result['cpu_ratio_off_on'].items())}")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
