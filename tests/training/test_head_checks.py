"""A registered head whose manifest or graph the service cannot use is refused when it is loaded, never at a request."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

from app.config import HeadSettings, Settings
from app.errors import ModelUnavailable
from app.training import HeadNet, TrainConfig, TrainResult, register_head
from app.vision.head import EmbeddingHead, load_head
from app.vision.pipeline import Pipeline

BASE = "dlib-resnet-v1+onnx-test"


def _head(tmp_path: Path, name: str = "h") -> Path:
    return register_head(
        TrainResult(HeadNet(), TrainConfig(), best_epoch=0, threshold=0.17),
        name=name,
        heads_dir=tmp_path,
        base_model_version=BASE,
        opset=17,
    )


def _load(tmp_path: Path, name: str = "h") -> EmbeddingHead | None:
    return load_head(HeadSettings(name=name, dir=str(tmp_path)), tmp_path, BASE)


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -1.0, 0.0, 50.0, True])
def test_a_manifest_threshold_no_decision_can_use_is_refused(tmp_path: Path, threshold: object) -> None:
    folder = _head(tmp_path)
    manifest = json.loads((folder / "head.json").read_text())
    manifest["threshold"] = threshold
    (folder / "head.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelUnavailable, match="threshold"):
        _load(tmp_path)


def test_a_version_that_does_not_name_the_graph_is_refused(tmp_path: Path) -> None:
    folder = _head(tmp_path)
    manifest = json.loads((folder / "head.json").read_text())
    manifest["version"] = "other+x"
    (folder / "head.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelUnavailable, match="version"):
        _load(tmp_path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter, as app/training/export.py uses it
@pytest.mark.parametrize("module", [torch.nn.Linear(128, 64), torch.nn.Identity()])
def test_a_graph_that_gives_no_unit_128d_vectors_is_refused_at_load(tmp_path: Path, module: torch.nn.Module) -> None:
    folder = _head(tmp_path)
    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        (torch.zeros(2, 128),),
        buffer,  # type: ignore[arg-type]  # any binary file object
        input_names=["base"],
        output_names=["embeddings"],
        dynamic_axes={"base": {0: "N"}, "embeddings": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )
    data = buffer.getvalue()
    (folder / "head.onnx").write_bytes(data)
    manifest = json.loads((folder / "head.json").read_text())
    sha = hashlib.sha256(data).hexdigest()
    manifest.update(sha256=sha, version=f"h-{sha[:12]}")
    (folder / "head.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelUnavailable, match="L2-normalised"):
        _load(tmp_path)


def test_cluster_threshold_follows_the_heads_scale(tmp_path: Path, models_dir: Path) -> None:
    from app.service import cluster_threshold

    settings = Settings(models_dir=models_dir)
    pipeline = Pipeline.from_settings(settings)
    _head(tmp_path)
    manifest = json.loads((tmp_path / "h" / "head.json").read_text())
    manifest["base_model_version"] = pipeline.base_model_version
    (tmp_path / "h" / "head.json").write_text(json.dumps(manifest))
    with_head = Settings(models_dir=models_dir, head=HeadSettings(name="h", dir=str(tmp_path)))
    assert cluster_threshold(settings, pipeline) == 0.25
    assert cluster_threshold(with_head, Pipeline.from_settings(with_head)) == pytest.approx(0.17 * 0.25 / 0.36)
    explicit = Settings(models_dir=models_dir, head=HeadSettings(name="h", dir=str(tmp_path)), cluster={"threshold": 0.2})
    assert cluster_threshold(explicit, Pipeline.from_settings(explicit)) == 0.2  # set explicitly: used as it is


def test_a_missing_head_names_where_it_was_looked_for(tmp_path: Path) -> None:
    """A wrong FACEGATE_HEAD__DIR or FACEGATE_MODELS_DIR could not be told from a head never trained."""
    with pytest.raises(ModelUnavailable, match="no registered head 'nope'") as refused:
        _load(tmp_path, "nope")
    assert str(tmp_path / "nope" / "head.json") in str(refused.value)
