"""FaceEmbedder: input checks, lazy loading, batching, and its output against dlib's compute_face_descriptor.

Real-face parity of the graph itself is in tests/models/test_embedder.py; here the chips are synthetic
(smooth random colour fields made in code), which dlib embeds just the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.config import Provider, RuntimeSettings, Settings
from app.errors import ModelUnavailable
from app.vision.embed import FaceEmbedder

CPU = RuntimeSettings(providers=[Provider.CPU])


def synthetic_chips(n: int, seed: int = 0) -> np.ndarray:
    """n smooth 150x150 RGB chips: random 6x6 colour grids upsampled bilinearly, plus mild noise."""
    rng = np.random.default_rng(seed)
    chips = []
    for _ in range(n):
        grid = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        smooth = np.asarray(grid.resize((150, 150), Image.Resampling.BILINEAR), dtype=np.int16)
        chips.append(np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8))
    return np.stack(chips)


class TestInputChecks:
    """No model needed: chips are checked before the model is opened."""

    @pytest.mark.parametrize(
        "chips",
        [
            pytest.param(np.zeros((2, 150, 150, 3), np.float32), id="float32"),
            pytest.param(np.zeros((150, 150, 3), np.uint8), id="single-chip-without-batch-axis"),
            pytest.param(np.zeros((2, 112, 112, 3), np.uint8), id="wrong-size"),
            pytest.param(np.zeros((2, 150, 150, 4), np.uint8), id="rgba"),
            pytest.param(np.zeros((2, 150, 150), np.uint8), id="grey"),
            pytest.param([[0] * 3] * 150, id="not-an-array"),
        ],
    )
    def test_bad_chips_raise_value_error(self, tmp_path: Path, chips: Any) -> None:
        embedder = FaceEmbedder(tmp_path / "embedder.onnx", CPU)
        with pytest.raises(ValueError, match="150 x 150 x 3"):
            embedder.embed(chips)
        assert embedder.provider is None  # nothing was opened

    def test_single_chip_error_says_how_to_fix_it(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"chip\[None\]"):
            FaceEmbedder(tmp_path / "embedder.onnx", CPU).embed(np.zeros((150, 150, 3), np.uint8))

    def test_batch_size_must_be_positive(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="batch_size"):
            FaceEmbedder(tmp_path / "embedder.onnx", CPU).embed(np.zeros((1, 150, 150, 3), np.uint8), batch_size=0)

    def test_no_chips_give_an_empty_float32_matrix(self, tmp_path: Path) -> None:
        out = FaceEmbedder(tmp_path / "embedder.onnx", CPU).embed(np.zeros((0, 150, 150, 3), np.uint8))
        assert out.shape == (0, 128) and out.dtype == np.float32

    def test_missing_model_file(self, tmp_path: Path) -> None:
        embedder = FaceEmbedder(tmp_path / "embedder.onnx", CPU)
        with pytest.raises(ModelUnavailable):
            embedder.load()
        with pytest.raises(ModelUnavailable):
            embedder.embed(np.zeros((1, 150, 150, 3), np.uint8))


@pytest.fixture(scope="module")
def chips_and_dlib() -> tuple[np.ndarray, np.ndarray]:
    """Seven synthetic chips and dlib's descriptors for them."""
    import dlib

    from models.build import source_dir

    recognizer = dlib.face_recognition_model_v1(str(source_dir() / "dlib_face_recognition_resnet_model_v1.dat"))
    chips = synthetic_chips(7)
    return chips, np.array([recognizer.compute_face_descriptor(chip) for chip in chips])


@pytest.mark.model
class TestWithModel:
    @pytest.fixture
    def embedder(self, settings: Settings) -> FaceEmbedder:
        return FaceEmbedder(settings.models_dir / "embedder.onnx", settings.runtime)

    def test_opens_lazily_and_reports_its_provider(self, embedder: FaceEmbedder) -> None:
        assert embedder.provider is None
        embedder.embed(synthetic_chips(1))
        assert embedder.provider == "CPUExecutionProvider"

    def test_matches_dlib(self, embedder: FaceEmbedder, chips_and_dlib: tuple[np.ndarray, np.ndarray]) -> None:
        chips, expected = chips_and_dlib
        out = embedder.embed(chips)
        assert out.dtype == np.float32 and out.shape == (7, 128)
        assert np.abs(out - expected).max() <= 1e-5

    def test_batch_size_does_not_change_results(self, embedder: FaceEmbedder, chips_and_dlib: tuple[np.ndarray, np.ndarray]) -> None:
        chips = chips_and_dlib[0]
        reference = embedder.embed(chips, batch_size=32)
        for batch_size in (1, 3):
            np.testing.assert_allclose(embedder.embed(chips, batch_size=batch_size), reference, rtol=0, atol=1e-6)
        reversed_view = chips[::-1]  # not C-contiguous
        np.testing.assert_allclose(embedder.embed(reversed_view), reference[::-1], rtol=0, atol=1e-6)

    def test_refuses_a_model_that_is_not_the_embedder(self, settings: Settings) -> None:
        with pytest.raises(ModelUnavailable, match="not a facegate embedder"):
            FaceEmbedder(settings.models_dir / "detector.onnx", settings.runtime).load()

    def test_max_batch_bounds_a_call_with_batching_off(self, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
        """FACEGATE_BATCHING__MAX_BATCH is "most face chips in one embedder call" with batching off too: the
        pipeline's direct call used the embedder's own default (32)."""
        from app.vision.pipeline import Pipeline

        calls: list[int] = []
        real_embed = FaceEmbedder.embed

        def counted(self: FaceEmbedder, chips: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
            calls.append(batch_size)
            return real_embed(self, chips, batch_size=batch_size)

        monkeypatch.setattr(FaceEmbedder, "embed", counted)
        batching = settings.batching.model_copy(update={"enabled": False, "max_batch": 2})
        off = settings.model_copy(update={"batching": batching})
        pipeline = Pipeline.from_settings(off)
        try:
            out = pipeline.embed(synthetic_chips(5))
        finally:
            pipeline.close()
        assert out.shape == (5, 128) and calls == [2]
