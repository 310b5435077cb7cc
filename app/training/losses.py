"""Metric-learning losses over a batch of embeddings (PyTorch): triplet with online mining, contrastive, center.

Distances are squared L2, as everywhere in facegate (FaceNet's convention: the triplet margin alpha is on squared
distances of L2-normalised embeddings, 0.2 by default).

- `triplet_loss(..., mining=)`: every anchor/positive/negative of the batch is a candidate triplet.
  * `batch_all`: all valid triplets; the mean over those with a positive loss (Hermans et al. 2017: averaging over
    the already-satisfied ones too would shrink the gradient as training goes).
  * `batch_hard`: per anchor, its farthest positive and nearest negative (Hermans et al.).
  * `semi_hard`: FaceNet's rule: per anchor-positive pair, the nearest negative that is still farther than the
    positive (d_ap < d_an; it gives a loss when it is also within the margin); when no negative is farther, the
    farthest one (as TensorFlow Addons' `triplet_semihard_loss`). Averaged over the anchor-positive pairs.
- `contrastive_loss`: Hadsell, Chopra & LeCun 2006 over every pair of the batch: same pairs pulled together (d^2),
  different pairs pushed to at least `margin` apart (Euclidean) (max(0, margin - d)^2), halved and averaged.
- `CenterLoss`: Wen et al. 2016: half the mean squared distance of each embedding to its identity's centre (the
  centres are learnt with the head); add it with a weight to another loss.
"""

from __future__ import annotations

from enum import StrEnum

import torch
from torch import Tensor, nn

__all__ = [
    "CenterLoss",
    "Mining",
    "contrastive_loss",
    "pairwise_squared_distances",
    "semi_hard_negatives",
    "triplet_loss",
]


class Mining(StrEnum):
    batch_all = "batch_all"
    batch_hard = "batch_hard"
    semi_hard = "semi_hard"


def pairwise_squared_distances(embeddings: Tensor) -> Tensor:
    """(n, n) squared L2 distances, computed from differences (exact, no negative values from cancellation)."""
    diff = embeddings[:, None, :] - embeddings[None, :, :]
    return (diff * diff).sum(dim=-1)


def _masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same  # positives (a != p), negatives


def triplet_loss(
    embeddings: Tensor, labels: Tensor, *, margin: float = 0.2, mining: Mining | str = Mining.semi_hard
) -> Tensor:
    """Triplet loss max(0, d(a,p) - d(a,n) + margin) over the batch's triplets chosen by `mining`.

    Returns a scalar; 0 (with a gradient of zeros) when the batch has no valid triplet."""
    mining = Mining(mining)
    d = pairwise_squared_distances(embeddings)
    positive, negative = _masks(labels)
    zero = embeddings.sum() * 0.0  # keeps the graph (and dtype/device) when nothing contributes
    if mining is Mining.batch_all:
        # [a, p, n] = d(a,p) - d(a,n) + margin for valid (a, p, n)
        valid = positive[:, :, None] & negative[:, None, :]
        losses = torch.relu(d[:, :, None] - d[:, None, :] + margin)[valid]
        active = losses > 0
        return losses[active].mean() if bool(active.any()) else zero
    if mining is Mining.batch_hard:
        has_both = positive.any(dim=1) & negative.any(dim=1)
        if not bool(has_both.any()):
            return zero
        hardest_positive = torch.where(positive, d, torch.full_like(d, -torch.inf)).amax(dim=1)
        hardest_negative = torch.where(negative, d, torch.full_like(d, torch.inf)).amin(dim=1)
        return torch.relu(hardest_positive - hardest_negative + margin)[has_both].mean()
    anchors, positives = positive.nonzero(as_tuple=True)
    if len(anchors) == 0 or not bool(negative.any()):
        return zero
    chosen = semi_hard_negatives(d.detach(), labels, anchors, positives)
    keep = chosen >= 0
    if not bool(keep.any()):
        return zero
    a, p, n = anchors[keep], positives[keep], chosen[keep]
    return torch.relu(d[a, p] - d[a, n] + margin).mean()


def semi_hard_negatives(distances: Tensor, labels: Tensor, anchors: Tensor, positives: Tensor) -> Tensor:
    """FaceNet's semi-hard negative for each (anchor, positive): the nearest negative with d(a,n) > d(a,p); when no
    negative is farther than the positive, the farthest negative. -1 where the anchor has no negative at all.

    With a margin, the ones that give a loss are those with d(a,p) < d(a,n) < d(a,p) + margin; farther ones give 0.
    """
    negative = labels[None, :] != labels[:, None]
    rows = distances[anchors]  # (m, n)
    neg = negative[anchors]
    d_ap = distances[anchors, positives][:, None]
    farther = neg & (rows > d_ap)
    nearest_farther = torch.where(farther, rows, torch.full_like(rows, torch.inf)).argmin(dim=1)
    farthest = torch.where(neg, rows, torch.full_like(rows, -torch.inf)).argmax(dim=1)
    chosen = torch.where(farther.any(dim=1), nearest_farther, farthest)
    return torch.where(neg.any(dim=1), chosen, torch.full_like(chosen, -1))


def contrastive_loss(embeddings: Tensor, labels: Tensor, *, margin: float = 1.0) -> Tensor:
    """Mean over every pair (i < j) of 1/2 [same: d^2; different: max(0, margin - d)^2] with d the Euclidean
    distance (`margin` in Euclidean units: 1.0 on the unit sphere, where distances lie in [0, 2])."""
    n = len(labels)
    i, j = torch.triu_indices(n, n, offset=1, device=labels.device)
    if len(i) == 0:
        return embeddings.sum() * 0.0
    diff = embeddings[i] - embeddings[j]
    d2 = (diff * diff).sum(dim=1)
    same = labels[i] == labels[j]
    # sqrt has an infinite gradient at 0; different pairs at distance 0 are clamped (the push is then margin^2)
    d = torch.sqrt(d2.clamp_min(1e-12))
    per_pair = torch.where(same, d2, torch.relu(margin - d) ** 2)
    return 0.5 * per_pair.mean()


class CenterLoss(nn.Module):
    """1/2 mean ||x_i - c_{y_i}||^2 with one learnt centre per identity (labels 0..n_classes-1)."""

    def __init__(self, n_classes: int, dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.zeros(n_classes, dim))

    @torch.no_grad()
    def init_centers(self, embeddings: Tensor, labels: Tensor) -> None:
        """Start each centre at its identity's mean (otherwise every centre starts at the origin)."""
        for c in labels.unique():  # type: ignore[no-untyped-call]  # unannotated in torch
            self.centers[c] = embeddings[labels == c].mean(dim=0)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        diff = embeddings - self.centers[labels]
        return 0.5 * (diff * diff).sum(dim=1).mean()
