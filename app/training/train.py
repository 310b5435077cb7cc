"""Training a head on labelled base embeddings: PK batches, the chosen losses, early stopping on validation VAL@FAR.

`train_head(train, val, config)`:
1. every epoch runs the PK batches of the training identities (P x K faces) through the head and the loss:
   triplet (margin alpha, mining batch_all / batch_hard / semi_hard) or contrastive, plus center loss times
   `center_weight` when > 0 (center loss alone: `loss="none"` with a weight);
2. after each epoch the validation identities (none of them trained on) give VAL at `target_far` over every
   same pair and up to 200k different pairs (`app.matching.evaluation.val_at_far`), and a validation triplet loss
   (batch-all, on fixed seeded PK batches, so epochs compare);
3. the best epoch by VAL@FAR (then by lower validation loss) is kept; training stops after `patience` epochs
   without improvement, or at `epochs`.
4. the head's threshold: the distance at which its FAR on the validation pairs equals the base's FAR at the base
   threshold (0.36) on the same pairs, so switching to the head keeps the operating point's false-accept rate.

Seeded (torch, numpy sampler, split): the same seed and data give the same head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from app.matching.distances import pairwise_squared_l2
from app.matching.evaluation import val_at_far
from app.matching.thresholds import DEFAULT_THRESHOLD, is_match
from app.training.data import EmbeddingSet, pair_indices
from app.training.losses import CenterLoss, Mining, contrastive_loss, triplet_loss
from app.training.model import Arch, HeadNet
from app.training.sampler import PKSampler

__all__ = ["EpochLog", "LossKind", "TrainConfig", "TrainResult", "train_head", "validation_figures"]


class LossKind(StrEnum):
    triplet = "triplet"
    contrastive = "contrastive"
    none = "none"  # center loss alone (center_weight > 0)


@dataclass(frozen=True)
class TrainConfig:
    loss: LossKind = LossKind.triplet
    mining: Mining = Mining.semi_hard
    margin: float = 0.2  # FaceNet's alpha, on squared distances of normalised embeddings
    contrastive_margin: float = 1.0  # Euclidean, on the unit sphere
    center_weight: float = 0.0  # lambda of center loss (0 = off)
    arch: Arch = Arch.linear
    hidden: int = 256
    p: int = 16  # identities per batch
    k: int = 4  # faces per identity
    epochs: int = 60
    patience: int = 10
    lr: float = 1e-4  # AdamW moves every weight by ~lr a step: larger rates leave the identity start too fast
    weight_decay: float = 1e-4
    target_far: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:  # strings (CLI, JSON) become the enums; unknown values raise
        object.__setattr__(self, "loss", LossKind(self.loss))
        object.__setattr__(self, "mining", Mining(self.mining))
        object.__setattr__(self, "arch", Arch(self.arch))

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    val_at_far: float


@dataclass(frozen=True)
class ValidationFigures:
    val_at_far: float
    loss: float


@dataclass
class TrainResult:
    model: HeadNet
    config: TrainConfig
    best_epoch: int  # 0 = the untrained (identity) head was best
    history: list[EpochLog] = field(default_factory=list)
    threshold: float = DEFAULT_THRESHOLD
    base_val_at_far: float = math.nan
    base_far_at_threshold: float = math.nan
    n_train: tuple[int, int] = (0, 0)  # (identities, faces)
    n_val: tuple[int, int] = (0, 0)

    def summary(self) -> dict[str, Any]:
        best = next((h for h in self.history if h.epoch == self.best_epoch), None)
        return {
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.history) - 1,
            "val_at_far": best.val_at_far if best else math.nan,
            "base_val_at_far": self.base_val_at_far,
            "base_far_at_threshold": self.base_far_at_threshold,
            "threshold": self.threshold,
            "train_identities": self.n_train[0],
            "train_faces": self.n_train[1],
            "val_identities": self.n_val[0],
            "val_faces": self.n_val[1],
        }


def _loss(
    config: TrainConfig, out: torch.Tensor, labels: torch.Tensor, center: CenterLoss | None
) -> torch.Tensor:
    if config.loss is LossKind.triplet:
        value = triplet_loss(out, labels, margin=config.margin, mining=config.mining)
    elif config.loss is LossKind.contrastive:
        value = contrastive_loss(out, labels, margin=config.contrastive_margin)
    else:
        value = out.sum() * 0.0
    if center is not None:
        value = value + config.center_weight * center(out, labels)
    return value


def _squared(a: npt.NDArray[np.float32], i: npt.NDArray[np.int64], j: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """The float32 distance the service computes for each pair (`pairwise_squared_l2`), held as float64: the head's
    threshold is set one float64 step below an impostor's distance, which holds only on the distance the service
    will compare with it (a float64 sum of the same pair can be above its float32 one, and the threshold then too)."""
    return pairwise_squared_l2(a[i], a[j]).astype(np.float64)


class _Validation:
    """Fixed validation pairs and PK batches, so every epoch is measured on the same thing."""

    def __init__(self, val: EmbeddingSet, config: TrainConfig) -> None:
        self.x = torch.from_numpy(np.ascontiguousarray(val.embeddings, np.float32))
        self.labels = torch.from_numpy(val.labels)
        self.i, self.j, self.same = pair_indices(val.labels, seed=config.seed)
        if not self.same.any() or self.same.all():
            raise ValueError("the validation identities give no same or no different pair")
        sampler = PKSampler(val.labels, p=min(config.p, len(np.unique(val.labels))), k=config.k, seed=config.seed + 1)
        self.batches = [torch.from_numpy(b) for b in sampler]
        self.target_far = config.target_far
        self.margin = config.margin

    def distances(self, embeddings: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        d = _squared(embeddings, self.i, self.j)
        return d[self.same], d[~self.same]

    @torch.no_grad()
    def figures(self, model: HeadNet) -> ValidationFigures:
        model.eval()
        out = model(self.x)
        same_d, diff_d = self.distances(out.numpy())
        losses = [triplet_loss(out[b], self.labels[b], margin=self.margin, mining=Mining.batch_all) for b in self.batches]
        loss = float(np.mean([value.item() for value in losses]))
        return ValidationFigures(val_at_far(same_d, diff_d, self.target_far).val, loss)


def validation_figures(model: HeadNet, val: EmbeddingSet, config: TrainConfig) -> ValidationFigures:
    """VAL@FAR and the batch-all triplet loss of `model` on validation identities (as measured during training)."""
    return _Validation(val, config).figures(model)


def train_head(
    train: EmbeddingSet,
    val: EmbeddingSet,
    config: TrainConfig = TrainConfig(),
    *,
    progress: Callable[[EpochLog], None] | None = None,
) -> TrainResult:
    """Train a head on `train`'s identities, choosing the epoch on `val`'s (identity-disjoint). `progress` is
    called after every epoch (epoch 0 = the untrained head)."""
    if config.loss is LossKind.none and config.center_weight <= 0:
        raise ValueError("loss 'none' trains nothing without center loss (center_weight > 0)")
    overlap = set(train.names) & set(val.names)
    if overlap:
        raise ValueError(f"train and validation share identities: {sorted(overlap)[:5]}")
    torch.manual_seed(config.seed)
    model = HeadNet(config.arch, hidden=config.hidden)
    x = torch.from_numpy(np.ascontiguousarray(train.embeddings, np.float32))
    y = torch.from_numpy(train.labels)
    center: CenterLoss | None = None
    params = list(model.parameters())
    if config.center_weight > 0:
        center = CenterLoss(len(train.names), x.shape[1])
        with torch.no_grad():
            center.init_centers(model(x), y)
        params += list(center.parameters())
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sampler = PKSampler(train.labels, p=config.p, k=config.k, seed=config.seed)
    validation = _Validation(val, config)

    base_same, base_diff = validation.distances(val.embeddings)
    base_far = float(np.mean(is_match(base_diff, DEFAULT_THRESHOLD)))
    result = TrainResult(
        model,
        config,
        best_epoch=0,
        base_val_at_far=val_at_far(base_same, base_diff, config.target_far).val,
        base_far_at_threshold=base_far,
        n_train=(train.n_identities, len(train)),
        n_val=(val.n_identities, len(val)),
    )
    first = validation.figures(model)
    result.history.append(EpochLog(0, math.nan, first.loss, first.val_at_far))
    if progress is not None:
        progress(result.history[-1])
    best_key = (first.val_at_far, -first.loss)
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    since_best = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        losses = []
        for batch in sampler:
            b = torch.from_numpy(batch)
            loss = _loss(config, model(x[b]), y[b], center)
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            optimiser.step()
            losses.append(loss.item())
        figures = validation.figures(model)
        log = EpochLog(epoch, float(np.mean(losses)) if losses else math.nan, figures.loss, figures.val_at_far)
        result.history.append(log)
        if progress is not None:
            progress(log)
        key = (figures.val_at_far, -figures.loss)
        if key > best_key:
            best_key, result.best_epoch, since_best = key, epoch, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if since_best >= config.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        _, head_diff = validation.distances(model(validation.x).numpy())
    result.threshold = matching_far_threshold(head_diff, base_far)
    return result


def matching_far_threshold(diff_distances: npt.NDArray[np.float64], far: float) -> float:
    """The largest threshold whose FAR over `diff_distances` is at most `far` (0 allowed: just below the nearest
    different pair), for `is_match` (a float64 comparison) on these same distances."""
    d = np.sort(np.asarray(diff_distances, np.float64))
    allowed = min(math.floor(far * d.size + 1e-9), d.size - 1)
    return float(np.nextafter(d[allowed], -np.inf))
