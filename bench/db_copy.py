"""`facegate db copy` at scale: a synthetic gallery copied PostgreSQL -> SQLite and SQLite -> PostgreSQL.

    python -m bench.db_copy [--faces 100000] [--batch-rows 5000]

A fresh PostgreSQL schema (127.0.0.1:5432, database `test`, dropped afterwards) gets `--faces` face-like synthetic
faces by COPY (app/gallery/bulk.py), each with its base embedding too (as every face enrolled today has: 1 kB of
embeddings per face). Each copy then runs in a child process of its own, which reports its time and its peak
resident memory's growth during the copy (sampled every 10 ms): PostgreSQL -> a new
SQLite file, then that file -> a second fresh schema. Row counts are checked on arrival.

Writes bench/results/db_copy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.gallery import bulk, db, synthetic
from bench.common import write

POSTGRES_URL = os.environ.get("FACEGATE_BENCH_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
MODEL = "bench-synthetic"

# Run in a child: copy, and print the seconds and the resident memory's growth during the copy as JSON.
_CHILD = """
import json, os, sys, threading, time
from app.gallery.copy import copy_gallery
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
source, target, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
before, peak, done = rss(), [0.0], threading.Event()
def sample():
    while not done.wait(0.01):
        peak[0] = max(peak[0], rss())
threading.Thread(target=sample, daemon=True).start()
report = copy_gallery(source, target, batch_rows=batch)
done.set()
print(json.dumps({"seconds": report.seconds, "faces": report.faces, "identities": report.identities,
                  "rss_before_mb": round(before, 1), "rss_peak_growth_mb": round(max(peak[0], rss()) - before, 1)}))
"""


def _schema_url(schema: str) -> str:
    return make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )


def _conninfo() -> str:
    return make_url(POSTGRES_URL).set(drivername="postgresql").render_as_string(hide_password=False)


def _child(source: str, target: str, batch_rows: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, source, target, str(batch_rows)], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--batch-rows", type=int, default=5_000)
    args = parser.parse_args()

    schemas = [f"bench_copy_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    with psycopg.connect(_conninfo(), autocommit=True) as connection:
        for schema in schemas:
            connection.execute(f'CREATE SCHEMA "{schema}"')
    source_url, back_url = (_schema_url(s) for s in schemas)
    results: dict[str, Any] = {"faces": args.faces, "batch_rows": args.batch_rows}
    try:
        engine = db.make_engine(source_url)
        db.upgrade(engine)
        data = synthetic.gallery(args.faces, seed=0)
        with db.make_session_factory(engine).begin() as session:
            identities, _ = bulk.copy_synthetic_gallery(
                session, embeddings=data.embeddings, owners=data.owners, model_version=MODEL
            )
            session.execute(text("UPDATE faces SET base_embedding = embedding"))
        engine.dispose()
        results["identities"] = identities
        with tempfile.TemporaryDirectory() as folder:
            sqlite_url = f"sqlite:///{Path(folder) / 'copy.db'}"
            results["postgres_to_sqlite"] = _child(source_url, sqlite_url, args.batch_rows)
            results["sqlite_file_mb"] = round((Path(folder) / "copy.db").stat().st_size / 2**20, 1)
            results["sqlite_to_postgres"] = _child(sqlite_url, back_url, args.batch_rows)
        for key in ("postgres_to_sqlite", "sqlite_to_postgres"):
            assert (results[key]["faces"], results[key]["identities"]) == (args.faces, identities), results[key]
    finally:
        with psycopg.connect(_conninfo(), autocommit=True) as connection:
            for schema in schemas:
                connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    print(json.dumps(results, indent=2))
    write("db_copy", results)


if __name__ == "__main__":
    main()
