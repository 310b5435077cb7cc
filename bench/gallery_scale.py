"""Large galleries: search latency of the exact and approximate backends, top-1 agreement, memory per face, and
PostgreSQL bulk load and start-up with a million faces.

    python -m bench.gallery_scale [--sizes 10000,100000,1000000] [--queries 400] [--pg-faces 1000000] [--no-postgres]

1. For each size: a face-like synthetic gallery (app/gallery/synthetic.py: ~2 faces per identity; same-person
   squared distances ~0.1-0.25, different people ~0.6-1.2), filled into an exact index and an approximate one
   (default settings: IVF with auto cells, nprobe 256, 64 candidates; built at any size here). Queries: fresh
   faces of enrolled people (75 %) and strangers (25 %), one query per call, top_k 5 (as /identify asks).
   Reported: p50/p95 per query, the approximate answer's top-1 identity = the exact one's (recall@1; enrolled,
   strangers, all), index build time and memory (bytes per face: arrays of the exact index; the IVF's own copy).
2. PostgreSQL (127.0.0.1:5432, database `test`, a fresh schema dropped afterwards): `--pg-faces` faces written with
   COPY (app/gallery/bulk.py) after the migrations, then `Gallery.open` timed as start-up: reading every row
   (server-side binary cursor) and the index ready, exact and approximate.

Writes bench/results/gallery_scale.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from app.blas import limit_blas_threads
from app.config import IndexBackend, IndexSettings, RuntimeSettings
from app.gallery import Gallery, synthetic
from app.gallery.ann import ApproximateIndex
from app.gallery.index import GalleryIndex
from bench.common import RESULTS_DIR, load_average, summary, write

POSTGRES_URL = os.environ.get("FACEGATE_BENCH_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
MODEL = "bench-synthetic"
TOP_K = 5
TARGET_P50_MS_1M = 25.0
TARGET_RECALL_1M = 0.99
TARGET_STARTUP_S = 30.0


def log(message: str) -> None:
    print(f"[gallery_scale] {message} (load {load_average()[0]})", file=sys.stderr, flush=True)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _time_queries(index: GalleryIndex, queries: np.ndarray) -> tuple[list[float], list[str | None]]:
    index.search(queries[:5], top_k=TOP_K)  # warm-up
    times, top1 = [], []
    for query in queries:
        start = time.perf_counter()
        result = index.search(query, top_k=TOP_K)[0]
        times.append((time.perf_counter() - start) * 1000)
        top1.append(result[0].identity_id if result else None)
    return times, top1


def bench_size(size: int, n_queries: int) -> dict[str, Any]:
    log(f"{size:,} faces: generating")
    data = synthetic.gallery(size, seed=size)
    identity_ids = [f"{i:032x}" for i in range(len(data.centres))]
    face_ids = [f"f{i:031x}" for i in range(size)]
    owners = [identity_ids[o] for o in data.owners]
    strangers = n_queries // 4
    queries, who = synthetic.probes(data, enrolled=n_queries - strangers, strangers=strangers, seed=size + 1)
    out: dict[str, Any] = {"faces": size, "identities": len(data.centres), "queries": len(queries), "strangers": strangers}
    answers: dict[str, list[str | None]] = {}
    for name in ("exact", "approximate"):
        gc.collect()
        rss = _rss_bytes()
        index: GalleryIndex = (
            GalleryIndex(MODEL) if name == "exact" else ApproximateIndex(MODEL, min_size=1, background_above=size + 1)
        )
        start = time.perf_counter()
        index.replace_all(face_ids, owners, data.embeddings, last_change_id=0)  # the IVF built in this thread
        build_s = time.perf_counter() - start
        rss_delta = _rss_bytes() - rss
        times, answers[name] = _time_queries(index, queries)
        entry = {"build_s": build_s, **summary(times), "rss_delta_bytes_per_face": rss_delta / size}
        entry["matrix_bytes_per_face"] = (128 * 4 + 4 + 4)  # vectors + squared norms + identity codes
        if isinstance(index, ApproximateIndex):
            entry["ivf_cells"] = index.ivf_cells
            entry["nprobe"] = min(index.nprobe, index.ivf_cells)
            entry["ivf_bytes_per_face"] = index.ivf_bytes() / size
        out[name] = entry
        log(f"{size:,} {name}: build {build_s:.2f} s, p50 {entry['median_ms']:.2f} ms, p95 {entry['p95_ms']:.2f} ms")
        del index
    agree = np.array([a == b for a, b in zip(answers["exact"], answers["approximate"])])
    known = who >= 0
    out["recall_at_1"] = {
        "all": float(agree.mean()),
        "enrolled": float(agree[known].mean()),
        "strangers": float(agree[~known].mean()) if (~known).any() else None,
    }
    log(f"{size:,}: recall@1 {out['recall_at_1']}")
    return out


def bench_postgres(faces: int) -> dict[str, Any]:
    import psycopg
    from sqlalchemy.engine import make_url

    from app.gallery import bulk

    url = make_url(POSTGRES_URL)
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    schema_url = url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    out: dict[str, Any] = {"faces": faces}
    try:
        data = synthetic.gallery(faces, seed=7)
        gallery = Gallery.open(schema_url, MODEL)  # migrations
        try:
            start = time.perf_counter()
            with gallery.session() as session:
                identities, _ = bulk.copy_synthetic_gallery(
                    session, embeddings=data.embeddings, owners=data.owners, model_version=MODEL
                )
            out["copy_s"] = time.perf_counter() - start
            out["identities"] = identities
            log(f"postgres: COPY of {faces:,} faces in {out['copy_s']:.1f} s")
        finally:
            gallery.close()
        with psycopg.connect(conninfo, autocommit=True) as connection:
            connection.execute(f'ANALYZE "{schema}".faces')
            size = connection.execute(f"SELECT pg_total_relation_size('\"{schema}\".faces')").fetchone()
            out["faces_table_bytes"] = int(size[0]) if size else None
        del data
        gc.collect()
        for name, settings in (
            ("exact", IndexSettings(backend=IndexBackend.EXACT)),
            ("approximate", IndexSettings(backend=IndexBackend.APPROXIMATE)),
        ):
            start = time.perf_counter()
            opened = Gallery.open(schema_url, MODEL, migrate=False, index=settings)
            elapsed = time.perf_counter() - start
            stats = opened.stats()
            out[f"startup_{name}_s"] = elapsed
            log(f"postgres: start-up ({name}) with {stats.size:,} faces in {elapsed:.1f} s")
            if isinstance(opened.index, ApproximateIndex):
                opened.index.wait_until_built()  # built on a thread from 200k faces on, exact answering meanwhile
                out["ivf_ready_s"] = time.perf_counter() - start
                out["ivf_cells"] = opened.index.ivf_cells
                log(f"postgres: IVF ready {out['ivf_ready_s']:.1f} s after start")
            opened.close()
            gc.collect()
    finally:
        with psycopg.connect(conninfo, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="gallery sizes (faces), comma-separated")
    parser.add_argument("--queries", type=int, default=400, help="queries per size (a quarter are strangers)")
    parser.add_argument("--pg-faces", type=int, default=1_000_000, help="faces bulk-loaded into PostgreSQL")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    # The exact search's matmul timed with the BLAS threads the service gives it (FaceService.open caps them, 1 by
    # default): OpenBLAS's own default (one per core) made these figures those of a search the service never runs.
    blas_threads = RuntimeSettings().blas_threads
    limit_blas_threads(blas_threads)
    before = load_average()
    previous = RESULTS_DIR / "gallery_scale.json"
    reused: str | None = None  # when the search figures are the last run's: its date (this run's is written too)
    if not sizes and previous.is_file():  # --sizes '': PostgreSQL only, keep the search figures of the last run
        last = json.loads(previous.read_text())
        measured, reused = last["sizes"], last.get("sizes_measured", last["date"])
        log(f"search figures not measured: those of {reused} kept")
    else:
        measured = [bench_size(size, args.queries) for size in sizes]
    result: dict[str, Any] = {
        "load_avg_before": before,
        "sizes": measured,
        **({"sizes_measured": reused} if reused else {}),
        "settings": IndexSettings().model_dump(mode="json"),
        "blas_threads": blas_threads,
        "targets": {"p50_ms_1m": TARGET_P50_MS_1M, "recall_1m": TARGET_RECALL_1M, "startup_s": TARGET_STARTUP_S},
    }
    if not args.no_postgres:
        result["postgres"] = bench_postgres(args.pg_faces)
    result["load_avg_after"] = load_average()
    path = write("gallery_scale", result)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
