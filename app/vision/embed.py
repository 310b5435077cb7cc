"""Face chips -> 128-d embeddings with dlib's ResNet, run by ONNX Runtime (models/dist/embedder.onnx).

The graph takes uint8 RGB chips as they come from `vision.align` and does dlib's preprocessing itself
((v - mean)/256); its output is dlib's raw embedding (not normalised), so squared L2 distances between
embeddings are comparable with dlib's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.config import RuntimeSettings
from app.errors import ModelUnavailable
from app.vision.runtime import LazySession
from app.vision.types import CHIP_SIZE, EMBEDDING_DIM, Chips, Embeddings

INPUT = "chips"
OUTPUT = "embeddings"


class FaceEmbedder:
    """dlib's face embedder; the ONNX file opens on first use or at `load()`."""

    def __init__(self, path: Path, runtime: RuntimeSettings, *, require_gpu: bool = False) -> None:
        self._session = LazySession(path, runtime, require_gpu=require_gpu)

    @property
    def path(self) -> Path:
        return self._session.path

    def load(self) -> None:
        """Open the model now (raises ModelUnavailable if it is missing, malformed or the required GPU is not in use)."""
        session = self._session.load()
        inputs = {i.name: (i.type, i.shape[1:]) for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        if inputs != {INPUT: ("tensor(uint8)", [CHIP_SIZE, CHIP_SIZE, 3])} or outputs != [OUTPUT]:
            raise ModelUnavailable(
                f"{self.path.name} is not a facegate embedder (inputs {inputs}, outputs {outputs}): run `make models`"
            )

    @property
    def load_failed(self) -> bool:
        """Whether the last attempt to open the model failed (it is tried again on the next use)."""
        return self._session.failed

    @property
    def provider(self) -> str | None:
        """The ONNX Runtime provider in use, or None before the model is loaded."""
        return self._session.provider

    def embed(self, chips: Chips, *, batch_size: int = 32) -> Embeddings:
        """Embed N aligned face chips.

        chips: uint8 array N x 150 x 150 x 3, RGB (N may be 0).
        batch_size: chips per ONNX Runtime call; does not change the results (beyond ~1e-7).
        Returns float32 N x 128, dlib's scale (norms around 1.3-1.6).
        """
        _check_chips(chips)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(chips) == 0:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        if not self._session.loaded:
            self.load()
        session = self._session.load()
        parts = [
            session.run([OUTPUT], {INPUT: np.ascontiguousarray(chips[start : start + batch_size])})[0]
            for start in range(0, len(chips), batch_size)
        ]
        return np.concatenate(parts).astype(np.float32, copy=False)


def _check_chips(chips: Chips) -> None:
    expected = f"N x {CHIP_SIZE} x {CHIP_SIZE} x 3 uint8 RGB chips"
    if not isinstance(chips, np.ndarray):
        raise ValueError(f"expected a numpy array of {expected}, got {type(chips).__name__}")
    if chips.dtype != np.uint8:
        raise ValueError(f"expected {expected}, got dtype {chips.dtype}")
    if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
        hint = " (one chip? pass chip[None])" if chips.shape == (CHIP_SIZE, CHIP_SIZE, 3) else ""
        raise ValueError(f"expected {expected}, got shape {chips.shape}{hint}")
