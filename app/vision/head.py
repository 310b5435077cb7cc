"""A trained embedding head (`facegate train`, app/training) applied after the embedder, in ONNX Runtime.

A head is a registered folder `<heads dir>/<name>/` with `head.onnx` (input `base` float32 N x 128: dlib's
embeddings as the embedder gives them; output `embeddings` float32 N x 128, L2-normalised) and `head.json`, its
manifest: name, version (name + the file's sha256 prefix), the base model version it was trained on, the ONNX
file's sha256, the opset, the calibrated threshold (its distances have another scale than dlib's) and the training
figures. The service refuses a head whose checksum differs or whose base model is not the one being served.

The served model version is then `<base model version>+<head version>`, stored with every embedding, so faces of
the base (or of another head) are `stale` until `facegate reindex` recomputes them from their stored base
embeddings. The network is 2 small matrix products: it runs on the CPU provider with one thread whatever the
embedder uses (moving 512 bytes per face to a GPU would cost more than the product).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app.config import HeadSettings, Provider, RuntimeSettings
from app.errors import ModelUnavailable
from app.matching.thresholds import validate_threshold
from app.vision.models import file_sha256
from app.vision.runtime import LazySession
from app.vision.types import EMBEDDING_DIM

HEAD_FILE = "head.onnx"
HEAD_MANIFEST = "head.json"
HEADS_FOLDER = "heads"
INPUT = "base"
OUTPUT = "embeddings"
# What `facegate train` writes (app/training/export.py): the version names the graph it was computed by.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

__all__ = ["EmbeddingHead", "HeadManifest", "heads_dir", "load_head", "read_head_manifest"]


@dataclass(frozen=True)
class HeadManifest:
    directory: Path
    name: str
    version: str
    base_model_version: str
    sha256: str
    opset: int
    threshold: float
    raw: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.directory / HEAD_FILE


def heads_dir(settings: HeadSettings, models_dir: Path) -> Path:
    return Path(settings.dir) if settings.dir is not None else Path(models_dir) / HEADS_FOLDER


def read_head_manifest(directory: Path, *, verify: bool = True) -> HeadManifest:
    """A registered head's manifest; with `verify`, the ONNX file must be there and match its checksum."""
    file = Path(directory) / HEAD_MANIFEST
    if not file.is_file():
        raise ModelUnavailable(
            f"no registered head {Path(directory).name!r} (no {file}): train one with `facegate train`, or check "
            "FACEGATE_HEAD__DIR and FACEGATE_MODELS_DIR"
        )
    try:
        raw = json.loads(file.read_text())
        manifest = HeadManifest(
            directory=Path(directory),
            name=str(raw["name"]),
            version=str(raw["version"]),
            base_model_version=str(raw["base_model_version"]),
            sha256=str(raw["sha256"]),
            opset=int(raw["opset"]),
            threshold=float(raw["threshold"]),
            raw=raw,
        )
        if isinstance(raw["threshold"], bool):
            raise TypeError(f"threshold {raw['threshold']!r} is not a number")
        validate_threshold(manifest.threshold)  # a 1:1 threshold: finite, in (0, 4]
        if not (NAME_RE.fullmatch(manifest.name) and _SHA256_RE.fullmatch(manifest.sha256)):
            raise ValueError(f"name {manifest.name!r} or sha256 {manifest.sha256!r} is not one `facegate train` writes")
        if manifest.version != f"{manifest.name}-{manifest.sha256[:12]}":
            raise ValueError(f"version {manifest.version!r} is not <name>-<first 12 hex of sha256>")
    except (ValueError, KeyError, TypeError) as error:
        raise ModelUnavailable(f"head manifest of {Path(directory).name!r} is unreadable: {error}") from None
    if verify:
        if not manifest.path.is_file():
            raise ModelUnavailable(f"head {manifest.name!r} has no {HEAD_FILE}")
        if file_sha256(manifest.path) != manifest.sha256:
            raise ModelUnavailable(f"head {manifest.name!r}: {HEAD_FILE} does not match its checksum")
    return manifest


class EmbeddingHead:
    """The head's ONNX graph, opened on first use or at `load()`."""

    def __init__(self, manifest: HeadManifest) -> None:
        self.manifest = manifest
        cpu = RuntimeSettings(providers=[Provider.CPU], intra_op_threads=1, inter_op_threads=1)
        self._session = LazySession(manifest.path, cpu)

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def threshold(self) -> float:
        return self.manifest.threshold

    def load(self) -> None:
        session = self._session.load()
        inputs = [(i.name, i.type) for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != [(INPUT, "tensor(float)")] or outputs != [OUTPUT]:
            raise ModelUnavailable(f"head {self.manifest.name!r} is not a facegate head (inputs {inputs})")
        # The names are not enough: a graph of another width, or one whose output is not unit vectors, gave a 500
        # at every enrolment or a threshold on another scale. Embedding-like rows must come out as unit vectors.
        probe = np.random.default_rng(0).normal(0.0, 0.12, (2, EMBEDDING_DIM)).astype(np.float32)
        try:
            (out,) = session.run([OUTPUT], {INPUT: probe})
        except Exception as error:  # onnxruntime's own errors (another input width, ...)
            raise ModelUnavailable(
                f"head {self.manifest.name!r} cannot run on {EMBEDDING_DIM}-d input: {error}"
            ) from None
        out = np.asarray(out, np.float64)
        if (
            out.shape != probe.shape
            or not np.all(np.isfinite(out))
            or np.abs(np.linalg.norm(out, axis=1) - 1).max() > 1e-3
        ):
            raise ModelUnavailable(
                f"head {self.manifest.name!r} does not give L2-normalised {EMBEDDING_DIM}-d embeddings "
                f"(output shape {out.shape})"
            )

    def apply(self, base: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """(n, 128) base embeddings -> (n, 128) served embeddings (n may be 0)."""
        x = np.ascontiguousarray(np.asarray(base, np.float32).reshape(-1, EMBEDDING_DIM))
        if len(x) == 0:
            return x.copy()
        if not self._session.loaded:
            self.load()
        (out,) = self._session.load().run([OUTPUT], {INPUT: x})
        return np.asarray(out, np.float32)


def load_head(settings: HeadSettings, models_dir: Path, base_model_version: str) -> EmbeddingHead | None:
    """The configured head (its manifest checked now, its graph opened lazily), or None when none is set."""
    if not settings.name:
        return None
    if Path(settings.name).name != settings.name or settings.name in (".", ".."):
        raise ModelUnavailable(f"head name {settings.name!r} must be a plain folder name")
    manifest = read_head_manifest(heads_dir(settings, models_dir) / settings.name)
    if manifest.base_model_version != base_model_version:
        raise ModelUnavailable(
            f"head {manifest.name!r} was trained on {manifest.base_model_version}, but the embedder is "
            f"{base_model_version}: train it again on this model"
        )
    head = EmbeddingHead(manifest)
    head.load()  # 2 small matrices: checked now, whatever FACEGATE_PRELOAD_MODELS says, never at a request
    return head
