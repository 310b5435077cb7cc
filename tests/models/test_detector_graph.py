"""The MMOD detector converter: byte-exact parsing, and the ONNX graph (batch norms folded into the convolutions)
against a direct float64 numpy forward pass of the parsed layers with the batch-norm formula unfolded."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

from models import detector
from models.build import source_dir
from models.dlib_dnn import BatchNorm, Conv, Layer, ReluSpec
from models.serialization import FormatError

pytestmark = pytest.mark.model

SOURCE = "mmod_human_face_detector.dat"


@pytest.fixture(scope="module")
def source_bytes() -> bytes:
    return (source_dir() / SOURCE).read_bytes()


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("detector") / "detector.onnx"
    extra = detector.convert(source_dir() / SOURCE, path)
    assert extra["opset"] == 17 and extra["window"] == [80, 80]
    return path


@pytest.fixture(scope="module")
def session(onnx_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


def _numpy_forward(layers: list[Layer], x: np.ndarray) -> np.ndarray:
    """dlib's maths layer by layer in float64: cross-correlation with zero padding, then the raw batch norm."""
    for layer in layers:
        if isinstance(layer, Conv):
            pad, stride = layer.spec.padding, layer.spec.stride
            padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
            windows = sliding_window_view(padded, layer.weights.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
            x = np.einsum("nchwij,fcij->nfhw", windows, layer.weights.astype(np.float64), optimize=True)
            x = x + layer.bias[None, :, None, None]
        elif isinstance(layer, BatchNorm):
            scale = layer.gamma / np.sqrt(layer.running_var.astype(np.float64) + layer.eps)
            x = (x - layer.running_mean[None, :, None, None]) * scale[None, :, None, None] + layer.beta[None, :, None, None]
        elif isinstance(layer, ReluSpec):
            x = np.maximum(x, 0.0)
        else:
            raise AssertionError(f"unexpected layer {layer}")
    return x


def _side(n: int) -> int:
    for _ in range(3):
        n = (n - 5) // 2 + 1
    return n


class TestParser:
    def test_reads_the_whole_network(self, source_bytes: bytes) -> None:
        net = detector.parse(source_bytes)
        layers = net.network.layers
        assert Counter(type(layer).__name__ for layer in layers) == {"Conv": 7, "BatchNorm": 6, "ReluSpec": 6}
        assert net.network.wrapper_versions == [3] + [2] * 18
        assert [layer.weights.shape for layer in layers if isinstance(layer, Conv)] == [
            (16, 3, 5, 5), (32, 16, 5, 5), (32, 32, 5, 5), (45, 32, 5, 5), (45, 45, 5, 5), (45, 45, 5, 5), (1, 45, 9, 9)
        ]  # fmt: skip
        assert all(layer.eps == pytest.approx(1e-4) for layer in layers if isinstance(layer, BatchNorm))
        assert net.means == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)
        assert net.options.nms_iou_threshold == pytest.approx(0.3382761351109955, abs=1e-15)
        assert net.options.nms_percent_covered_threshold == 1.0

    @pytest.mark.parametrize(
        "corrupt",
        [
            pytest.param(lambda d: d[:-1], id="truncated-by-one-byte"),
            pytest.param(lambda d: d[: len(d) // 2], id="truncated-in-the-middle"),
            pytest.param(lambda d: d + b"\x01", id="trailing-byte"),
            pytest.param(lambda d: d.replace(b"bn_con2", b"bn_con3", 1), id="layer-version-string"),
            pytest.param(lambda d: d.replace(b"\x01\x50\x01\x50", b"\x01\x51\x01\x50", 1), id="window-size"),
            pytest.param(lambda d: d.replace(b"\x01\x02\x01\x03", b"\x01\x02\x01\x02", 1), id="input-wrapper-version"),
            pytest.param(lambda d: d.replace(b"con_4", b"con_7", 1), id="conv-version-string"),
        ],
    )
    def test_corrupt_file_is_refused(self, source_bytes: bytes, corrupt: Callable[[bytes], bytes]) -> None:
        data = corrupt(source_bytes)
        assert data != source_bytes
        with pytest.raises(FormatError):
            detector.parse(data)


class TestGraph:
    def test_signature(self, session: ort.InferenceSession) -> None:
        (image,) = session.get_inputs()
        (scores,) = session.get_outputs()
        assert (image.name, image.type, image.shape[1]) == ("image", "tensor(float)", 3)
        assert (scores.name, scores.type, scores.shape[1]) == ("scores", "tensor(float)", 1)
        assert all(isinstance(d, str) for d in (image.shape[0], image.shape[2], image.shape[3]))  # dynamic N, H, W

    def test_scores_match_unfolded_numpy_forward(self, session: ort.InferenceSession, source_bytes: bytes) -> None:
        layers = detector.parse(source_bytes).network.layers
        x = np.random.default_rng(7).normal(0.0, 0.3, size=(2, 3, 61, 70)).astype(np.float32)
        expected = _numpy_forward(layers, x.astype(np.float64))
        (scores,) = session.run(["scores"], {"image": x})
        assert scores.shape == expected.shape == (2, 1, _side(61), _side(70))
        assert np.abs(scores - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())  # measured 5.7e-7
        assert np.abs(expected).max() > 0.1  # a real signal, not a map of zeros

    @pytest.mark.parametrize(("n", "height", "width"), [(1, 29, 29), (3, 30, 45), (1, 80, 80), (2, 101, 333)])
    def test_output_size(self, session: ort.InferenceSession, n: int, height: int, width: int) -> None:
        (scores,) = session.run(["scores"], {"image": np.zeros((n, 3, height, width), np.float32)})
        assert scores.shape == (n, 1, _side(height), _side(width))

    def test_hidden_channels_fill_onnx_runtimes_blocks(self, onnx_path: Path) -> None:
        """The 45-channel layers are zero-padded to 48, so every hidden convolution has a blocked (NCHWc) kernel;
        the padding adds zero filters only (the scores test above proves the maths unchanged)."""
        model = onnx.load(str(onnx_path))
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        convs = [weights[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]
        hidden = convs[:-2]  # the score layer's 1x9 and 9x1 halves are the network's output side
        assert [w.shape[0] for w in hidden] == [16, 32, 32, 48, 48, 48]
        for w in hidden[3:]:
            assert np.all(w[45:] == 0.0)  # the padded filters
        for w in hidden[4:] + convs[-2:-1]:
            assert np.all(w[:, 45:] == 0.0)  # the next layer ignores them
