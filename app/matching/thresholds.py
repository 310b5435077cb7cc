"""The 1:1 decision, kept apart from the measurement (`distances.py`), as `compare_faces` is from `face_distance`.

Two faces match when their squared L2 distance is AT OR BELOW the threshold. The threshold always arrives as an
argument: the caller resolves request override vs configured default (`Settings.threshold`).

- `DEFAULT_THRESHOLD = 0.36`: dlib's 0.6 Euclidean, squared.
- `is_match(distance, threshold)`: bool for a scalar, bool array for an array; NaN (no face) never matches.
  The comparison is made in float64: distances are float32, and numpy compares a float32 array (or scalar) with a
  Python float in float32, which would round a threshold one float64 step below a distance (what
  `calibration.threshold_for_far` returns) up to that distance and accept it.
- `validate_threshold(t)`, `validate_rate(r, name)`: raise ValueError for values outside their range
  (thresholds in (0, 4] as `Settings.threshold`; rates such as FAR/FPIR in the open interval (0, 1)).
"""

from __future__ import annotations

import math
from typing import overload

import numpy as np
from numpy.typing import NDArray

__all__ = ["DEFAULT_THRESHOLD", "MAX_THRESHOLD", "is_match", "validate_rate", "validate_threshold"]

DEFAULT_THRESHOLD = 0.36
MAX_THRESHOLD = 4.0  # the range Settings.threshold allows; real same-person distances stay far below 1


@overload
def is_match(distance: float, threshold: float) -> bool: ...
@overload
def is_match(distance: NDArray[np.floating], threshold: float) -> NDArray[np.bool_]: ...
def is_match(distance: float | NDArray[np.floating], threshold: float) -> bool | NDArray[np.bool_]:
    """True where `distance <= threshold` (squared L2). NaN distances are never a match."""
    if isinstance(distance, np.ndarray):
        return np.asarray(distance.astype(np.float64, copy=False) <= float(threshold))  # NaN <= t is False
    return bool(float(distance) <= float(threshold))


def validate_threshold(threshold: float) -> float:
    """Return `threshold` as float if it is a usable squared-distance threshold, in (0, 4]; else raise ValueError."""
    t = float(threshold)
    if not (math.isfinite(t) and 0.0 < t <= MAX_THRESHOLD):
        raise ValueError(f"threshold must be in (0, {MAX_THRESHOLD}], got {threshold!r}")
    return t


def validate_rate(rate: float, name: str = "rate") -> float:
    """Return `rate` as float if it is a proper probability in (0, 1) (a target FAR or FPIR); else raise ValueError."""
    r = float(rate)
    if not (math.isfinite(r) and 0.0 < r < 1.0):
        raise ValueError(f"{name} must be in (0, 1), got {rate!r}")
    return r
