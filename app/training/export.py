"""Export a trained head to ONNX and register it as a model version the service can serve.

`register_head(result, name=..., heads_dir=..., base_model_version=..., opset=...)` writes
`<heads_dir>/<name>/head.onnx` (input `base` float32 N x 128, output `embeddings` float32 N x 128) and
`head.json` (app/vision/head.py reads it): version = `<name>-<first 12 hex of the file's sha256>`, so retraining
under the same name gives a new version and the gallery sees its faces as stale until `facegate reindex`. The
manifest carries the threshold the head needs, the base model it was trained on, the training settings and the
validation figures. Files are written beside and renamed into place, so a serving worker never reads half a head.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from app.training.model import HeadNet
from app.training.train import TrainResult
from app.vision.head import HEAD_FILE, HEAD_MANIFEST, INPUT, NAME_RE, OUTPUT
from app.vision.types import EMBEDDING_DIM

__all__ = ["export_onnx", "head_folder", "onnx_bytes", "register_head"]


def onnx_bytes(model: HeadNet, *, opset: int) -> bytes:
    """The head as an ONNX graph with a dynamic batch dimension (TorchScript exporter: the graph is 2 matmuls)."""
    model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter needs no onnxscript
        torch.onnx.export(
            model,
            (torch.zeros(2, EMBEDDING_DIM),),
            buffer,  # type: ignore[arg-type]  # torch.onnx.export writes to any binary file object
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "N"}, OUTPUT: {0: "N"}},
            opset_version=opset,
            dynamo=False,
        )
    return buffer.getvalue()


def export_onnx(model: HeadNet, path: Path, *, opset: int) -> str:
    """Write the ONNX file; returns its sha256."""
    data = onnx_bytes(model, opset=opset)
    _write_atomic(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def register_head(
    result: TrainResult,
    *,
    name: str,
    heads_dir: Path,
    base_model_version: str,
    opset: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Export and register under `heads_dir/name/` (replacing a head of that name); returns the folder."""
    folder = head_folder(heads_dir, name)
    folder.mkdir(parents=True, exist_ok=True)
    data = onnx_bytes(result.model, opset=opset)
    sha = hashlib.sha256(data).hexdigest()
    manifest = {
        "name": name,
        "version": f"{name}-{sha[:12]}",
        "base_model_version": base_model_version,
        "file": HEAD_FILE,
        "sha256": sha,
        "opset": opset,
        "inputs": {INPUT: f"float32 [N,{EMBEDDING_DIM}], the embedder's output"},
        "outputs": {OUTPUT: f"float32 [N,{EMBEDDING_DIM}], L2-normalised"},
        "threshold": result.threshold,
        "threshold_rule": "FAR on the validation pairs equal to the base model's at 0.36",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "training": result.config.to_dict(),
        "validation": result.summary(),
        "history": [
            {"epoch": h.epoch, "train_loss": _num(h.train_loss), "val_loss": h.val_loss, "val_at_far": h.val_at_far}
            for h in result.history
        ],
        **(extra or {}),
    }
    # Both files are written before either replaces a head of that name: a write that fails (disk full) left the
    # new graph beside the old manifest, a head the service refuses (checksum).
    files = {folder / HEAD_FILE: data, folder / HEAD_MANIFEST: (json.dumps(manifest, indent=1) + "\n").encode()}
    written = {path: path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in files}
    try:
        for path, tmp in written.items():
            tmp.write_bytes(files[path])
    except BaseException:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in written.items():
        tmp.replace(path)
    return folder


def head_folder(heads_dir: Path, name: str) -> Path:
    """Where the head `name` is registered; a ValueError for a name that is no single folder name."""
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError("a head name is 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit)")
    return Path(heads_dir) / name


def _num(value: float) -> float | None:
    return None if math.isnan(value) else value  # NaN (epoch 0 has no training loss) is not JSON


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
