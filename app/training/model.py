"""The head: a small map from dlib's 128-d embeddings back to an L2-normalised 128-d space.

Both shapes start as (a scaled copy of) the identity, so an untrained head ranks pairs exactly as the base does
(the base's embeddings, normalised) and training moves away from there only as far as the loss asks:
- `linear`: y = normalise(W x + b), W = I, b = 0 at start;
- `mlp`: y = normalise(x + W2 relu(W1 x + b1) + b2), a residual 2-layer map with W2 = 0 at start.
"""

from __future__ import annotations

from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.vision.types import EMBEDDING_DIM

__all__ = ["Arch", "HeadNet"]


class Arch(StrEnum):
    linear = "linear"
    mlp = "mlp"


class HeadNet(nn.Module):
    def __init__(self, arch: Arch | str = Arch.linear, *, hidden: int = 256, dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.arch = Arch(arch)
        if self.arch is Arch.linear:
            self.linear = nn.Linear(dim, dim)
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(dim))
                self.linear.bias.zero_()
        else:
            self.hidden = nn.Linear(dim, hidden)
            self.out = nn.Linear(hidden, dim)
            with torch.no_grad():
                self.out.weight.zero_()
                self.out.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if self.arch is Arch.linear:
            y = self.linear(x)
        else:
            y = x + self.out(torch.relu(self.hidden(x)))
        return F.normalize(y, dim=1, eps=1e-12)
