"""End-to-end throughput of POST /embed through real HTTP: photos in, faces with embeddings out.

    python -m bench.embed_throughput [--photos-dir DIR] [--per-request 16] [--concurrency 1,4,16]
                                     [--seconds 15] [--require-gpu]

Issue 7 asks for /embed's end-to-end throughput on a lent GPU next to the embedder's own faces/s
(bench/gpu_check.py); bench/gpu_run.md says how to carry this script's needs onto that machine. It runs on CPU
as well (the same figures for this machine, and how the script is tested).

What it does, bounded and on loopback only:
1. takes 640x480 JPEG photos with a face: every *.jpg of `--photos-dir` (bench/gpu_inputs.py writes them for the
   GPU machine), or else the dev photos' 640x480 crops (bench/common.py);
2. starts `uvicorn --factory app.main:create_app` (1 worker, the service's defaults, a temporary SQLite gallery;
   with `--require-gpu` FACEGATE_REQUIRE_GPU=true, so the server refuses to start unless CUDA is in use) and checks
   that one /embed of every photo answers with faces, remembering each photo's face count;
3. for each concurrency: that many client threads (one keep-alive httpx client each) POST /embed with
   `--per-request` photos each (taken in turn) for `--seconds`; every reply must be a 200 with the same face
   counts as step 2 (anything else is counted and reported);
4. reports faces/s, photos/s, requests/s, p50/p95 latency, the server's CPU time per face, and the providers the
   server reported on /readyz. Writes bench/results/embed_throughput.json (FACEGATE_BENCH_OUT: another folder).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.common import load_average, write
from bench.http import server
from bench.throughput import environment, server_pid, timed_load


def log(message: str) -> None:
    print(f"[embed] {message} (load {load_average()[0]})", file=sys.stderr, flush=True)


def load_photos(photos_dir: Path | None, limit: int) -> list[tuple[str, bytes]]:
    """(name, JPEG bytes) of up to `limit` photos with a face."""
    if photos_dir is not None:
        paths = sorted(photos_dir.glob("*.jpg"))[:limit]
        if not paths:
            raise SystemExit(f"no *.jpg in {photos_dir}")
        return [(p.name, p.read_bytes()) for p in paths]
    from app.config import Settings
    from app.vision.pipeline import Pipeline
    from bench.common import bench_photos

    pipeline = Pipeline.from_settings(Settings())
    try:
        found = bench_photos(pipeline, limit=limit)
    finally:
        pipeline.close()
    if not found:
        raise SystemExit("no bench photos: is ../shared/faces/dev there (FACEGATE_FACES_DIR)?")
    return [(f"{p.person}-{i}.jpg", p.jpeg) for i, p in enumerate(found)]


def post_embed(client: httpx.Client, photos: Sequence[tuple[str, bytes]]) -> httpx.Response:
    files = [("images", (name, data, "image/jpeg")) for name, data in photos]
    return client.post("/embed", files=files)


def face_counts(response: httpx.Response) -> list[int] | None:
    """Faces per photo of a 200 reply whose photos all gave faces; None otherwise."""
    if response.status_code != 200:
        return None
    images = response.json()["images"]
    if any(image["error"] is not None for image in images):
        return None
    return [len(image["faces"]) for image in images]


def load(
    base: str, photos: Sequence[tuple[str, bytes]], expected: dict[str, int], *, concurrency: int, per_request: int,
    seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """`concurrency` threads POST /embed with `per_request` photos each (taken in turn) for `seconds`
    (bench.throughput.timed_load); a reply counts only if it is a 200 with each photo's expected face count."""

    def embed(client: httpx.Client, turn: int) -> tuple[str, int, int]:
        batch = [photos[(turn * per_request + i) % len(photos)] for i in range(per_request)]
        response = post_embed(client, batch)
        counts = face_counts(response)
        if counts is None:
            return str(response.status_code), 0, 0
        if counts != [expected[name] for name, _ in batch]:
            return "wrong_face_counts", 0, 0
        return "200", sum(counts), len(counts)

    run = timed_load(base, embed, concurrency=concurrency, seconds=seconds, pid=server_pid(base))
    wrong = {outcome: n for outcome, n in run["statuses"].items() if outcome != "200"}
    return {"concurrency": concurrency, "per_request": per_request, **run, "wrong": wrong}


def run(args: argparse.Namespace) -> dict[str, Any]:
    photos = load_photos(args.photos_dir, args.photos)
    log(f"{len(photos)} photos, {args.per_request} per request")
    overrides = {"FACEGATE_BATCH__MAX_IMAGES": str(max(args.per_request, 1))}  # ~60 kB each: far under the body limit
    if args.require_gpu:
        overrides["FACEGATE_REQUIRE_GPU"] = "true"
    out: dict[str, Any] = {"photos": len(photos), "per_request": args.per_request, "runs": []}
    with environment(overrides), tempfile.TemporaryDirectory(prefix="facegate-embed-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'gallery.db'}"
        with server(url, Path(tmp) / "server.log") as (base, ready_s, _):
            out["startup_to_ready_s"] = ready_s
            with httpx.Client(base_url=base, timeout=300.0) as client:
                out["providers"] = client.get("/readyz").json().get("providers")
                log(f"server ready in {ready_s:.1f} s, providers {out['providers']}")
                expected: dict[str, int] = {}
                for name, data in photos:
                    counts = face_counts(post_embed(client, [(name, data)]))
                    if not counts or counts[0] == 0:
                        raise SystemExit(f"{name}: /embed found no face in it")
                    expected[name] = counts[0]
            for concurrency in args.concurrency:
                result = load(
                    base, photos, expected, concurrency=concurrency, per_request=args.per_request,
                    seconds=args.seconds,
                )  # fmt: skip
                out["runs"].append(result)
                log(
                    f"concurrency {concurrency:3d}: {result['faces_per_s']:.1f} faces/s, "
                    f"{result['photos_per_s']:.1f} photos/s, p50 {result['p50_ms']} ms, wrong {result['wrong']}"
                )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos-dir", type=Path, help="folder of 640x480 *.jpg with a face (default: dev crops)")
    parser.add_argument("--photos", type=int, default=16, help="most photos taken")
    parser.add_argument("--per-request", type=int, default=16, help="photos per /embed request")
    parser.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=15.0, help="load per concurrency")
    parser.add_argument("--require-gpu", action="store_true", help="the server must run on CUDA")
    args = parser.parse_args(argv)
    result = run(args)
    failed = [r for r in result["runs"] if r["wrong"] or not r["requests"]]
    print(f"wrote {write('embed_throughput', result)}")
    for r in result["runs"]:
        print(
            f"c={r['concurrency']:3d} x {r['per_request']} photos: {r['faces_per_s']:8.1f} faces/s "
            f"{r['photos_per_s']:8.1f} photos/s  p50 {r['p50_ms']:.0f} ms  server CPU/face "
            f"{r['server_cpu_ms_per_face'] or float('nan'):.1f} ms  wrong {r['wrong']}"
        )
    print(f"providers {result['providers']}")
    if failed:
        raise SystemExit(f"{len(failed)} run(s) had wrong or no answers")


if __name__ == "__main__":
    main()
