"""A reader for dlib's serialization format (see ../shared/docs/dlib-models.md, section 1).

Every multi-byte value is little-endian. Integers are a control byte (sign bit 7, length in bits 0-3)
followed by the magnitude; floats in the "portable" form are two such integers (mantissa, exponent);
tensor payloads are raw IEEE float32.
"""

from __future__ import annotations

import builtins
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


class FormatError(ValueError):
    """The file does not have the structure the network definition expects."""


@dataclass
class Tensor:
    shape: tuple[int, int, int, int]  # (num_samples, k, nr, nc)
    data: npt.NDArray[np.float32]


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def at_end(self) -> bool:
        return self.pos == len(self.data)

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise FormatError(f"unexpected end of file at byte {self.pos} (wanted {n} more)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        control = self.raw(1)[0]
        if control & 0x70:
            raise FormatError(f"bad integer control byte 0x{control:02x} at byte {self.pos - 1}")
        size = control & 0x0F
        if not 1 <= size <= 8:
            raise FormatError(f"bad integer length {size} at byte {self.pos - 1}")
        value = int.from_bytes(self.raw(size), "little")
        return -value if control & 0x80 else value

    def bool(self) -> bool:
        byte = self.raw(1)
        if byte not in (b"0", b"1"):
            raise FormatError(f"bad bool byte {byte!r} at byte {self.pos - 1}")
        return byte == b"1"

    def float(self) -> float:
        """Portable float/double: mantissa then exponent, value = mantissa * 2**exponent."""
        mantissa = self.int()
        exponent = self.int()
        if exponent == 32000:
            return math.inf
        if exponent == 32001:
            return -math.inf
        if exponent == 32002:
            return math.nan
        return math.ldexp(mantissa, exponent)

    def string(self) -> str:
        length = self.int()
        return self.raw(length).decode("latin-1")

    def expect_int(self, expected: builtins.int, what: str) -> None:
        got = self.int()
        if got != expected:
            raise FormatError(f"{what}: expected version {expected}, got {got} at byte {self.pos}")

    def expect_string(self, *expected: str) -> str:
        got = self.string()
        if got not in expected:
            raise FormatError(f"expected one of {expected}, got {got!r} at byte {self.pos}")
        return got

    def matrix(self) -> npt.NDArray[np.float64]:
        """dlib::matrix of portable floats: rows, cols (negated), then the elements row by row."""
        rows = abs(self.int())
        cols = abs(self.int())
        values = [self.float() for _ in range(rows * cols)]
        return np.array(values, dtype=np.float64).reshape(rows, cols)

    def tensor(self) -> Tensor:
        self.expect_int(2, "tensor")
        shape = (self.int(), self.int(), self.int(), self.int())
        count = shape[0] * shape[1] * shape[2] * shape[3]
        data = np.frombuffer(self.raw(4 * count), dtype="<f4").astype(np.float32)
        return Tensor(shape, data)

    def alias_tensor(self) -> tuple[builtins.int, builtins.int, builtins.int, builtins.int]:
        self.expect_int(1, "alias tensor")
        return (self.int(), self.int(), self.int(), self.int())
