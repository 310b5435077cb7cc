"""Every dev photo through facegate's models AND through dlib-bin, computed once and shared by the tests that need
the whole dev set (pipeline parity, the issue-5 figures).

Both sides get the same working image (decoded, EXIF-applied, shrunk to detector.max_side: `working_image`) and
the same upsample count, so the comparison is of the models and maths, not of resize policy. facegate's side runs
detector -> landmarks -> chips -> embedder exactly as `Pipeline.find_faces` does (boxes and points stay in
working-image pixels); dlib's side is `tests.oracle` (MMOD, shape predictor, compute_face_descriptor), two worker
processes.

Cost: about 2 minutes for facegate and several for dlib on CI's 2 cores, so the result is kept in pytest's cache
folder (`.pytest_cache/d/facegate-dev-results/`) under a key that covers everything the numbers depend on: the
model manifest (checksums of the built files), the source of app/vision/ and tests/oracle.py, dlib's version, the
detector and image settings, and each photo's path, size and mtime. Any change there computes afresh; a fresh
checkout (CI) always computes. `-p no:cacheprovider` computes without storing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.config import REPO_ROOT, Settings

CACHE_FOLDER = "facegate-dev-results"


@dataclass
class PhotoResult:
    """One dev photo: facegate's faces and dlib's, both in working-image pixels."""

    ours_boxes: list[tuple[int, int, int, int]]
    ours_scores: list[float]
    ours_points: list[np.ndarray]  # 5 x 2 int64 each
    ours_embeddings: np.ndarray  # (k, 128) float32
    dlib: list[Any]  # list[tests.oracle.OracleFace]


@dataclass(frozen=True)
class DevResults:
    photos: dict[str, PhotoResult]  # path relative to the dev folder -> result

    def largest(self, side: str) -> dict[str, np.ndarray]:
        """Per photo with a face, the embedding (float64) of the largest face ('ours' or 'dlib'), as
        `Pipeline.embed_photo(face="largest")` chooses it."""
        out = {}
        for name, r in self.photos.items():
            if side == "ours" and r.ours_boxes:
                out[name] = r.ours_embeddings[_largest(r.ours_boxes, r.ours_scores)].astype(np.float64)
            elif side == "dlib" and r.dlib:
                out[name] = r.dlib[_largest([f.box for f in r.dlib], [f.score for f in r.dlib])].embedding
        return out


def _largest(boxes: list[tuple[int, int, int, int]], scores: list[float]) -> int:
    def key(i: int) -> tuple[int, float]:
        b = boxes[i]
        return (b[2] - b[0] + 1) * (b[3] - b[1] + 1), scores[i]

    return max(range(len(boxes)), key=key)


def _settings(models_dir: Path) -> Settings:
    return Settings(models_dir=models_dir, runtime={"providers": ["CPUExecutionProvider"]})


def cache_key(dev_faces: Path, models_dir: Path) -> str:
    import dlib

    from tests.oracle import photo_paths

    settings = _settings(models_dir)
    digest = hashlib.sha256()
    digest.update((models_dir / "manifest.json").read_bytes())
    for source in sorted((REPO_ROOT / "app" / "vision").glob("*.py")) + [REPO_ROOT / "tests" / "oracle.py"]:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    digest.update(str(dlib.__version__).encode())
    digest.update(json.dumps([settings.detector.model_dump(mode="json"), settings.image.model_dump()]).encode())
    for path in photo_paths(dev_faces):
        stat = path.stat()
        digest.update(f"{path.relative_to(dev_faces)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def compute(dev_faces: Path, models_dir: Path) -> DevResults:
    from app.vision.align import face_chips
    from app.vision.decode import load_image
    from app.vision.pipeline import Pipeline, working_image
    from tests.oracle import oracle_many, photo_paths

    settings = _settings(models_dir)
    pipeline = Pipeline.from_settings(settings)
    paths = photo_paths(dev_faces)
    works = [working_image(load_image(p, max_pixels=settings.image.max_pixels), settings.detector) for p in paths]
    oracle = oracle_many([(w.pixels, w.upsample) for w in works])
    results: dict[str, PhotoResult] = {}
    for path, work, dlib_faces in zip(paths, works, oracle, strict=True):
        detections = pipeline.detector.detect(
            work.pixels, upsample=work.upsample, score_threshold=settings.detector.score_threshold
        )
        points = [pipeline.landmarks.predict(work.pixels, d.box) for d in detections]
        embeddings = (
            pipeline.embedder.embed(face_chips(work.pixels, points)) if points else np.zeros((0, 128), np.float32)
        )
        results[str(path.relative_to(dev_faces))] = PhotoResult(
            [(d.box.left, d.box.top, d.box.right, d.box.bottom) for d in detections],
            [float(d.score) for d in detections],
            [np.asarray(p, np.int64) for p in points],
            np.asarray(embeddings, np.float32),
            dlib_faces,
        )
    return DevResults(results)


def save(results: DevResults, path: Path) -> None:
    names = list(results.photos)
    arrays: dict[str, Any] = {"photos": np.array(names, dtype=str)}
    ours = [(i, b, s, p, e) for i, n in enumerate(names) for b, s, p, e in _ours(results.photos[n])]
    theirs = [
        (i, f.box, f.score, f.landmarks, f.embedding) for i, n in enumerate(names) for f in results.photos[n].dlib
    ]
    for side, rows, dtype in (("ours", ours, np.float32), ("dlib", theirs, np.float64)):
        arrays[f"{side}_photo"] = np.array([r[0] for r in rows], np.int64)
        arrays[f"{side}_box"] = np.array([r[1] for r in rows], np.int64).reshape(-1, 4)
        arrays[f"{side}_score"] = np.array([r[2] for r in rows], np.float64)
        arrays[f"{side}_points"] = np.array([r[3] for r in rows], np.int64).reshape(-1, 5, 2)
        arrays[f"{side}_embedding"] = np.array([r[4] for r in rows], dtype).reshape(-1, 128)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def _ours(r: PhotoResult) -> list[tuple[tuple[int, int, int, int], float, np.ndarray, np.ndarray]]:
    return list(zip(r.ours_boxes, r.ours_scores, r.ours_points, r.ours_embeddings, strict=True))


def load(path: Path) -> DevResults:
    from tests.oracle import OracleFace

    with np.load(path, allow_pickle=False) as data:
        names = data["photos"].tolist()
        photos = {n: PhotoResult([], [], [], np.zeros((0, 128), np.float32), []) for n in names}
        grouped: dict[int, list[int]] = {}
        for row, i in enumerate(data["ours_photo"].tolist()):
            grouped.setdefault(i, []).append(row)
        for i, rows in grouped.items():
            r = photos[names[i]]
            r.ours_boxes = [tuple(int(v) for v in data["ours_box"][k]) for k in rows]  # type: ignore[misc]
            r.ours_scores = [float(data["ours_score"][k]) for k in rows]
            r.ours_points = [data["ours_points"][k].copy() for k in rows]
            r.ours_embeddings = data["ours_embedding"][rows].astype(np.float32)
        for row, i in enumerate(data["dlib_photo"].tolist()):
            photos[names[i]].dlib.append(
                OracleFace(
                    tuple(int(v) for v in data["dlib_box"][row]),  # type: ignore[arg-type]
                    float(data["dlib_score"][row]),
                    data["dlib_points"][row].copy(),
                    data["dlib_embedding"][row].copy(),
                )
            )
    return DevResults(photos)


def load_or_compute(dev_faces: Path, models_dir: Path, cache_dir: Path | None) -> DevResults:
    """From `cache_dir` when a file with the current key is there, else computed (and stored there, replacing
    files of older keys)."""
    if cache_dir is None:
        return compute(dev_faces, models_dir)
    key = cache_key(dev_faces, models_dir)
    path = cache_dir / f"dev-{key}.npz"
    if path.is_file():
        try:
            return load(path)
        except (OSError, KeyError, ValueError):
            path.unlink(missing_ok=True)
    results = compute(dev_faces, models_dir)
    for old in cache_dir.glob("dev-*.npz"):
        old.unlink(missing_ok=True)
    save(results, path)
    return results
