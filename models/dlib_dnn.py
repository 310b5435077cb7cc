"""Reading dlib DNN files driven by a known layer list (../shared/docs/dlib-models.md, sections 2 and 3).

A dlib network file does not describe its own topology: tags and skips do not even store their number.
So the caller states the network, input side first, as a list of layer specs; `read_network` walks the
file along that list, checks every version marker, version string and hyper-parameter, tracks the
channel count through the network, and returns the layers with their parameters. Batch norms are kept
as stored (folding is the graph builder's job), so tests can check the folding against the raw maths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from models.serialization import FormatError, Reader

F32 = npt.NDArray[np.float32]
T = TypeVar("T")


# -- what the network definition says (no parameters) ------------------------------------------------


@dataclass(frozen=True)
class ConSpec:
    filters: int
    kernel: int
    stride: int

    @property
    def padding(self) -> int:
        """dlib's default: kernel//2 for stride 1, else 0."""
        return self.kernel // 2 if self.stride == 1 else 0


@dataclass(frozen=True)
class AffineSpec:
    """An affine slot: holds `affine_` (already folded) or `bn_con2` (running statistics)."""


@dataclass(frozen=True)
class ReluSpec:
    pass


@dataclass(frozen=True)
class PoolSpec:
    kind: str  # "max" or "avg"
    size: int  # 0 = the whole input (global pooling)
    stride: int


@dataclass(frozen=True)
class FcSpec:
    outputs: int


@dataclass(frozen=True)
class TagSpec:
    n: int


@dataclass(frozen=True)
class SkipSpec:
    n: int


@dataclass(frozen=True)
class AddPrevSpec:
    n: int


LayerSpec = ConSpec | AffineSpec | ReluSpec | PoolSpec | FcSpec | TagSpec | SkipSpec | AddPrevSpec
MARKERS = (TagSpec, SkipSpec)


# -- what the file holds ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Conv:
    spec: ConSpec
    weights: F32  # (out, in, kh, kw): ONNX Conv's layout, cross-correlation
    bias: F32  # (out,)


@dataclass(frozen=True, eq=False)
class Affine:
    gamma: F32  # (C,)
    beta: F32


@dataclass(frozen=True, eq=False)
class BatchNorm:
    gamma: F32
    beta: F32
    running_mean: F32
    running_var: F32
    eps: float

    def as_affine(self) -> Affine:
        """dlib's own bn_ -> affine_ conversion, in float32: g = gamma/sqrt(var+eps), b = beta - g*mean."""
        g = self.gamma / np.sqrt(self.running_var + np.float32(self.eps))
        return Affine(g.astype(np.float32), (self.beta - g * self.running_mean).astype(np.float32))


@dataclass(frozen=True, eq=False)
class Fc:
    weights: F32  # (inputs, outputs): y = x @ W


Layer = Conv | Affine | BatchNorm | ReluSpec | PoolSpec | Fc | TagSpec | SkipSpec | AddPrevSpec


@dataclass
class Network:
    layers: list[Layer]
    channels_out: int
    wrapper_versions: list[int] = field(default_factory=list)  # network order, markers included


# -- walking the file -------------------------------------------------------------------------------


def read_network(r: Reader, specs: Sequence[LayerSpec], read_input: Callable[[Reader], T], channels_in: int) -> tuple[T, Network]:
    """Read the header part, the input record (via `read_input`) and every layer record, in file order."""
    versions = _wrapper_versions(specs)
    for i in reversed(range(len(specs))):  # headers are written output side first
        r.expect_int(versions[i], f"wrapper of layer {i} ({type(specs[i]).__name__})")
    input_record = read_input(r)
    channels = channels_in
    tagged: dict[int, int] = {}
    layers: list[Layer] = []
    for i, spec in enumerate(specs):
        where = f"layer {i} ({type(spec).__name__})"
        if isinstance(spec, TagSpec):
            tagged[spec.n] = channels
            layers.append(spec)
            continue
        if isinstance(spec, SkipSpec):
            channels = _tagged(tagged, spec.n, where)
            layers.append(spec)
            continue
        layer: Layer
        if isinstance(spec, ConSpec):
            layer = _read_con(r, spec, channels, where)
            channels = spec.filters
        elif isinstance(spec, AffineSpec):
            layer = _read_affine(r, channels, where)
        elif isinstance(spec, ReluSpec):
            r.expect_string("relu_")
            layer = spec
        elif isinstance(spec, PoolSpec):
            layer = _read_pool(r, spec, where)
        elif isinstance(spec, FcSpec):
            layer = _read_fc(r, spec, channels, where)
            channels = spec.outputs
        elif isinstance(spec, AddPrevSpec):
            r.expect_string("add_prev_")
            channels = max(channels, _tagged(tagged, spec.n, where))
            layer = spec
        else:  # pragma: no cover - the union is closed
            raise TypeError(spec)
        _read_trailer(r, versions[i])
        layers.append(layer)
    return input_record, Network(layers, channels, versions)


def read_doubles(r: Reader, n: int) -> list[float]:
    return [r.float() for _ in range(n)]


def expect_end(r: Reader, what: str) -> None:
    if not r.at_end:
        raise FormatError(f"{what}: {len(r.data) - r.pos} unexpected bytes after the last record (byte {r.pos})")


def _wrapper_versions(specs: Sequence[LayerSpec]) -> list[int]:
    if not specs or isinstance(specs[0], MARKERS):
        raise ValueError("the first layer on the input must be a computational layer")
    return [1 if isinstance(s, MARKERS) else (3 if i == 0 else 2) for i, s in enumerate(specs)]


def _tagged(tagged: dict[int, int], n: int, where: str) -> int:
    if n not in tagged:
        raise ValueError(f"{where}: tag{n} is not set before it is used")
    return tagged[n]


def _read_trailer(r: Reader, version: int) -> None:
    """add_layer's state after the details: three bools, x_grad, cached_output, then per-version extras."""
    for _ in range(3):
        r.bool()
    r.tensor()  # x_grad
    r.tensor()  # cached_output
    r.tensor()  # params_grad (version 2) / grad_final (version 3)
    if version == 3:
        r.expect_int(1, "sample_expansion_factor")


def _expect(what: str, got: object, expected: object) -> None:
    if got != expected:
        raise FormatError(f"{what}: expected {expected}, got {got}")


def _read_con(r: Reader, spec: ConSpec, channels: int, where: str) -> Conv:
    r.expect_string("con_4")
    params = r.tensor()
    header = tuple(r.int() for _ in range(7))
    k, s, p = spec.kernel, spec.stride, spec.padding
    _expect(f"{where} filters, nr, nc, stride_y, stride_x, padding_y, padding_x", header, (spec.filters, k, k, s, s, p, p))
    _expect(f"{where} filters alias", r.alias_tensor(), (spec.filters, channels, k, k))
    _expect(f"{where} biases alias", r.alias_tensor(), (1, spec.filters, 1, 1))
    read_doubles(r, 4)  # training multipliers
    n_weights = spec.filters * channels * k * k
    _expect(f"{where} params shape", params.shape, (n_weights + spec.filters, 1, 1, 1))
    weights = params.data[:n_weights].reshape(spec.filters, channels, k, k)
    return Conv(spec, weights, params.data[n_weights:].copy())


def _read_affine(r: Reader, channels: int, where: str) -> Affine | BatchNorm:
    kind = r.expect_string("affine_", "bn_con2")
    params = r.tensor()
    _expect(f"{where} params shape", params.shape, (2 * channels, 1, 1, 1))
    for name in ("gamma", "beta"):
        _expect(f"{where} {name} alias", r.alias_tensor(), (1, channels, 1, 1))
    gamma, beta = params.data[:channels].copy(), params.data[channels:].copy()
    if kind == "affine_":
        _expect(f"{where} mode (0 = per channel)", r.int(), 0)
        return Affine(gamma, beta)
    stats = []
    for name in ("means", "invstds", "running_means", "running_variances"):
        t = r.tensor()
        _expect(f"{where} {name} shape", t.shape, (1, channels, 1, 1))
        stats.append(t.data)
    r.int()  # num_updates
    r.int()  # running_stats_window_size
    read_doubles(r, 4)  # training multipliers
    eps = r.float()
    return BatchNorm(gamma, beta, stats[2].copy(), stats[3].copy(), eps)


def _read_pool(r: Reader, spec: PoolSpec, where: str) -> PoolSpec:
    r.expect_string(f"{spec.kind}_pool_2")
    got = tuple(r.int() for _ in range(6))
    _expect(f"{where} nr, nc, stride_y, stride_x, padding_y, padding_x", got, (spec.size, spec.size, spec.stride, spec.stride, 0, 0))
    return spec


def _read_fc(r: Reader, spec: FcSpec, channels: int, where: str) -> Fc:
    """Only what these files need: an fc after a global pool (num_inputs = channels) and no bias."""
    r.expect_string("fc_2")
    _expect(f"{where} num_outputs, num_inputs", (r.int(), r.int()), (spec.outputs, channels))
    params = r.tensor()
    _expect(f"{where} params shape", params.shape, (channels, spec.outputs, 1, 1))
    _expect(f"{where} weights alias", r.alias_tensor(), (channels, spec.outputs, 1, 1))
    _expect(f"{where} biases alias", r.alias_tensor(), (0, 0, 0, 0))
    _expect(f"{where} bias_mode (1 = no bias)", r.int(), 1)
    read_doubles(r, 4)
    return Fc(params.data.reshape(channels, spec.outputs))
