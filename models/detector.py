"""dlib's MMOD CNN face detector (mmod_human_face_detector.dat) -> ONNX (dlib-models.md, sections 9.1, 9.2, 10).

The graph is the bare network: input "image" float32 [N,3,H,W], already normalised ((v - mean_c)/256, the
tiled pyramid of section 9.3), output "scores" float32 [N,1,h,w] with h = f(f(f(H))), f(n) = (n-5)//2 + 1.
The six batch norms are folded into their convolutions, the 45-channel layers are zero-padded to 48
(`_pad_channels`), and the final 9x9 convolution to one channel is split in two (`_score_conv`). Pyramid tiling
and decoding stay in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from models.dlib_dnn import (
    Affine,
    AffineSpec,
    BatchNorm,
    ConSpec,
    Conv,
    Layer,
    LayerSpec,
    Network,
    ReluSpec,
    expect_end,
    read_doubles,
    read_network,
)
from models.onnx_graph import OPSET, GraphBuilder, emit_layers
from models.serialization import FormatError, Reader


def _rcon(filters: int, kernel: int, stride: int) -> list[LayerSpec]:
    return [ConSpec(filters, kernel, stride), AffineSpec(), ReluSpec()]


# ONNX Runtime's blocked-layout channel block (16 with AVX-512, 8 with AVX2): hidden layers are padded to it.
CHANNEL_BLOCK = 16

# Network order, input first (dnn_mmod_face_detection_ex.cpp): downsampler, three rcon5, the 9x9 score conv.
LAYERS: tuple[LayerSpec, ...] = (
    *_rcon(16, 5, 2),
    *_rcon(32, 5, 2),
    *_rcon(32, 5, 2),
    *_rcon(45, 5, 1),
    *_rcon(45, 5, 1),
    *_rcon(45, 5, 1),
    ConSpec(1, 9, 1),
)


@dataclass(frozen=True)
class Options:
    """The loss_mmod_ options that decoding needs."""

    window_width: int
    window_height: int
    nms_iou_threshold: float
    nms_percent_covered_threshold: float


@dataclass(frozen=True)
class Detector:
    options: Options
    means: tuple[float, float, float]  # R, G, B
    network: Network


def parse(data: bytes) -> Detector:
    r = Reader(data)
    r.expect_int(1, "loss wrapper")
    r.expect_string("loss_mmod_")
    options = _read_options(r)
    means, network = read_network(r, LAYERS, _read_input, channels_in=3)
    expect_end(r, "detector")
    return Detector(options, means, network)


def build_graph(detector: Detector) -> onnx.ModelProto:
    g = GraphBuilder("dlib_mmod_human_face_detector")
    image = g.input("image", onnx.TensorProto.FLOAT, ["N", 3, "H", "W"])
    *body, last = detector.network.layers
    if not isinstance(last, Conv):
        raise FormatError(f"detector: the last layer should be the score convolution, got {type(last).__name__}")
    features, _ = emit_layers(g, image, _pad_channels(body), (3, None, None))
    scores = _score_conv(g, features, last)
    g.output(g.identity(scores, "scores"), onnx.TensorProto.FLOAT, ["N", 1, "h", "w"])
    return g.model(doc="dlib MMOD CNN face detector: normalised tiled pyramid -> detection scores")


def convert(source: Path, dest: Path) -> dict[str, Any]:
    detector = parse(source.read_bytes())
    onnx.save(build_graph(detector), str(dest))
    o = detector.options
    return {
        "opset": OPSET,
        "inputs": {"image": "float32 [N,3,H,W], (v - mean_c)/256, RGB"},
        "outputs": {"scores": "float32 [N,1,h,w], h = f(f(f(H))), f(n) = (n-5)//2+1"},
        "means": list(detector.means),
        "window": [o.window_width, o.window_height],
        "nms_iou_threshold": o.nms_iou_threshold,
        "nms_percent_covered_threshold": o.nms_percent_covered_threshold,
    }


def _pad_channels(layers: list[Layer], multiple: int = CHANNEL_BLOCK) -> list[Layer]:
    """The body with each convolution's outputs zero-padded to a multiple of `multiple` channels (45 -> 48).

    A padded filter has zero weights and bias, and its affine zero scale and shift, so the channel is 0 after the
    ReLU, and the next convolution's weights for it are 0: the same scores (sums in another order, ~1e-6). Why:
    ONNX Runtime's CPU provider runs convolutions in its blocked (NCHWc, 8 or 16 channels) layout only when the
    channel counts fit the block; the two 45 -> 45 convolutions otherwise fall back to im2col + GEMM, 6.0 ms each
    on a 640x480 photo's pyramid (2 threads) against 4.1 ms padded (the network: 24.1 -> 19.7 ms).
    """
    padded: list[Layer] = []
    pad_in = 0  # zero input channels appended by the previous convolution's padding
    pad_out = 0
    for layer in layers:
        if isinstance(layer, Conv):
            out_channels, in_channels = layer.weights.shape[:2]
            pad_out = -out_channels % multiple
            weights = np.zeros((out_channels + pad_out, in_channels + pad_in, *layer.weights.shape[2:]), np.float32)
            weights[:out_channels, :in_channels] = layer.weights
            bias = np.concatenate([layer.bias, np.zeros(pad_out, np.float32)])
            spec = replace(layer.spec, filters=out_channels + pad_out)
            padded.append(Conv(spec, weights, bias))
            pad_in = pad_out
        elif isinstance(layer, Affine | BatchNorm):
            affine = layer.as_affine() if isinstance(layer, BatchNorm) else layer  # as emit_layers folds it
            zeros = np.zeros(pad_out, np.float32)
            padded.append(Affine(np.concatenate([affine.gamma, zeros]), np.concatenate([affine.beta, zeros])))
        elif isinstance(layer, ReluSpec):
            padded.append(layer)
        else:
            raise FormatError(f"detector body: unexpected {type(layer).__name__} layer")
    return padded


def _score_conv(g: GraphBuilder, x: str, conv: Conv) -> str:
    """The 9x9 convolution to one score channel, as a 1x9 convolution to 9 channels (channel r = kernel row r)
    followed by a 9x1 convolution that adds those rows up, shifted.

    Same maths, sums in another order (scores agree to ~5e-6). Why: ONNX Runtime's CPU kernels handle a
    single output channel poorly (im2col + matrix-vector product): this layer took ~12 % of the network's time
    on a 640x480 photo's pyramid (24 ms of 202, one thread), and ~3 ms once split.
    """
    out_channels, in_channels, kh, kw = conv.weights.shape
    pad, stride = conv.spec.padding, conv.spec.stride
    if out_channels != 1 or stride != 1 or kh != kw:
        raise FormatError(f"detector score layer: expected one square stride-1 filter, got {conv.weights.shape}")
    rows = np.zeros((kh, in_channels + -in_channels % CHANNEL_BLOCK, 1, kw), np.float32)  # (kh, C, 1, kw)
    rows[:, :in_channels, 0, :] = conv.weights[0].transpose(1, 0, 2)  # the body's padded channels get 0 weights
    # Padded on all sides: kh + 2*pad - kh + 1 = H + 2*pad rows (the 9x1 step trims them), W columns.
    per_row = g.conv(x, rows, np.zeros(kh, np.float32), 1, pad)
    shift_sum = np.zeros((1, kh, kh, 1), np.float32)
    shift_sum[0, np.arange(kh), np.arange(kh), 0] = 1.0  # output(y) = sum over r of channel r at row y + r
    return g.conv(per_row, shift_sum, conv.bias, 1, 0)


def _read_options(r: Reader) -> Options:
    r.expect_int(1, "mmod options")  # version 1: a single window, no label
    width, height = r.int(), r.int()
    if (width, height) != (80, 80):
        raise FormatError(f"detector window: expected 80x80, got {width}x{height}")
    # loss_per_false_alarm, loss_per_missed_target, truth_match_iou_threshold, nms (iou, covered), ignore (iou, covered)
    values = read_doubles(r, 7)
    return Options(width, height, values[3], values[4])


def _read_input(r: Reader) -> tuple[float, float, float]:
    r.expect_string("input_rgb_image_pyramid")
    red, green, blue = read_doubles(r, 3)
    return (red, green, blue)
