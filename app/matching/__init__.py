"""Matching: pure numpy functions from embeddings to decisions (no model, no database, no HTTP).

- `distances`: squared L2 between raw 128-d embeddings.
- `thresholds`: the 1:1 rule (distance <= threshold, default 0.36) and range checks.
- `evaluation`: ROC / AUC / EER / 10-fold accuracy / VAL@FAR on labelled pairs (`evaluate_pairs`).
- `calibration`: threshold for a target FAR with confidence intervals, calibration tables (shipped default), pairs
  from a live gallery.
- `clustering`: chinese whispers (dlib's) and connected components.
- `openset`: the 1:N open-set decision (`decide`) with gallery-size-aware thresholds (`OpenSetModel`).
- `openset_eval`: DIR / FPIR measurement for `eval-identify`.
- `report`: PNG plots (matplotlib, imported lazily).

Importing this package reads no file: the shipped tables load on first use.
"""

from app.matching.calibration import (
    CalibrationTable,
    FarCalibration,
    calibrate_far,
    load_default_table,
    pairs_from_gallery,
    threshold_for_far,
)
from app.matching.clustering import Clustering, chinese_whispers, connected_components
from app.matching.distances import pairwise_squared_l2, squared_l2
from app.matching.evaluation import VerificationReport, evaluate_pairs
from app.matching.openset import (
    IdentifyDecision,
    OpenSetModel,
    Reason,
    decide,
    load_default_model,
    nearest_identities,
)
from app.matching.openset_eval import (
    IdentificationReport,
    enrolment_split,
    evaluate_identification,
)
from app.matching.thresholds import DEFAULT_THRESHOLD, is_match

__all__ = [
    "DEFAULT_THRESHOLD",
    "CalibrationTable",
    "Clustering",
    "FarCalibration",
    "IdentificationReport",
    "IdentifyDecision",
    "OpenSetModel",
    "Reason",
    "VerificationReport",
    "calibrate_far",
    "chinese_whispers",
    "connected_components",
    "decide",
    "enrolment_split",
    "evaluate_identification",
    "evaluate_pairs",
    "is_match",
    "load_default_model",
    "load_default_table",
    "nearest_identities",
    "pairs_from_gallery",
    "pairwise_squared_l2",
    "squared_l2",
    "threshold_for_far",
]
