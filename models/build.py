"""Build the runtime model files from the `face_recognition_models` package.

    python -m models.build [--out DIR] [--force]

Checks each dlib source file's sha256, converts it, and writes manifest.json with the source and output
checksums. Idempotent: when the manifest's checksums match the sources and the outputs on disk, nothing
is rebuilt. The service verifies the outputs against the manifest when it loads them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models import detector, embedder, shape_predictor

# Bump when a converter changes what it writes: forces a rebuild and changes the model version.
# 2: the detector's 9x9 score convolution split into 1x9 + 9x1 (faster on CPU, same boxes); the embedder's
#    channel padding as 1x1 identity convolutions instead of Pad.
# 3: the detector's 45-channel layers zero-padded to 48 (ONNX Runtime's blocked kernels; same boxes).
# 4: the embedder's input normalisation folded into its first convolution, its spatial end-padding as identity
#    1x1 convolutions (fewer whole-tensor operations per chip; embeddings within ~1e-6).
CONVERTER_VERSION = 4
OPSET = 17
MANIFEST = "manifest.json"
MODEL_NAME = "dlib-resnet-v1"
EMBEDDING_INPUTS = ("embedder", "landmarks")  # the models whose output the model version covers
# Model versions that earlier converters gave these same dlib files (a digest of their ONNX output then). Their
# embeddings are this build's within the parity tolerance, so the service relabels faces stored under them instead
# of reporting them stale.
EARLIER_VERSIONS = ("dlib-resnet-v1+onnx1-2ea5231aed27", "dlib-resnet-v1+onnx2-5d326777ddf3")


@dataclass(frozen=True)
class Spec:
    name: str
    source: str
    source_sha256: str
    output: str
    convert: Callable[[Path, Path], dict[str, Any]]


SPECS = (
    Spec(
        "embedder",
        "dlib_face_recognition_resnet_model_v1.dat",
        "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
        "embedder.onnx",
        embedder.convert,
    ),
    Spec(
        "detector",
        "mmod_human_face_detector.dat",
        "4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6",
        "detector.onnx",
        detector.convert,
    ),
    Spec(
        "landmarks",
        "shape_predictor_5_face_landmarks.dat",
        "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
        "shape_predictor_5.npz",
        shape_predictor.convert,
    ),
)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_dir() -> Path:
    """Where `face_recognition_models` keeps its .dat files, found without importing it (it needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("face_recognition_models is not installed: pip install 'facegate[build]'")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _up_to_date(out: Path) -> bool:
    path = out / MANIFEST
    if not path.is_file():
        return False
    manifest = json.loads(path.read_text())
    if manifest.get("converter_version") != CONVERTER_VERSION:
        return False
    for spec in SPECS:
        entry = manifest["models"].get(spec.name)
        target = out / spec.output
        if entry is None or entry["source_sha256"] != spec.source_sha256 or not target.is_file():
            return False
        if sha256(target) != entry["sha256"]:
            return False
    return True


def build(out: Path, *, force: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    if not force and _up_to_date(out):
        print(f"models in {out} are up to date")
        return dict(json.loads((out / MANIFEST).read_text()))
    src = source_dir()
    entries: dict[str, Any] = {}
    for spec in SPECS:
        source = src / spec.source
        actual = sha256(source)
        if actual != spec.source_sha256:
            raise SystemExit(f"{source}: sha256 {actual} does not match the expected {spec.source_sha256}")
        started = time.perf_counter()
        target = out / spec.output
        tmp = target.with_suffix(target.suffix + ".tmp")
        extra = spec.convert(source, tmp)
        tmp.replace(target)  # atomic: a half-written model never carries the final name
        entries[spec.name] = {
            "source": spec.source,
            "source_sha256": spec.source_sha256,
            "file": spec.output,
            "sha256": sha256(target),
            **extra,
        }
        print(f"{spec.name}: {spec.source} -> {target} ({time.perf_counter() - started:.1f} s)")
    # Embeddings are stored with this version: embeddings of another model are never mixed silently. It names the
    # dlib files an embedding's numbers come from (the embedder, and the landmark model that aligns its chip), not
    # this converter's output: every build of them gives dlib's numbers (the parity tests: embeddings within 1e-4,
    # in practice ~1e-6), so a faster build does not turn every enrolled face stale. The detector only finds the box
    # the landmarks start from and is not part of it either.
    digest = hashlib.sha256(
        "".join(entries[name]["source_sha256"] for name in EMBEDDING_INPUTS).encode()
    ).hexdigest()[:12]
    manifest = {
        "model_name": MODEL_NAME,
        "model_version": f"{MODEL_NAME}+onnx-{digest}",
        "earlier_versions": list(EARLIER_VERSIONS),
        "converter_version": CONVERTER_VERSION,
        "opset": OPSET,
        "source_package": "face_recognition_models==0.3.0",
        "models": entries,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "dist")
    parser.add_argument("--force", action="store_true", help="rebuild even when the checksums match")
    args = parser.parse_args(argv)
    build(args.out, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
