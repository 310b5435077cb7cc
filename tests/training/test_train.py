"""Training on real embeddings, the identity-disjoint split, ONNX export (ONNX Runtime = PyTorch to 1e-5) and the
registered head as the service loads it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from app.config import HeadSettings
from app.errors import ModelUnavailable
from app.matching.distances import pairwise_squared_l2
from app.matching.thresholds import DEFAULT_THRESHOLD, is_match
from app.training import (
    Arch,
    EmbeddingSet,
    HeadNet,
    TrainConfig,
    onnx_bytes,
    register_head,
    split_identities,
    train_head,
)
from app.training.data import pair_indices
from app.vision.head import HEAD_FILE, HEAD_MANIFEST, load_head, read_head_manifest
from tests.training.conftest import synthetic_set

BASE = "test-base-model"


@pytest.mark.model
def test_training_on_the_dev_faces_lowers_the_validation_triplet_loss(dev_embeddings: EmbeddingSet) -> None:
    train, val = split_identities(dev_embeddings, val_fraction=0.3, seed=0)
    assert not set(train.names) & set(val.names)
    assert len(train) + len(val) == len(dev_embeddings)
    config = TrainConfig(epochs=4, patience=4, p=8, k=4, lr=3e-4, seed=0)
    result = train_head(train, val, config)
    losses = [h.val_loss for h in result.history]
    assert result.history[0].epoch == 0 and len(losses) == 5
    assert min(losses[1:]) < losses[0]  # the untrained head (epoch 0) is the base, normalised
    # seeded: the same run gives the same figures
    again = train_head(train, val, config)
    assert [h.val_loss for h in again.history] == pytest.approx(losses, abs=1e-6)
    assert 0.0 < result.threshold < 4.0


def test_identity_split_is_disjoint_and_seeded() -> None:
    data = synthetic_set(20, 4)
    train, val = split_identities(data, val_fraction=0.25, seed=3)
    assert len(val.names) == 5 and len(train.names) == 15
    assert not set(train.names) & set(val.names)
    assert val.names == split_identities(data, val_fraction=0.25, seed=3)[1].names
    assert all(val.labels < len(val.names)) and all(train.labels < len(train.names))


def _random_head(arch: Arch) -> HeadNet:
    torch.manual_seed(1)
    model = HeadNet(arch, hidden=64)
    with torch.no_grad():  # away from the identity start, so the export is tested on a real map
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize("arch", list(Arch))
def test_onnx_export_gives_pytorchs_output(arch: Arch) -> None:
    model = _random_head(arch)
    session = ort.InferenceSession(onnx_bytes(model, opset=17), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(scale=0.1, size=(37, 128)).astype(np.float32)
    (out,) = session.run(["embeddings"], {"base": x})
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert out.shape == (37, 128)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_a_registered_head_loads_and_serves_what_was_trained(tmp_path: Path) -> None:
    data = synthetic_set(16, 5)
    train, val = split_identities(data, val_fraction=0.25, seed=0)
    result = train_head(train, val, TrainConfig(epochs=3, p=4, k=3, arch=Arch.mlp, hidden=32, seed=0))
    folder = register_head(result, name="office", heads_dir=tmp_path, base_model_version=BASE, opset=17)
    manifest = read_head_manifest(folder)
    assert manifest.version.startswith("office-") and manifest.base_model_version == BASE
    assert manifest.threshold == pytest.approx(result.threshold)
    assert json.loads((folder / HEAD_MANIFEST).read_text())["training"]["arch"] == "mlp"

    head = load_head(HeadSettings(name="office", dir=tmp_path), Path("unused"), BASE)
    assert head is not None
    with torch.no_grad():
        expected = result.model(torch.from_numpy(data.embeddings)).numpy()
    np.testing.assert_allclose(head.apply(data.embeddings), expected, atol=1e-5, rtol=0)
    assert head.apply(np.zeros((0, 128), np.float32)).shape == (0, 128)
    assert load_head(HeadSettings(), tmp_path, BASE) is None  # no head configured: the base is served

    with pytest.raises(ModelUnavailable, match="trained on"):
        load_head(HeadSettings(name="office", dir=tmp_path), Path("unused"), "another-base")
    with pytest.raises(ModelUnavailable):
        load_head(HeadSettings(name="missing", dir=tmp_path), Path("unused"), BASE)
    with pytest.raises(ModelUnavailable):
        load_head(HeadSettings(name="../office", dir=tmp_path), Path("unused"), BASE)
    (folder / HEAD_FILE).write_bytes((folder / HEAD_FILE).read_bytes() + b"\0")
    with pytest.raises(ModelUnavailable, match="checksum"):
        load_head(HeadSettings(name="office", dir=tmp_path), Path("unused"), BASE)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_head_threshold_holds_on_the_distances_the_service_computes(seed: int) -> None:
    # The threshold is set just below the first impostor pair it must reject. The service measures a pair with the
    # float32 `pairwise_squared_l2` and decides with `is_match`; on those, exactly the allowed impostor pairs match
    # (a threshold set on float64 distances sits one float64 step below a value the float32 distance can undercut).
    data = synthetic_set(16, 5, seed=seed, noise=0.3)
    train, val = split_identities(data, val_fraction=0.25, seed=seed)
    config = TrainConfig(epochs=2, p=4, k=3, seed=seed)
    result = train_head(train, val, config)
    i, j, same = pair_indices(val.labels, seed=config.seed)
    base = pairwise_squared_l2(val.embeddings[i], val.embeddings[j])[~same]
    assert result.base_far_at_threshold == float(np.mean(is_match(base, DEFAULT_THRESHOLD)))
    with torch.no_grad():
        out = result.model(torch.from_numpy(val.embeddings)).numpy()
    head = np.sort(pairwise_squared_l2(out[i], out[j])[~same])
    allowed = math.floor(result.base_far_at_threshold * head.size + 1e-9)
    assert int(np.count_nonzero(is_match(head, result.threshold))) == allowed
    below = float(head[allowed - 1]) if allowed else 0.0
    assert below <= result.threshold < float(head[allowed])
