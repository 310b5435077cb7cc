"""Metric learning on top of dlib's embeddings (issue 8): train a small head with triplet, contrastive and center
losses, export it to ONNX and register it for the service (app/vision/head.py serves it; torch is not needed there).

Needs the `train` extra (PyTorch, CPU build). Imported only by `facegate train` and the tests, never by the service.

    from app.training import TrainConfig, embed_folder, register_head, split_identities, train_head
    data = embed_folder(pipeline, Path("photos"), cache_path=Path("photos.npz"))
    train, val = split_identities(data, val_fraction=0.2, seed=0)
    result = train_head(train, val, TrainConfig(loss="triplet", mining="semi_hard", margin=0.2))
    register_head(result, name="office", heads_dir=..., base_model_version=pipeline.base_model_version, opset=17)
"""

from app.training.data import EmbeddingSet, embed_folder, folder_photos, pair_indices, split_identities
from app.training.export import export_onnx, onnx_bytes, register_head
from app.training.losses import CenterLoss, Mining, contrastive_loss, semi_hard_negatives, triplet_loss
from app.training.model import Arch, HeadNet
from app.training.sampler import PKSampler
from app.training.train import EpochLog, LossKind, TrainConfig, TrainResult, train_head, validation_figures

__all__ = [
    "Arch",
    "CenterLoss",
    "EmbeddingSet",
    "EpochLog",
    "HeadNet",
    "LossKind",
    "Mining",
    "PKSampler",
    "TrainConfig",
    "TrainResult",
    "contrastive_loss",
    "embed_folder",
    "export_onnx",
    "folder_photos",
    "onnx_bytes",
    "pair_indices",
    "register_head",
    "semi_hard_negatives",
    "split_identities",
    "train_head",
    "triplet_loss",
    "validation_figures",
]
