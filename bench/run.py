"""`make bench`: the vision bench, then the HTTP bench, each in its own process; then one markdown report.

    python -m bench.run [--quick] [--postgres] [--only vision|http] [--report-only]

Writes bench/results/vision.json, http.json and report.md (git-ignored) and prints the report, ready for the
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
                f"{' (non-200: ' + str(errors) + ')' if errors else ''} | {target} |"
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


def report() -> str:
    parts = ["## Measured performance", ""]
    for name, render in (("vision", vision_report), ("http", http_report)):
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
    parser.add_argument("--only", choices=["vision", "http"])
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
