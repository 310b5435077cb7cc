"""End-to-end latency through real HTTP: the service under uvicorn on 127.0.0.1, measured with httpx.

    python -m bench.http [--requests N] [--gallery N] [--postgres]

What it does, bounded and on loopback only:
1. picks a real person with two large dev photos (640x480 JPEG crops, one face each, a match at 0.36);
2. seeds a fresh gallery (temporary SQLite file, or with --postgres also a fresh schema of the PostgreSQL at
   127.0.0.1:5432, database `test`) with N synthetic identities (random 128-d directions with dlib-like
   norms 1.3-1.6) through `Gallery.bulk_enrol`, BEFORE the server starts, so that start-up loads them;
3. starts `uvicorn --factory app.main:create_app` (one worker, the service's default settings), waits for
   /readyz, enrols the real person with POST /enroll (photo 1), checks /verify and /identify answer right;
4. times POST /verify (photo 2 vs the identity) and POST /identify (photo 2 against the whole gallery) at
   concurrency 1 and 8 (threads, one keep-alive httpx client each), a fixed number of requests each;
5. stops the server and removes the temporary database / schema.

Client and server share the machine's cores (the client's cost is ~1 ms per request). Writes
bench/results/http.json.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.config import Settings
from app.gallery import Gallery
from app.matching.distances import pairwise_squared_l2
from app.vision.pipeline import Pipeline
from bench.common import BenchPhoto, bench_photos, load_average, summary, write

POSTGRES_URL = os.environ.get("FACEGATE_BENCH_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
# Issue 4's targets on 2 cores, p50 at concurrency 1.
TARGETS_P50_MS = {"verify": 80.0, "identify": 100.0}
SEED_CHUNK = 20_000
READY_TIMEOUT_S = 300.0


def log(message: str) -> None:
    print(f"[http] {message} (load {load_average()[0]})", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ inputs


def pick_person(pipeline: Pipeline, threshold: float) -> tuple[BenchPhoto, BenchPhoto, float, list[float]]:
    """The first person (by path) with two bench photos of one face each whose distance is a match."""
    photos = bench_photos(pipeline)
    norms = []
    by_person: dict[str, list[tuple[BenchPhoto, np.ndarray]]] = {}
    for photo in photos:
        faces = pipeline.find_faces(photo.pixels)
        norms += [float(np.linalg.norm(f.embedding)) for f in faces]
        if len(faces) == 1:
            by_person.setdefault(photo.person, []).append((photo, faces[0].embedding))
    for found in by_person.values():
        for i, (a, ea) in enumerate(found):
            for b, eb in found[i + 1 :]:
                distance = float(pairwise_squared_l2(ea, eb)[0])
                if distance <= threshold:
                    return a, b, distance, norms
    raise SystemExit("no person has two single-face 640x480 bench photos that match")


def synthetic_embeddings(count: int, seed: int = 0) -> np.ndarray:
    """Random directions with norms uniform in [1.3, 1.6] (dlib's raw embeddings lie there)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, 128)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors *= rng.uniform(1.3, 1.6, size=(count, 1)).astype(np.float32)
    return vectors


def seed_gallery(url: str, model_version: str, count: int) -> float:
    """`count` synthetic identities with one face each, in chunks of SEED_CHUNK (one transaction each)."""
    start = time.perf_counter()
    gallery = Gallery.open(url, model_version, migrate=True)
    try:
        vectors = synthetic_embeddings(count)
        for first in range(0, count, SEED_CHUNK):
            part = vectors[first : first + SEED_CHUNK]
            gallery.bulk_enrol(names=[f"synthetic-{first + k:07d}" for k in range(len(part))], embeddings=part)
    finally:
        gallery.close()
    return time.perf_counter() - start


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh schema on the bench PostgreSQL (dropped afterwards); yields its SQLAlchemy URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES_URL)
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'DROP SCHEMA "{schema}" CASCADE')


# ------------------------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(database_url: str, log_path: Path) -> Iterator[tuple[str, float, list[str]]]:
    """uvicorn with the app factory on 127.0.0.1; yields (base URL, seconds until /readyz said ready, command).
    Stopped (SIGINT, then SIGKILL after 30 s) when the block ends."""
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    env = {**os.environ, "FACEGATE_DATABASE_URL": database_url, "FACEGATE_HOST": "127.0.0.1"}
    base = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    with log_path.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=base, timeout=10.0) as client:
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                if time.perf_counter() - start > READY_TIMEOUT_S:
                    raise SystemExit(f"server not ready after {READY_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-3000:]}")
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        yield base, time.perf_counter() - start, command
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ---------------------------------------------------------------------------------------------- requests


def post(client: httpx.Client, endpoint: str, photo: bytes, fields: dict[str, str]) -> httpx.Response:
    return client.post(f"/{endpoint}", files={"image": ("photo.jpg", photo, "image/jpeg")}, data=fields)


def right_answer(endpoint: str, response: httpx.Response, identity_id: str) -> bool:
    """A 200 that names the enrolled person: /verify's match, /identify's nearest candidate."""
    if response.status_code != 200:
        return False
    body = response.json()
    if endpoint == "verify":
        return body.get("match") is True
    faces = body.get("faces") or []
    return bool(faces and faces[0]["candidates"] and faces[0]["candidates"][0]["identity_id"] == identity_id)


def load_test(
    base: str, endpoint: str, photo: bytes, fields: dict[str, str], *, identity_id: str, concurrency: int,
    requests: int, warmup: int,
) -> dict[str, Any]:  # fmt: skip
    """`requests` POSTs from `concurrency` threads (each its own keep-alive client); latency per request as the
    client sees it, throughput over the whole batch. Every answer is checked (`right_answer`): a non-200 is counted
    under its status, a 200 that does not name the person as "wrong_answer"."""
    remaining = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=120.0) as client:
            for _ in range(warmup):
                post(client, endpoint, photo, fields)
            barrier.wait()
            while True:
                with lock:
                    if next(remaining, None) is None:
                        return
                t0 = time.perf_counter()
                response = post(client, endpoint, photo, fields)
                elapsed = (time.perf_counter() - t0) * 1000
                status = str(response.status_code)
                if status == "200" and not right_answer(endpoint, response, identity_id):
                    status = "wrong_answer"
                with lock:
                    latencies.append(elapsed)
                    statuses[status] = statuses.get(status, 0) + 1

    barrier = threading.Barrier(concurrency + 1)
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(worker) for _ in range(concurrency)]
        barrier.wait()
        cpu0, start = time.process_time(), time.perf_counter()
        for future in futures:
            future.result()
        wall = time.perf_counter() - start
        client_cpu = time.process_time() - cpu0
    stats = summary(latencies)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "p50_ms": stats["median_ms"],
        "p95_ms": stats["p95_ms"],
        "min_ms": stats["min_ms"],
        "max_ms": max(latencies),
        "throughput_rps": len(latencies) / wall,
        "client_cpu_ms_per_request": client_cpu * 1000 / len(latencies),
        "statuses": dict(sorted(statuses.items())),
        "load_avg": load_average(),
    }


def check_answers(base: str, probe: bytes, identity_id: str) -> dict[str, Any]:
    """The bench's requests must get the right answers, or their latency means nothing."""
    with httpx.Client(base_url=base, timeout=120.0) as client:
        verify = post(client, "verify", probe, {"identity_id": identity_id})
        identify = post(client, "identify", probe, {})
        ready = client.get("/readyz").json()
    v, i = verify.json(), identify.json()
    top = i["faces"][0]["candidates"][0] if identify.status_code == 200 and i["faces"] else None
    return {
        "verify_status": verify.status_code,
        "verify_match": v.get("match"),
        "verify_distance": v.get("distance"),
        "identify_status": identify.status_code,
        "identify_top1_is_person": bool(top and top["identity_id"] == identity_id),
        "identify_match": (i["faces"][0]["match"] or {}).get("identity_id") == identity_id if top else False,
        "identify_reason": i["faces"][0]["reason"] if top else None,
        "identify_distance": top["distance"] if top else None,
        "gallery_size": ready.get("gallery_size"),
        "providers": ready.get("providers"),
    }


def in_process(url: str, probe: bytes, identity_id: str, query: np.ndarray, repeats: int) -> dict[str, Any]:
    """The same work without HTTP, in this process (after the server has stopped): what /verify and /identify
    cost inside the service, and the index's share of /identify (exact top-5 search, refresh)."""
    from app.service import FaceService

    service = FaceService.open(Settings(database_url=url), load_models=True)
    try:
        def timed(fn: Any, n: int) -> float:
            fn()
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
            return summary(times)["median_ms"]

        image = service.pipeline.decoder(probe)()
        top5 = {c.identity_id for c in service.gallery.search(query[None], top_k=5)[0]}
        return {
            "verify_ms": timed(lambda: service.verify_identity(probe, identity_id), repeats),
            "identify_ms": timed(lambda: service.identify(probe, top_k=5), repeats),
            "decode_ms": timed(service.pipeline.decoder(probe), repeats),
            "find_faces_ms": timed(lambda: service.pipeline.find_faces(image), repeats),
            "names_top5_ms": timed(lambda: service._names(top5), repeats),
            "resolve_threshold_ms": timed(service.resolve_threshold, repeats),
            "search_ms": timed(lambda: service.gallery.search(query[None], top_k=5, refresh=False), 3 * repeats),
            "refresh_ms": timed(service.gallery.refresh, repeats),
            "faces": service.gallery.stats().size,
        }
    finally:
        service.close()


# -------------------------------------------------------------------------------------------------- main


def bench_backend(
    name: str, url: str, *, model_version: str, gallery: int, photos: tuple[BenchPhoto, BenchPhoto],
    query: np.ndarray, requests: int, concurrency: Sequence[int], workdir: Path,
) -> dict[str, Any]:  # fmt: skip
    enrol_photo, probe = photos
    log(f"{name}: seeding {gallery} synthetic identities")
    seed_s = seed_gallery(url, model_version, gallery)
    log(f"{name}: starting the server")
    out: dict[str, Any] = {"database": name, "gallery_synthetic": gallery, "seed_s": seed_s}
    with server(url, workdir / f"server-{name}.log") as (base, ready_s, command):
        out["startup_to_ready_s"] = ready_s
        out["server_command"] = " ".join(command[1:])
        with httpx.Client(base_url=base, timeout=120.0) as client:
            enrolled = post(client, "enroll", enrol_photo.jpeg, {"name": f"bench {enrol_photo.person}"})
        if enrolled.status_code != 201:
            raise SystemExit(f"/enroll answered {enrolled.status_code}: {enrolled.text}")
        identity_id = enrolled.json()["identity_id"]
        out["answers"] = check_answers(base, probe.jpeg, identity_id)
        log(f"{name}: answers {out['answers']}")
        if not (out["answers"]["verify_match"] is True and out["answers"]["identify_top1_is_person"]):
            # Timing answers that are wrong (the person not found in the seeded gallery) would measure nothing.
            raise SystemExit(f"{name}: wrong answers before the load: {out['answers']}")
        runs = []
        for c in concurrency:  # concurrency 1 first: the 8-thread runs raise the load average for a minute
            for endpoint, fields in (("verify", {"identity_id": identity_id}), ("identify", {})):
                n = requests * max(1, c // 2)  # 8 threads: 4x the requests, so each thread sends several
                log(f"{name}: {endpoint} at concurrency {c}, {n} requests")
                result = load_test(
                    base, endpoint, probe.jpeg, fields, identity_id=identity_id, concurrency=c, requests=n, warmup=2
                )
                runs.append({"endpoint": endpoint, **result})
        out["runs"] = runs
    log(f"{name}: the same calls in-process")
    out["in_process"] = in_process(url, probe.jpeg, identity_id, query, max(10, requests // 2))
    for run in out["runs"]:
        if run["concurrency"] == 1:
            target = TARGETS_P50_MS[run["endpoint"]]
            run["target_p50_ms"] = target
            run["met"] = run["p50_ms"] <= target
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="requests per run at concurrency 1 (8: 4x)")
    parser.add_argument("--gallery", type=int, default=100_000, help="synthetic identities seeded before start")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--postgres", action="store_true", help="also run against PostgreSQL (fresh schema)")
    args = parser.parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",")]

    settings = Settings()
    pipeline = Pipeline.from_settings(settings)
    pipeline.load()
    enrol_photo, probe, distance, norms = pick_person(pipeline, settings.threshold)
    query = pipeline.embed_photo(probe.pixels).embedding
    model_version = pipeline.model_version
    del pipeline  # the bench process keeps no model while the server runs
    log(f"person {enrol_photo.person}: enrol {enrol_photo.source}, probe {probe.source}, distance {distance:.4f}")

    result: dict[str, Any] = {
        "person": enrol_photo.person,
        "enrol_photo": enrol_photo.source,
        "probe_photo": probe.source,
        "probe_bytes": len(probe.jpeg),
        "pair_distance": distance,
        "real_embedding_norms": [round(v, 3) for v in norms],
        "requests_at_concurrency_1": args.requests,
        "load_avg_before": load_average(),
        "backends": [],
    }
    with tempfile.TemporaryDirectory(prefix="facegate-bench-") as tmp:
        workdir = Path(tmp)

        def one(name: str, url: str) -> dict[str, Any]:
            return bench_backend(
                name, url, model_version=model_version, gallery=args.gallery, photos=(enrol_photo, probe),
                query=query, requests=args.requests, concurrency=concurrency, workdir=workdir,
            )  # fmt: skip

        result["backends"].append(one("sqlite", f"sqlite:///{workdir / 'gallery.db'}"))
        if args.postgres:
            with postgres_schema() as url:
                result["backends"].append(one("postgresql", url))
    result["load_avg_after"] = load_average()
    path = write("http", result)
    for backend in result["backends"]:
        for run in backend["runs"]:
            print(
                f"{backend['database']:10} {run['endpoint']:8} c={run['concurrency']}: p50 {run['p50_ms']:.1f} ms, "
                f"p95 {run['p95_ms']:.1f} ms, {run['throughput_rps']:.1f} req/s, statuses {run['statuses']}"
            )
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
