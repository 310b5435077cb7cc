"""Reference inputs for the GPU check (bench/gpu_check.py), built here on CPU with our own pipeline.

    .venv/bin/python -m bench.gpu_inputs [--faces 64] [--out gpu_inputs] [--models-out gpu_models]

Writes into gpu_inputs/ at the repository root (git-ignored through .git/info/exclude, never committed):
  embed.npz     chips uint8 (N, 150, 150, 3): real faces from the dev photos, one per photo, people taken in turn,
                made by Pipeline's own detect -> landmarks -> face_chips; embeddings float32 (N, 128): their CPU
                embeddings (batch 32), which the model tests prove equal to dlib's within 1e-6.
  detect.npz    for each detector case: the uint8 photo the detector sees (after the service's resize policy),
                and the CPU score map of its tiled pyramid. The float32 pyramid tensor itself (8-30 MB each) does
                not travel: gpu_check.py rebuilds it with app.vision.pyramid (numpy only) and checks it against
                the sha256 recorded here, so its CPU reference applies bit for bit.
  photos/       16 of the bench's 640x480 JPEG crops of dev photos (bench/common.py), for the end-to-end /embed
                run (bench/embed_throughput.py --photos-dir).
  inputs.json   what was built: model sha256s, cases (upsample, tensor shape and sha256), counts, versions.
and copies the two networks the references came from (models/dist/embedder.onnx, detector.onnx, 23 MB) and the
manifest into gpu_models/, and the landmark model (5.8 MB) into gpu_landmarks/ (both git-ignored too): folders
the `device` tool carries in calls of their own (bench/gpu_run.md); together they are a models folder the
service can serve from.

PRIVACY: the chips and photos are crops of real people from ../shared/faces. They travel only to the lent GPU
machine for this check (in the `device` tool's working-tree copy, copied to ~/gpu_inputs there), are gone
when that machine is given back, and must be deleted here afterwards (`rm -rf gpu_inputs`). Never commit them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image as PILImage

from app.config import REPO_ROOT, Provider, RuntimeSettings, Settings
from app.vision.align import face_chips
from app.vision.decode import load_image
from app.vision.detect import MEANS, upsample_times
from app.vision.pipeline import Pipeline, working_image
from app.vision.pyramid import tiled_layout, tiled_pyramid
from bench.common import FACES_DIR, bench_photos

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}
# The lent machine's working tree carries gpu_inputs/ beside the first onnxruntime-gpu chunk (55 MB) in a
# 64 MiB call: keep the folder well under the room left.
MAX_BYTES = 10_000_000


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*/*") if p.suffix.lower() in PHOTO_SUFFIXES)


def _exclude_from_git(out: Path) -> None:
    """Make sure the folder is ignored locally (.git/info/exclude, not .gitignore) so it never gets committed."""
    try:
        relative = out.resolve().relative_to(REPO_ROOT)
    except ValueError:
        return  # outside the repository: nothing to ignore
    exclude = REPO_ROOT / ".git" / "info" / "exclude"
    line = f"/{relative.as_posix()}/"
    existing = exclude.read_text().splitlines() if exclude.is_file() else []
    if line not in existing:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with exclude.open("a") as f:
            f.write(line + "\n")
    ignored = subprocess.run(["git", "-C", str(REPO_ROOT), "check-ignore", "-q", str(relative)], check=False)
    if ignored.returncode != 0:
        raise SystemExit(f"{relative} is not ignored by git: refusing to write face crops there")


def face_set(pipeline: Pipeline, settings: Settings, wanted: int) -> tuple[np.ndarray, list[str]]:
    """Up to `wanted` chips, the best-scoring face of one photo each, taking the dev set's people in turn."""
    by_person: dict[str, list[Path]] = defaultdict(list)
    for path in _photos(FACES_DIR / "dev"):
        by_person[path.parent.name].append(path)
    queues = [list(paths) for _, paths in sorted(by_person.items())]
    chips: list[np.ndarray] = []
    sources: list[str] = []
    while len(chips) < wanted and any(queues):
        for queue in queues:
            if len(chips) >= wanted:
                break
            while queue:  # this person's next photo that has a face
                path = queue.pop(0)
                image = load_image(path, max_pixels=settings.image.max_pixels)
                work, detections = pipeline.detect(image)
                if not detections:
                    continue
                points = pipeline.landmarks.predict(work.pixels, detections[0].box)
                chips.append(face_chips(work.pixels, [points])[0])
                sources.append(path.relative_to(FACES_DIR).as_posix())
                break
    return np.stack(chips), sources


def photo_640x480() -> np.ndarray:
    """The largest dev photo resized to 640x480: the same photo bench/vision.py times the detector on."""
    paths = _photos(FACES_DIR / "dev")
    biggest = max(paths, key=lambda p: PILImage.open(p).size[0] * PILImage.open(p).size[1])
    image = load_image(biggest, max_pixels=100_000_000)
    return np.asarray(PILImage.fromarray(image).resize((640, 480), PILImage.Resampling.LANCZOS))


def detector_cases(settings: Settings) -> list[tuple[str, np.ndarray, int]]:
    """(name, pixels the detector sees, upsample count) for three shapes the service meets."""
    cases = [("photo_640x480_up0", photo_640x480(), 0)]  # bench/vision.py's detector timing input
    lfw = load_image(_photos(FACES_DIR / "lfw-dev")[0], max_pixels=settings.image.max_pixels)
    work = working_image(lfw, settings.detector)  # 250x250: the 'auto' policy doubles it once
    cases.append((f"lfw_{lfw.shape[1]}x{lfw.shape[0]}_up{work.upsample}", work.pixels, work.upsample))
    big = next(
        p
        for p in _photos(FACES_DIR / "dev")
        if max(PILImage.open(p).size) > settings.detector.max_side and max(PILImage.open(p).size) < 2000
    )
    image = load_image(big, max_pixels=settings.image.max_pixels)
    work = working_image(image, settings.detector)  # shrunk to max_side (1024): the common large-photo shape
    cases.append((f"dev_{work.pixels.shape[1]}x{work.pixels.shape[0]}_up{work.upsample}", work.pixels, work.upsample))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=64, help="how many face chips (one per photo)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "gpu_inputs", help="output folder (git-ignored)")
    parser.add_argument("--models-out", type=Path, default=REPO_ROOT / "gpu_models", help="copies of the two ONNX models (git-ignored)")
    parser.add_argument("--landmarks-out", type=Path, default=REPO_ROOT / "gpu_landmarks", help="copy of the landmark model (git-ignored)")
    parser.add_argument("--photos", type=int, default=16, help="640x480 JPEG photos for the /embed run")
    args = parser.parse_args()

    started = time.perf_counter()
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    models_out = args.models_out if args.models_out.is_absolute() else Path.cwd() / args.models_out
    landmarks_out = args.landmarks_out if args.landmarks_out.is_absolute() else Path.cwd() / args.landmarks_out
    for folder in (out, models_out, landmarks_out):
        folder.mkdir(parents=True, exist_ok=True)
        _exclude_from_git(folder)
    (out / "photos").mkdir(exist_ok=True)

    settings = Settings(runtime=RuntimeSettings(providers=[Provider.CPU]))
    pipeline = Pipeline.from_settings(settings)
    pipeline.load()

    chips, sources = face_set(pipeline, settings, args.faces)
    embeddings = pipeline.embedder.embed(chips, batch_size=32)
    np.savez_compressed(out / "embed.npz", chips=chips, embeddings=embeddings)

    arrays: dict[str, np.ndarray] = {"means": MEANS}
    cases = []
    for index, (name, pixels, upsample) in enumerate(detector_cases(settings)):
        scaled = upsample_times(np.ascontiguousarray(pixels), upsample)
        tensor = tiled_pyramid(scaled, tiled_layout(scaled.shape[0], scaled.shape[1]), MEANS)
        scores = pipeline.detector.scores(tensor)
        detections = pipeline.detector.detect(pixels, upsample=upsample)
        arrays[f"photo_{index}"] = pixels
        arrays[f"scores_{index}"] = scores
        cases.append(
            {
                "name": name,
                "photo_shape": list(pixels.shape),
                "upsample": upsample,
                "tensor_shape": list(tensor.shape),
                "tensor_sha256": hashlib.sha256(tensor.tobytes()).hexdigest(),
                "scores_shape": list(scores.shape),
                "cells_above_0": int((scores > 0).sum()),
                "faces": len(detections),
            }
        )
    np.savez_compressed(out / "detect.npz", **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds badly

    photos = bench_photos(pipeline, limit=args.photos)
    for index, photo in enumerate(photos):
        (out / "photos" / f"{index:02d}.jpg").write_bytes(photo.jpeg)

    models = {name: settings.models_dir / f"{name}.onnx" for name in ("embedder", "detector")}
    for path in models.values():
        shutil.copyfile(path, models_out / path.name)
    shutil.copyfile(settings.models_dir / "manifest.json", models_out / "manifest.json")
    landmarks = pipeline.manifest.path("landmarks")
    shutil.copyfile(landmarks, landmarks_out / landmarks.name)
    info = {
        "note": "crops of real people: for the GPU check only; delete after (rm -rf gpu_inputs)",
        "models_sha256": {name: _sha256_file(path) for name, path in models.items()},
        "model_version": pipeline.model_version,
        "embed": {"faces": len(chips), "photos": len(sources), "people": len({s.split("/")[1] for s in sources}), "batch_size": 32},
        "detect": cases,
        "embed_photos": len(photos),
        "built_with": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "onnxruntime": ort.__version__,
            "provider": pipeline.providers(),
        },
    }
    (out / "inputs.json").write_text(json.dumps(info, indent=2) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps(info, indent=2))
    print(f"wrote {out} ({total / 1e6:.1f} MB) and {models_out} in {time.perf_counter() - started:.0f} s")
    if total > MAX_BYTES:
        raise SystemExit(f"{out} is {total / 1e6:.1f} MB, over {MAX_BYTES / 1e6:.0f} MB: it will not fit beside a chunk")


if __name__ == "__main__":
    main()
