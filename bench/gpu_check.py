"""GPU check of the ONNX models on a lent CUDA machine: provider actually applied, parity with the CPU
references from bench/gpu_inputs.py, and throughput. The steps to run it there are in bench/gpu_run.md.

    python3 -m bench.gpu_check --inputs ~/gpu_inputs [--out DIR] [--budget-s 150] [--cpu-ok] [--preflight]

Standalone on purpose: the GPU machine runs it with its own python3 (3.12, numpy, CPU onnxruntime, and
onnxruntime-gpu carried onto PYTHONPATH), which lacks pydantic-settings, Pillow is not needed, and
`app.config` cannot be imported there. The only project code it imports is app.vision.pyramid, which needs
numpy alone, to rebuild the detector's tiled-pyramid tensors exactly as FaceDetector does; each rebuilt
tensor is checked against the sha256 recorded where its CPU reference was computed.

What it measures (JSON to DIR/gpu_check.json, DIR = --out or $OUT or bench/results; a summary on stdout):
- providers each session applied, and the nodes' placement; it stops unless CUDA comes first (--cpu-ok
  lets it run on CPU, for a dry run on a machine without a GPU);
- parity, with the CUDA provider's TF32 off (use_tf32=0, the service default) and on (ONNX Runtime's
  default): embeddings of real face chips against the CPU references (= dlib's within 1e-6), per
  dimension, at batch 64, 32 and 1, and what the differences do to squared-L2 distances and decisions at
  0.36; detector score maps against the CPU references, and whether the cells above 0 and their order
  (hence, after decode and NMS, the boxes) are identical;
- speed: embedding faces/s at batch 1, 32 and 256, plain run() and with IO binding (input and output kept
  on the device); detector ms on a 640x480 photo's pyramid tensor and a 1024-px working image's; the same
  machine's CPU provider as a baseline; optional variants (cuDNN EXHAUSTIVE search, CUDA graphs) while the
  time budget lasts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
THRESHOLD = 0.36  # squared L2, the service default
EMBED_BATCHES = (1, 32, 256)


class CheckFailed(SystemExit):
    """A condition the check exists to catch (wrong provider, wrong models, wrong tensors): stop loudly."""

    def __init__(self, message: str) -> None:
        super().__init__(f"GPU CHECK FAILED: {message}")


# ----------------------------------------------------------------------------------------------------------
# small helpers


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Repeats:
    """Timing plan: `warmup` runs, then up to `reps` timed runs, at least `min_reps`, stopping after `max_s`."""

    warmup: int
    reps: int
    min_reps: int
    max_s: float


def timed(fn: Callable[[], object], plan: Repeats) -> dict[str, float]:
    """Median (and p10, p90) wall time of `fn` in ms under `plan`."""
    for _ in range(plan.warmup):
        fn()
    samples: list[float] = []
    stop = time.perf_counter() + plan.max_s
    while len(samples) < plan.reps and (len(samples) < plan.min_reps or time.perf_counter() < stop):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(samples) * 1000,
        "p10_ms": ordered[int(0.1 * (len(ordered) - 1))] * 1000,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000,
        "reps": len(samples),
    }


def gpu_description() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


class StderrCapture:
    """Collect what native code writes to fd 2 (ONNX Runtime's log) while the block runs."""

    def __enter__(self) -> Self:
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode(errors="replace")
        self._file.close()


# ----------------------------------------------------------------------------------------------------------
# sessions


class Sessions:
    """Opens ONNX Runtime sessions as app.vision.runtime does (same provider options), and records them."""

    def __init__(self, ort: Any, models: Path, *, cpu_ok: bool) -> None:
        self.ort = ort
        self.models = models
        self.cpu_ok = cpu_ok
        self.opened: dict[str, dict[str, Any]] = {}

    def open(self, label: str, model: str, *, cuda: dict[str, str] | None, placement: bool = False) -> Any:
        """cuda=None: CPU only; else the CUDA provider with these options first, CPU as the fallback."""
        ort = self.ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1
        if cuda is None:
            providers: list[Any] = [CPU]
        else:
            merged = {"cudnn_conv_algo_search": "HEURISTIC", **cuda}  # the service's options
            providers = [(CUDA, merged), CPU]
        log = ""
        start = time.perf_counter()
        if placement:
            options.log_severity_level = 0  # verbose: ONNX Runtime then lists where each node runs
            with StderrCapture() as captured:
                session = ort.InferenceSession(str(self.models / model), sess_options=options, providers=providers)
            log = captured.text
            for line in log.splitlines():  # give back errors and warnings; keep the verbose rest out of sight
                if "[E:" in line or "[W:" in line:
                    print(re.sub(r"\x1b\[[0-9;]*m", "", line), file=sys.stderr)
        else:
            session = ort.InferenceSession(str(self.models / model), sess_options=options, providers=providers)
        seconds = time.perf_counter() - start
        applied = session.get_providers()
        record: dict[str, Any] = {"model": model, "asked": str(providers), "applied": applied, "open_s": round(seconds, 3)}
        if placement:
            record["placement"] = [
                line.split("]", 1)[-1].strip() for line in log.splitlines() if "placed on" in line or "Node placements" in line
            ]
        self.opened[label] = record
        if cuda is not None and applied[0] != CUDA:
            message = f"{label}: the CUDA provider is not in use (applied {applied}; available {ort.get_available_providers()})"
            if not self.cpu_ok:
                raise CheckFailed(message)
            print(f"warning: {message}; going on because of --cpu-ok", file=sys.stderr)
        return session

    def on_cuda(self, label: str) -> bool:
        return bool(self.opened[label]["applied"][0] == CUDA)


def device_of(sessions: Sessions, label: str) -> str:
    return "cuda" if sessions.on_cuda(label) else "cpu"


# ----------------------------------------------------------------------------------------------------------
# inputs


def check_models(info: dict[str, Any], models: Path, *, required: bool) -> dict[str, str]:
    """Each model file against the sha256 the references were built with: 'ok', 'missing' or 'differs'."""
    found: dict[str, str] = {}
    for name, expected in info["models_sha256"].items():
        path = models / f"{name}.onnx"
        found[name] = "missing" if not path.is_file() else "ok" if sha256_file(path) == expected else "differs"
    if required and any(v != "ok" for v in found.values()):
        raise CheckFailed(f"models in {models} are not the ones the references were built with ({found}): carry models/dist/*.onnx, or rerun bench.gpu_inputs")
    return found


def load_inputs(folder: Path) -> dict[str, Any]:
    """The references built by bench/gpu_inputs.py, with the detector tensors rebuilt and checked."""
    info = json.loads((folder / "inputs.json").read_text())
    embed = np.load(folder / "embed.npz")
    detect = np.load(folder / "detect.npz")

    from app.vision.pyramid import tiled_layout, tiled_pyramid, upsample  # numpy only

    means = detect["means"]
    cases = []
    for index, case in enumerate(info["detect"]):
        pixels = np.ascontiguousarray(detect[f"photo_{index}"])
        for _ in range(case["upsample"]):
            pixels = upsample(pixels)

        def build(pixels: np.ndarray = pixels) -> np.ndarray:  # what FaceDetector.detect does before the network
            return tiled_pyramid(pixels, tiled_layout(pixels.shape[0], pixels.shape[1]), means)

        tensor = build()
        same = hashlib.sha256(tensor.tobytes()).hexdigest() == case["tensor_sha256"]
        cases.append(
            {**case, "tensor": tensor, "build": build, "ref_scores": detect[f"scores_{index}"], "tensor_matches_reference": same}
        )
    return {"info": info, "chips": embed["chips"], "ref_embeddings": embed["embeddings"], "cases": cases}


# ----------------------------------------------------------------------------------------------------------
# parity


def embed(session: Any, chips: np.ndarray, batch: int) -> np.ndarray:
    parts = [session.run(["embeddings"], {"chips": chips[i : i + batch]})[0] for i in range(0, len(chips), batch)]
    return np.asarray(np.concatenate(parts), dtype=np.float32)


def squared_distances(e: np.ndarray) -> np.ndarray:
    e = e.astype(np.float64)
    return np.asarray(((e[:, None, :] - e[None, :, :]) ** 2).sum(-1))


def embed_parity(got: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    per_dim = diff.max(axis=0)
    d_got, d_ref = squared_distances(got), squared_distances(ref)
    upper = np.triu_indices(len(ref), 1)
    flips = int(((d_got[upper] <= THRESHOLD) != (d_ref[upper] <= THRESHOLD)).sum())
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "worst_dim": int(per_dim.argmax()),
        "max_abs_diff_per_dim": [float(v) for v in per_dim],
        "max_sq_l2_to_ref": float(((got.astype(np.float64) - ref) ** 2).sum(1).max()),
        "pair_distance_max_abs_diff": float(np.abs(d_got - d_ref)[upper].max()),
        "pairs": len(upper[0]),
        "decisions_flipped_at_0.36": flips,
    }


def ranked_cells(scores: np.ndarray, threshold: float = 0.0) -> list[tuple[int, int]]:
    """Cells above the threshold in detect.decode's order (descending score, raster order on ties)."""
    rows, cols = np.nonzero(scores > threshold)
    order = np.argsort(-scores[rows, cols].astype(np.float64), kind="stable")
    return list(zip(rows[order].tolist(), cols[order].tolist(), strict=True))


def detect_parity(got: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Same cells above 0 in the same order => detect.decode and NMS give the same boxes (they read nothing else)."""
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    cells_got, cells_ref = ranked_cells(got), ranked_cells(ref)
    same_set = set(cells_got) == set(cells_ref)
    return {
        "max_abs_diff": float(diff.max()),
        "cells_above_0": [len(cells_got), len(cells_ref)],
        "cells_identical": same_set,
        "order_identical": cells_got == cells_ref,
        "boxes_identical": cells_got == cells_ref,
        "ref_margin_to_0": float(np.abs(ref).min()),  # how close any reference cell is to the cut
    }


def detector_scores(session: Any, tensor: np.ndarray) -> np.ndarray:
    return np.asarray(session.run(["scores"], {"image": tensor})[0][0, 0], dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------
# speed


def plain_runner(session: Any, name_in: str, name_out: str, x: np.ndarray) -> Callable[[], object]:
    return lambda: session.run([name_out], {name_in: x})


def bound_runner(ort: Any, session: Any, name_in: str, name_out: str, x: np.ndarray, out_shape: tuple[int, ...], device: str) -> Callable[[], object]:
    """IO binding: the input copied to the device once, the output written into a preallocated device buffer."""
    x_dev = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), device, 0)
    y_dev = ort.OrtValue.ortvalue_from_shape_and_type(list(out_shape), np.float32, device, 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input(name_in, x_dev)
    binding.bind_ortvalue_output(name_out, y_dev)

    def run() -> None:
        session.run_with_iobinding(binding)

    run.keep = (x_dev, y_dev, binding)  # type: ignore[attr-defined]  # the buffers live as long as the runner
    return run


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """The few answers the check exists for, against issue 3's tolerances (embeddings within 1e-4 of dlib's)."""
    parity, speed = result.get("parity", {}), result.get("speed", {})
    gpu_sessions = [s for k, s in result.get("sessions", {}).items() if not k.endswith("_cpu")]
    out: dict[str, Any] = {"cuda_applied": all(s["applied"][0] == CUDA for s in gpu_sessions) if gpu_sessions else None}
    for label in ("cuda_tf32_off", "cuda_tf32_on"):
        runs = parity.get("embed", {}).get(label, {})
        if runs:
            worst = max(p["max_abs_diff"] for p in runs.values())
            out[f"embed_{label}_max_abs_diff"] = worst
            out[f"embed_{label}_within_1e-4"] = worst <= 1e-4
            out[f"embed_{label}_decision_flips"] = sum(p["decisions_flipped_at_0.36"] for p in runs.values())
        cases = [entry[label] for entry in parity.get("detect", {}).values() if label in entry]
        if cases:
            out[f"detect_{label}_boxes_identical"] = all(c["boxes_identical"] for c in cases)
            out[f"detect_{label}_max_abs_diff"] = max(c["max_abs_diff"] for c in cases)
    rates = {k: v for k, v in speed.get("embed_faces_per_s", {}).items() if "/b256/" in k and not k.startswith("cpu")}
    rates.update({k: v["faces_per_s"] for k, v in speed.get("variants", {}).items() if isinstance(v, dict) and "/b256/" in k})
    if rates:
        best = max(rates, key=lambda k: rates[k])
        out["best_embed_b256"] = {"config": best, "faces_per_s": rates[best]}
        out["embed_target_3000_per_s"] = rates[best] >= 3000
    return out


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=Path, default=REPO_ROOT / "gpu_inputs", help="folder written by bench.gpu_inputs")
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "models" / "dist")
    parser.add_argument("--out", type=Path, default=None, help="where gpu_check.json goes (default $OUT, else bench/results)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="optional measurements stop once this much time has passed")
    parser.add_argument("--cpu-ok", action="store_true", help="run even if CUDA is not applied (dry run without a GPU)")
    parser.add_argument("--preflight", action="store_true", help="only check python, packages, models and rebuilt tensors")
    args = parser.parse_args()
    started = time.perf_counter()
    out_dir = args.out or Path(os.environ.get("OUT") or REPO_ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)

    def elapsed() -> float:
        return time.perf_counter() - started

    def say(text: str) -> None:
        print(f"[{elapsed():6.1f}s] {text}", flush=True)

    result: dict[str, Any] = {}

    def write() -> Path:
        result["verdict"] = verdict(result)
        result["elapsed_s"] = round(elapsed(), 1)
        path = out_dir / "gpu_check.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        return path

    try:
        run_check(args, result, say, write, elapsed)
    except CheckFailed as exc:
        result["failed"] = str(exc.code)
        print(f"wrote {write()}", flush=True)
        raise


def run_check(
    args: argparse.Namespace,
    result: dict[str, Any],
    say: Callable[[str], None],
    write: Callable[[], Path],
    elapsed: Callable[[], float],
) -> None:
    import onnxruntime as ort

    preload_error = None
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # CUDA 13 / cuDNN 9 from NVIDIA's pip packages
        except Exception as exc:  # noqa: BLE001 - reported, and the provider check below decides
            preload_error = repr(exc)
    result["machine"] = {
        "gpu": gpu_description(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_file": ort.__file__,
        "available_providers": ort.get_available_providers(),
        "preload_dlls_error": preload_error,
        "cpu_cores": os.cpu_count(),
    }
    say(f"python {platform.python_version()}, numpy {np.__version__}, onnxruntime {ort.__version__} at {ort.__file__}")
    say(f"GPU: {result['machine']['gpu']}; providers available: {ort.get_available_providers()}")

    inputs = load_inputs(args.inputs.expanduser())
    models = check_models(inputs["info"], args.models, required=not args.preflight)
    chips, ref_emb, cases = inputs["chips"], inputs["ref_embeddings"], inputs["cases"]
    result["inputs"] = {
        "models": models,
        "faces": len(chips),
        "model_version": inputs["info"]["model_version"],
        "built_with": inputs["info"]["built_with"],
        "tensors_match_reference": {c["name"]: c["tensor_matches_reference"] for c in cases},
    }
    say(f"models {models}; {len(chips)} chips; rebuilt tensors match the references: {result['inputs']['tensors_match_reference']}")

    if args.preflight:
        say(f"preflight done: {write()}")
        return

    sessions = Sessions(ort, args.models, cpu_ok=args.cpu_ok)
    configs = {"cuda_tf32_off": {"use_tf32": "0"}, "cuda_tf32_on": {"use_tf32": "1"}}
    emb: dict[str, Any] = {}
    det: dict[str, Any] = {}
    for label, options in configs.items():  # CUDA first: fail fast if it is not applied
        emb[label] = sessions.open(f"embedder_{label}", "embedder.onnx", cuda=options, placement=label == "cuda_tf32_off")
        det[label] = sessions.open(f"detector_{label}", "detector.onnx", cuda=options, placement=label == "cuda_tf32_off")
    emb["cpu"] = sessions.open("embedder_cpu", "embedder.onnx", cuda=None)
    det["cpu"] = sessions.open("detector_cpu", "detector.onnx", cuda=None)
    result["sessions"] = sessions.opened
    on_gpu = sessions.on_cuda("embedder_cuda_tf32_off")
    say("sessions: " + ", ".join(f"{k} -> {v['applied'][0]} ({v['open_s']} s)" for k, v in sessions.opened.items()))
    for label in ("embedder_cuda_tf32_off", "detector_cuda_tf32_off"):
        say(f"{label} placement: {sessions.opened[label].get('placement')}")

    # ---- parity: embeddings
    parity: dict[str, Any] = {"embed": {}, "detect": {}}
    cpu_here = embed(emb["cpu"], chips, 32)
    parity["embed"]["cpu_this_machine_vs_ref"] = {k: v for k, v in embed_parity(cpu_here, ref_emb).items() if k != "max_abs_diff_per_dim"}
    for label in configs:
        parity["embed"][label] = {f"batch_{b}": embed_parity(embed(emb[label], chips, b), ref_emb) for b in (len(chips), 32, 1)}
    write()

    # ---- parity: detector score maps
    for case in cases:
        entry: dict[str, Any] = {"tensor_shape": case["tensor_shape"], "tensor_matches_reference": case["tensor_matches_reference"]}
        cpu_scores = detector_scores(det["cpu"], case["tensor"])
        if case["tensor_matches_reference"]:
            entry["cpu_this_machine_vs_ref"] = detect_parity(cpu_scores, case["ref_scores"])
        for label in configs:
            got = detector_scores(det[label], case["tensor"])
            # Against the shipped reference when the tensor is bit-identical; else against this machine's CPU.
            reference = case["ref_scores"] if case["tensor_matches_reference"] else cpu_scores
            entry[label] = detect_parity(got, reference)
            entry[label]["vs"] = "reference" if case["tensor_matches_reference"] else "cpu_this_machine"
        parity["detect"][case["name"]] = entry
    result["parity"] = parity
    write()
    say("parity done")

    # ---- speed
    reps = Repeats(warmup=3, reps=200, min_reps=5, max_s=2.0) if on_gpu else Repeats(warmup=1, reps=20, min_reps=2, max_s=0.5)
    cpu_reps = replace(reps, reps=10, max_s=min(reps.max_s, 1.0))
    pool = np.ascontiguousarray(np.concatenate([chips] * (-(-max(EMBED_BATCHES) // len(chips))))[: max(EMBED_BATCHES)])
    speed: dict[str, Any] = {"embed_faces_per_s": {}, "embed": {}, "detect_ms": {}, "detect": {}, "variants": {}}
    for label in configs:
        device = device_of(sessions, f"embedder_{label}")
        for batch in EMBED_BATCHES:
            x = pool[:batch]
            runners = {
                "run": plain_runner(emb[label], "chips", "embeddings", x),
                "iobinding": bound_runner(ort, emb[label], "chips", "embeddings", x, (batch, 128), device),
            }
            for mode, fn in runners.items():
                t = timed(fn, reps)
                key = f"{label}/b{batch}/{mode}"
                speed["embed"][key] = t
                speed["embed_faces_per_s"][key] = round(batch / (t["median_ms"] / 1000), 1)
        say(f"embed speed {label}: " + ", ".join(f"{k.split('/', 1)[1]} {v:.0f}/s" for k, v in speed["embed_faces_per_s"].items() if k.startswith(label)))
    write()

    det_cases = [c for c in cases if c["name"].startswith(("photo_640x480", "dev_"))]
    for case in det_cases:
        out_shape = (1, 1, *case["ref_scores"].shape)
        for label in (*configs, "cpu"):
            name = f"detector_{label}"
            runners = {"run": plain_runner(det[label], "image", "scores", case["tensor"])}
            if label != "cpu":
                runners["iobinding"] = bound_runner(ort, det[label], "image", "scores", case["tensor"], out_shape, device_of(sessions, name))
            for mode, fn in runners.items():
                t = timed(fn, reps if label != "cpu" else cpu_reps)
                key = f"{case['name']}/{label}/{mode}"
                speed["detect"][key] = t
                speed["detect_ms"][key] = round(t["median_ms"], 3)
        t = timed(case["build"], cpu_reps)  # the CPU side of detection (numpy), for the end-to-end picture
        speed["detect"][f"{case['name']}/pyramid_build_numpy"] = t
        speed["detect_ms"][f"{case['name']}/pyramid_build_numpy"] = round(t["median_ms"], 3)
    say("detect ms: " + ", ".join(f"{k} {v:.2f}" for k, v in speed["detect_ms"].items()))

    t = timed(plain_runner(emb["cpu"], "chips", "embeddings", pool[:32]), cpu_reps)
    speed["embed"]["cpu/b32/run"] = t
    speed["embed_faces_per_s"]["cpu/b32/run"] = round(32 / (t["median_ms"] / 1000), 1)
    result["speed"] = speed
    write()

    # ---- optional variants, while the budget lasts (GPU only)
    variants: list[tuple[str, dict[str, str], int]] = [
        ("exhaustive_tf32_off", {"use_tf32": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"}, 256),
        ("exhaustive_tf32_on", {"use_tf32": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"}, 256),
        ("cuda_graph_tf32_off", {"use_tf32": "0", "enable_cuda_graph": "1"}, 256),
        ("cuda_graph_tf32_off", {"use_tf32": "0", "enable_cuda_graph": "1"}, 1),
        ("cuda_graph_tf32_on", {"use_tf32": "1", "enable_cuda_graph": "1"}, 256),
    ]
    for name, options, batch in variants if on_gpu else []:
        if elapsed() > args.budget_s:
            speed["variants"][f"{name}/b{batch}"] = "skipped: time budget spent"
            continue
        try:
            session = sessions.open(f"embedder_{name}_b{batch}", "embedder.onnx", cuda=options)
            fn = bound_runner(ort, session, "chips", "embeddings", pool[:batch], (batch, 128), "cuda")
            t = timed(fn, reps)
            # A CUDA-graph session replays one shape only, so its parity is not re-measured here.
            diff = None if "cuda_graph" in name else float(np.abs(embed(session, chips, len(chips)) - ref_emb).max())
            speed["variants"][f"{name}/b{batch}/iobinding"] = {
                **t,
                "faces_per_s": round(batch / (t["median_ms"] / 1000), 1),
                "max_abs_diff_vs_ref": diff,
            }
        except (Exception, CheckFailed) as exc:  # noqa: BLE001 - an optional variant failing is a finding, not a crash
            speed["variants"][f"{name}/b{batch}"] = f"failed: {exc!r}"[:500]
        write()
    result["sessions"] = sessions.opened
    path = write()

    # ---- summary
    print()
    print("=" * 100)
    print("VERDICT: " + json.dumps(result["verdict"]))
    m = result["machine"]
    print(f"GPU {m['gpu']} | onnxruntime {m['onnxruntime']} | python {m['python']} | numpy {m['numpy']} | {m['cpu_cores']} CPU cores")
    print("providers applied: " + "; ".join(f"{k}: {v['applied'][0]}" for k, v in sessions.opened.items()))
    print("placement (tf32 off): " + " | ".join(sessions.opened["embedder_cuda_tf32_off"].get("placement", [])[1:] + sessions.opened["detector_cuda_tf32_off"].get("placement", [])[1:]))
    print(f"\nEMBED parity vs CPU reference ({len(chips)} real chips; {parity['embed'][next(iter(configs))]['batch_1']['pairs']} pairs at {THRESHOLD}):")
    c = parity["embed"]["cpu_this_machine_vs_ref"]
    print(f"  cpu (this machine)      max|d| {c['max_abs_diff']:.2e}")
    for label in configs:
        for batch, p in parity["embed"][label].items():
            print(
                f"  {label:14s} {batch:9s} max|d| {p['max_abs_diff']:.2e} (dim {p['worst_dim']:3d}), mean {p['mean_abs_diff']:.1e}, "
                f"pair-dist max|d| {p['pair_distance_max_abs_diff']:.1e}, flips {p['decisions_flipped_at_0.36']}"
            )
    print("\nDETECT parity (score maps; boxes identical = same cells > 0 in the same order):")
    for name, entry in parity["detect"].items():
        for label in configs:
            p = entry[label]
            print(
                f"  {name:20s} {label:14s} max|d| {p['max_abs_diff']:.2e}  cells>0 {p['cells_above_0'][0]}/{p['cells_above_0'][1]}  "
                f"boxes identical {p['boxes_identical']}  (vs {p['vs']}; ref margin to 0 {p['ref_margin_to_0']:.1e})"
            )
    print("\nEMBED faces/s (median):")
    for key, value in speed["embed_faces_per_s"].items():
        print(f"  {key:32s} {value:10.0f}   ({speed['embed'][key]['median_ms']:.3f} ms/batch)")
    print("\nDETECT ms (median):")
    for key, value in speed["detect_ms"].items():
        print(f"  {key:45s} {value:8.2f}")
    if speed["variants"]:
        print("\nVariants (IO binding):")
        for key, value in speed["variants"].items():
            print(f"  {key:40s} " + (f"{value['faces_per_s']:10.0f}/s  max|d| {value['max_abs_diff_vs_ref']}" if isinstance(value, dict) else value))
    print(f"\nwrote {path} in {elapsed():.1f} s")


if __name__ == "__main__":
    main()
