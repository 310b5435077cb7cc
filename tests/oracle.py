"""dlib-bin as the parity oracle: the same detect -> shape_predictor -> compute_face_descriptor path, test-only.

dlib runs on one core and its model objects cannot be pickled, so the photos are shared out to worker
processes that each open the three models once.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_models: dict[str, Any] = {}


@dataclass(frozen=True)
class OracleFace:
    box: tuple[int, int, int, int]  # left, top, right, bottom (inclusive)
    score: float
    landmarks: np.ndarray  # 5 x 2
    embedding: np.ndarray  # 128 float64


def _init() -> None:
    import dlib

    from models.build import source_dir

    src = source_dir()
    _models["detector"] = dlib.cnn_face_detection_model_v1(str(src / "mmod_human_face_detector.dat"))
    _models["shape"] = dlib.shape_predictor(str(src / "shape_predictor_5_face_landmarks.dat"))
    _models["embedder"] = dlib.face_recognition_model_v1(str(src / "dlib_face_recognition_resnet_model_v1.dat"))


def oracle_faces(pixels: np.ndarray, upsample: int) -> list[OracleFace]:
    """dlib's answer for one RGB uint8 photo, each face's chip extracted on its own (single-face calls)."""
    if not _models:
        _init()
    faces = []
    for det in _models["detector"](pixels, upsample):
        shape = _models["shape"](pixels, det.rect)
        points = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.int64)
        embedding = np.array(_models["embedder"].compute_face_descriptor(pixels, shape, 0), dtype=np.float64)
        r = det.rect
        faces.append(OracleFace((r.left(), r.top(), r.right(), r.bottom()), float(det.confidence), points, embedding))
    return faces


def _job(args: tuple[np.ndarray, int]) -> list[OracleFace]:
    return oracle_faces(*args)


def oracle_many(jobs: list[tuple[np.ndarray, int]], workers: int = 2) -> list[list[OracleFace]]:
    # spawn, not fork: a process forked after dlib's networks ran in the parent can hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, initializer=_init, mp_context=context) as pool:
        return list(pool.map(_job, jobs, chunksize=4))


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    left, top = max(a[0], b[0]), max(a[1], b[1])
    right, bottom = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, right - left + 1) * max(0, bottom - top + 1)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / float(area(a) + area(b) - inter)


def photo_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
