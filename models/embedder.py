"""dlib's ResNet face embedder (dlib_face_recognition_resnet_model_v1.dat) -> ONNX (dlib-models.md, sections 4, 10).

Graph: input "chips" uint8 [N,150,150,3] RGB -> Cast -> Transpose(0,3,1,2) -> the network (29 convs with their
affines folded, the input normalisation (v - mean_c)/256 folded into the first, down blocks with end-padding before
Add as identity 1x1 convs, global average pool, MatMul with W 256x128 as stored) -> output "embeddings" float32
[N,128], not normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from models.dlib_dnn import (
    AddPrevSpec,
    AffineSpec,
    ConSpec,
    Conv,
    FcSpec,
    LayerSpec,
    Network,
    PoolSpec,
    ReluSpec,
    SkipSpec,
    TagSpec,
    expect_end,
    read_network,
)
from models.onnx_graph import OPSET, GraphBuilder, emit_layers
from models.serialization import FormatError, Reader

CHIP_SIZE = 150
EMBEDDING_DIM = 128
INPUT_SCALE = 256.0  # dlib's input_rgb_image_sized: (v - mean_c) / 256


def _block(n: int, stride: int) -> list[LayerSpec]:
    return [ConSpec(n, 3, stride), AffineSpec(), ReluSpec(), ConSpec(n, 3, 1), AffineSpec()]


def _ares(n: int) -> list[LayerSpec]:
    """Identity shortcut: relu(x + block(x))."""
    return [TagSpec(1), *_block(n, 1), AddPrevSpec(1), ReluSpec()]


def _ares_down(n: int) -> list[LayerSpec]:
    """Shortcut = 2x2/2 average pool of the input only (no projection): relu(avgpool(x) + block_s2(x))."""
    return [TagSpec(1), *_block(n, 2), TagSpec(2), SkipSpec(1), PoolSpec("avg", 2, 2), AddPrevSpec(2), ReluSpec()]


# Network order, input first (dnn_face_recognition_ex.cpp).
LAYERS: tuple[LayerSpec, ...] = (
    ConSpec(32, 7, 2),
    AffineSpec(),
    ReluSpec(),
    PoolSpec("max", 3, 2),
    *_ares(32) * 3,  # level 4
    *_ares_down(64),  # level 3
    *_ares(64) * 3,
    *_ares_down(128),  # level 2
    *_ares(128) * 2,
    *_ares_down(256),  # level 1
    *_ares(256) * 2,
    *_ares_down(256),  # level 0
    PoolSpec("avg", 0, 1),  # avg_pool_everything
    FcSpec(EMBEDDING_DIM),  # fc_no_bias
)


@dataclass(frozen=True)
class Embedder:
    means: tuple[float, float, float]  # R, G, B
    margin: float
    distance_threshold: float  # dlib's "same person" Euclidean distance (0.6)
    network: Network


def parse(data: bytes) -> Embedder:
    r = Reader(data)
    r.expect_int(1, "loss wrapper")
    r.expect_string("loss_metric_2")
    margin, threshold = r.float(), r.float()
    means, network = read_network(r, LAYERS, _read_input, channels_in=3)
    expect_end(r, "embedder")
    return Embedder(means, margin, threshold, network)


def build_graph(embedder: Embedder) -> onnx.ModelProto:
    g = GraphBuilder("dlib_face_recognition_resnet_model_v1")
    chips = g.input("chips", onnx.TensorProto.UINT8, ["N", CHIP_SIZE, CHIP_SIZE, 3])
    x = g.node("Cast", [chips], to=onnx.TensorProto.FLOAT)
    x = g.node("Transpose", [x], perm=[0, 3, 1, 2])
    first, *rest = embedder.network.layers
    if not isinstance(first, Conv) or first.spec.padding != 0:
        raise FormatError("embedder: the input normalisation folds only into an unpadded first convolution")
    layers = [_normalising(first, embedder.means), *rest]
    x, shape = emit_layers(g, x, layers, (3, CHIP_SIZE, CHIP_SIZE))
    if shape != (EMBEDDING_DIM, 1, 1):
        raise FormatError(f"embedder output shape {shape}, expected ({EMBEDDING_DIM}, 1, 1)")
    g.output(g.identity(x, "embeddings"), onnx.TensorProto.FLOAT, ["N", EMBEDDING_DIM])
    return g.model(doc="dlib ResNet face embedder: 150x150 RGB chips -> 128-d embeddings (not normalised)")


def convert(source: Path, dest: Path) -> dict[str, Any]:
    embedder = parse(source.read_bytes())
    onnx.save(build_graph(embedder), str(dest))
    return {
        "opset": OPSET,
        "inputs": {"chips": f"uint8 [N,{CHIP_SIZE},{CHIP_SIZE},3], RGB"},
        "outputs": {"embeddings": f"float32 [N,{EMBEDDING_DIM}], not normalised"},
        "means": list(embedder.means),
        "distance_threshold": embedder.distance_threshold,
    }


def _normalising(conv: Conv, means: tuple[float, float, float]) -> Conv:
    """The first convolution taking raw pixel values: conv((v - mean_c)/256) = conv'(v) with W' = W/256 and
    b' = b - sum W*mean_c/256 (float64, stored float32). Exact up to rounding only because this convolution is
    unpadded (dlib pads stride-2 convolutions by 0): every window sees pixels, never padding. Saves the graph two
    whole-image operations (Sub, Div) per chip."""
    w = conv.weights.astype(np.float64) / INPUT_SCALE
    shift = (w * np.asarray(means, np.float64)[None, :, None, None]).sum(axis=(1, 2, 3))
    return Conv(conv.spec, w.astype(np.float32), (conv.bias.astype(np.float64) - shift).astype(np.float32))


def _read_input(r: Reader) -> tuple[float, float, float]:
    r.expect_string("input_rgb_image_sized")
    red, green, blue = r.float(), r.float(), r.float()
    size = (r.int(), r.int())
    if size != (CHIP_SIZE, CHIP_SIZE):
        raise FormatError(f"embedder input size: expected {CHIP_SIZE}x{CHIP_SIZE}, got {size[0]}x{size[1]}")
    return (red, green, blue)
