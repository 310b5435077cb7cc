"""Shared bench helpers: machine description, alternating timing, the bench photos, JSON output."""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from app.config import REPO_ROOT

FACES_DIR = Path(os.environ.get("FACEGATE_FACES_DIR", REPO_ROOT.parent / "shared" / "faces"))
RESULTS_DIR = Path(os.environ.get("FACEGATE_BENCH_OUT", REPO_ROOT / "bench" / "results"))
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}
BENCH_SIZE = (640, 480)  # width, height of the bench photos


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (runnable processes; above the core count means CPU contention)."""
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict[str, Any]:
    import numpy
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "onnxruntime": ort.__version__,
        "load_avg": load_average(),
    }
    try:
        import dlib

        info["dlib"] = dlib.__version__
    except ImportError:
        pass
    return info


# ------------------------------------------------------------------------------------------------ timing


def summary(wall_ms: Sequence[float], cpu_ms: Sequence[float] | None = None, *, per: int = 1) -> dict[str, float]:
    """Median / min / p95 of wall-clock samples (and the median process CPU time), divided by `per` (items per call)."""
    ordered = sorted(wall_ms)
    out = {
        "median_ms": statistics.median(ordered) / per,
        "min_ms": ordered[0] / per,
        "p95_ms": ordered[round(0.95 * (len(ordered) - 1))] / per,
        "samples": len(ordered),
    }
    if cpu_ms:
        out["cpu_median_ms"] = statistics.median(cpu_ms) / per
    return out


def alternate(
    runs: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1, per: int = 1
) -> dict[str, dict[str, float]]:
    """Time each callable `repeats` times, alternating between them so that load drifts hit all alike.

    Returns per contender: wall-clock median/min/p95 and the median process CPU time (all threads: for a
    multi-threaded runtime CPU > wall), each divided by `per` (e.g. 32 for a batch of 32 faces)."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            wall[name].append((t1 - t0) * 1000)
            cpu[name].append((c1 - c0) * 1000)
    return {name: summary(wall[name], cpu[name], per=per) for name in runs}


def ratios(timings: dict[str, dict[str, float]], *, baseline: str = "dlib") -> dict[str, float]:
    """baseline median / contender median, for every contender but the baseline (> 1: faster than dlib)."""
    base = timings[baseline]["median_ms"]
    return {name: base / t["median_ms"] for name, t in timings.items() if name != baseline}


# ------------------------------------------------------------------------------------------------ photos


@dataclass(frozen=True)
class BenchPhoto:
    """A real photo cropped to 4:3 around its largest face and resized to 640x480."""

    person: str
    source: str  # path relative to FACES_DIR
    pixels: np.ndarray  # 480 x 640 x 3 uint8 RGB
    jpeg: bytes  # the same pixels as JPEG (quality 90), what an HTTP client would send


def large_photos(min_size: tuple[int, int] = BENCH_SIZE) -> list[Path]:
    """Dev photos at least `min_size` (either orientation), sorted by path: the only ones a 640x480 crop does not
    have to enlarge (most dev photos are 112-250 px crops)."""
    found = []
    for path in sorted((FACES_DIR / "dev").glob("*/*")):
        if path.suffix.lower() not in PHOTO_SUFFIXES:
            continue
        with PILImage.open(path) as image:
            width, height = image.size
        if min(width, height) >= min_size[1] and max(width, height) >= min_size[0]:
            found.append(path)
    if not found:
        raise SystemExit(f"no dev photo of at least {min_size[0]}x{min_size[1]} under {FACES_DIR / 'dev'}")
    return found


def crop_640x480(pixels: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    """The largest 4:3 window of the photo containing `centre` (x, y) as near its middle as fits, at 640x480."""
    height, width = pixels.shape[:2]
    crop_w = min(width, height * 4 / 3)
    crop_h = crop_w * 3 / 4
    left = min(max(centre[0] - crop_w / 2, 0), width - crop_w)
    top = min(max(centre[1] - crop_h / 2, 0), height - crop_h)
    box = (round(left), round(top), round(left + crop_w), round(top + crop_h))
    resized = PILImage.fromarray(pixels).resize(BENCH_SIZE, PILImage.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(resized.convert("RGB")))


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def bench_photos(pipeline: Any, limit: int | None = None) -> list[BenchPhoto]:
    """Every large dev photo (or the first `limit`) whose 640x480 crop still shows a face to the service's detector
    policy (upsample 0 at this size), in path order. `pipeline` is an app.vision.pipeline.Pipeline."""
    from app.vision.decode import decode_image, load_image

    photos = []
    for path in large_photos():
        original = load_image(path, max_pixels=100_000_000)
        faces = pipeline.find_faces(original)
        if not faces:
            continue
        box = max(faces, key=lambda f: f.box.area).box
        pixels = crop_640x480(original, ((box.left + box.right) / 2, (box.top + box.bottom) / 2))
        data = jpeg(pixels)
        decoded = decode_image(data, max_pixels=100_000_000)  # what the service will see after JPEG
        if pipeline.find_faces(decoded):
            photos.append(BenchPhoto(path.parent.name, str(path.relative_to(FACES_DIR)), decoded, data))
        if limit is not None and len(photos) == limit:
            break
    if not photos:
        raise SystemExit("no large dev photo keeps a detectable face at 640x480")
    return photos


# ------------------------------------------------------------------------------------------------ output


def write(name: str, result: dict[str, Any]) -> Path:
    """bench/results/<name>.json with the machine (and its load average now) first."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {"bench": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **result}
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
