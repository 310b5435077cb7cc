"""dlib's ResNet face embedder (dlib_face_recognition_resnet_model_v1.dat) -> ONNX (dlib-models.md, sections 4, 10).

Graph: input "chips" uint8 [N,150,150,3] RGB -> Cast -> Transpose(0,3,1,2) -> Sub(means) -> Div(256) -> the
network (29 convs with their affines folded, down blocks with end-padding before Add, global average
pool, MatMul with W 256x128 as stored) -> output "embeddings" float32 [N,128], not normalised.
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
    x = g.node("Sub", [x, g.const("means", np.array(embedder.means, dtype=np.float32).reshape(1, 3, 1, 1))])
    x = g.node("Div", [x, g.const("scale", np.float32(256.0))])
    x, shape = emit_layers(g, x, embedder.network.layers, (3, CHIP_SIZE, CHIP_SIZE))
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


def _read_input(r: Reader) -> tuple[float, float, float]:
    r.expect_string("input_rgb_image_sized")
    red, green, blue = r.float(), r.float(), r.float()
    size = (r.int(), r.int())
    if size != (CHIP_SIZE, CHIP_SIZE):
        raise FormatError(f"embedder input size: expected {CHIP_SIZE}x{CHIP_SIZE}, got {size[0]}x{size[1]}")
    return (red, green, blue)
