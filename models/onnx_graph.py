"""Building ONNX graphs (opset 17) from parsed dlib layers (dlib-models.md, section 10).

`emit_layers` turns a dlib layer list into nodes: each affine (or batch norm) is folded into the
convolution before it, tags/skips are resolved at build time, and `add_prev` pads both operands at the end
of C, H and W to their element-wise maximum size (a 1x1 identity convolution with end padding: the shapes must be
known there).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from models.dlib_dnn import AddPrevSpec, Affine, BatchNorm, Conv, Fc, Layer, PoolSpec, ReluSpec, SkipSpec, TagSpec

OPSET = 17
IR_VERSION = 8  # the IR version that introduced opset 17: loadable by any ONNX Runtime >= 1.13

Shape = tuple[int, int | None, int | None]  # (C, H, W) of one sample; None = dynamic


class GraphBuilder:
    """Accumulates nodes and initializers with unique names; one output per node."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counts: Counter[str] = Counter()

    def _fresh(self, prefix: str) -> str:
        self._counts[prefix] += 1
        return f"{prefix}_{self._counts[prefix]}"

    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def const(self, prefix: str, value: npt.ArrayLike, dtype: type = np.float32) -> str:
        name = self._fresh(prefix)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(value, dtype=dtype)), name))
        return name

    def node(self, op: str, inputs: Sequence[str], *, out: str | None = None, **attrs: Any) -> str:
        output = out or self._fresh(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=self._fresh(f"n_{op}"), **attrs))
        return output

    def identity(self, x: str, out: str) -> str:
        return self.node("Identity", [x], out=out)

    def conv(
        self,
        x: str,
        weights: npt.NDArray[np.float32],
        bias: npt.NDArray[np.float32],
        stride: int,
        pad: int | Sequence[int],
    ) -> str:
        """pad: the same on every side, or ONNX's [top, left, bottom, right]."""
        kh, kw = weights.shape[2:]
        w = self.const("W", weights)
        b = self.const("B", bias)
        pads = [pad] * 4 if isinstance(pad, int) else list(pad)
        return self.node("Conv", [x, w, b], kernel_shape=[kh, kw], strides=[stride, stride], pads=pads)

    def model(self, *, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="facegate models.build",
            doc_string=doc,
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model


def fold_affine(conv: Conv, affine: Affine) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """W' = W*g per output channel, b' = b*g + beta (computed in float64, stored as float32)."""
    g = affine.gamma.astype(np.float64)
    w = conv.weights.astype(np.float64) * g[:, None, None, None]
    b = conv.bias.astype(np.float64) * g + affine.beta.astype(np.float64)
    return w.astype(np.float32), b.astype(np.float32)


def emit_layers(g: GraphBuilder, x: str, layers: Sequence[Layer], shape: Shape) -> tuple[str, Shape]:
    """Append `layers` (network order) after tensor `x` of per-sample `shape`; return the last tensor and its shape."""
    tags: dict[int, tuple[str, Shape]] = {}
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, Conv):
            weights, bias = layer.weights, layer.bias
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(nxt, Affine | BatchNorm):
                weights, bias = fold_affine(layer, nxt.as_affine() if isinstance(nxt, BatchNorm) else nxt)
                i += 1
            s = layer.spec
            x = g.conv(x, weights, bias, s.stride, s.padding)
            shape = (s.filters, _out(shape[1], s.kernel, s.stride, s.padding), _out(shape[2], s.kernel, s.stride, s.padding))
        elif isinstance(layer, Affine | BatchNorm):
            affine = layer.as_affine() if isinstance(layer, BatchNorm) else layer
            x = g.node("Mul", [x, g.const("gamma", affine.gamma.reshape(1, -1, 1, 1))])
            x = g.node("Add", [x, g.const("beta", affine.beta.reshape(1, -1, 1, 1))])
        elif isinstance(layer, ReluSpec):
            x = g.node("Relu", [x])
        elif isinstance(layer, PoolSpec):
            x, shape = _pool(g, x, layer, shape)
        elif isinstance(layer, Fc):
            flat = g.node("Flatten", [x], axis=1)
            x = g.node("MatMul", [flat, g.const("fc", layer.weights)])
            shape = (layer.weights.shape[1], 1, 1)  # as dlib's (N, outputs, 1, 1); the ONNX tensor is [N, outputs]
        elif isinstance(layer, TagSpec):
            tags[layer.n] = (x, shape)
        elif isinstance(layer, SkipSpec):
            x, shape = tags[layer.n]
        elif isinstance(layer, AddPrevSpec):
            x, shape = _add(g, (x, shape), tags[layer.n])
        else:  # pragma: no cover - the union is closed
            raise TypeError(layer)
        i += 1
    return x, shape


def _out(n: int | None, kernel: int, stride: int, pad: int) -> int | None:
    return None if n is None else (n + 2 * pad - kernel) // stride + 1


def _pool(g: GraphBuilder, x: str, pool: PoolSpec, shape: Shape) -> tuple[str, Shape]:
    if pool.size == 0:
        op = {"avg": "GlobalAveragePool", "max": "GlobalMaxPool"}[pool.kind]
        return g.node(op, [x]), (shape[0], 1, 1)
    attrs: dict[str, Any] = {"kernel_shape": [pool.size] * 2, "strides": [pool.stride] * 2, "pads": [0] * 4}
    if pool.kind == "avg":
        attrs["count_include_pad"] = 0
    op = {"avg": "AveragePool", "max": "MaxPool"}[pool.kind]
    return g.node(op, [x], **attrs), (shape[0], _out(shape[1], pool.size, pool.stride, 0), _out(shape[2], pool.size, pool.stride, 0))


def _add(g: GraphBuilder, a: tuple[str, Shape], b: tuple[str, Shape]) -> tuple[str, Shape]:
    """dlib's add_prev: the sum over the element-wise maximum shape, each operand zero-padded at the end."""
    if a[1] == b[1]:
        return g.node("Add", [a[0], b[0]]), a[1]
    sa, sb = _static(a[1]), _static(b[1])
    target = (max(sa[0], sb[0]), max(sa[1], sb[1]), max(sa[2], sb[2]))
    return g.node("Add", [_pad_to(g, a[0], sa, target), _pad_to(g, b[0], sb, target)]), target


def _static(shape: Shape) -> tuple[int, int, int]:
    c, h, w = shape
    if h is None or w is None:
        raise ValueError(f"add_prev of differently shaped tensors needs static shapes, got {shape}")
    return c, h, w


def _pad_to(g: GraphBuilder, x: str, shape: tuple[int, int, int], target: tuple[int, int, int]) -> str:
    """Zero-pad at the end of C, H and W (ONNX pads: begins of N, C, H, W, then ends)."""
    if shape == target:
        return x
    # A 1x1 convolution with identity weights, zero-padded at the bottom and right, gives the same values (x*1, and
    # zeros in the new channels, rows and columns) but, unlike Pad, has a blocked-layout kernel in ONNX Runtime's CPU
    # provider, so the blocks around it no longer convert between layouts at every Add.
    rows, cols = target[1] - shape[1], target[2] - shape[2]
    weights = np.zeros((target[0], shape[0], 1, 1), np.float32)
    weights[np.arange(shape[0]), np.arange(shape[0])] = 1.0
    return g.conv(x, weights, np.zeros(target[0], np.float32), 1, [0, 0, rows, cols])
