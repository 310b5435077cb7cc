"""`facegate eval` and `facegate calibrate` from Python: labelled photo pairs -> distances -> report / threshold.

Steps, each taking the previous one's output:

1. `read_pairs(csv)`: pairs in the format of the dev set's pairs.csv (header `img_a,img_b,same`; paths relative to
   the images folder; `same` 1/0, true/false or yes/no).
2. `embed_photos(pipeline, images, paths, cache=...)`: each distinct photo embedded ONCE (largest face, as
   `Pipeline.embed_photo(face="largest")`); a photo without a usable face gets a NaN row and the error code
   (no_face, invalid_image, image_too_small, ...). With an `EmbeddingCache`, photos already embedded with the same
   model and settings (and unchanged on disk: size and mtime) are not embedded again.
3. `pair_distances(pairs, embeddings)`: squared L2 per pair; NaN where either face is missing.
4. `evaluate(...)` -> `Evaluation`: `app.matching.evaluation.evaluate_pairs` (ROC, AUC, EER, accuracy at the
   threshold, 10-fold accuracy, VAL@FAR 1e-3 and 1e-2, histograms), missing faces counted and listed, never dropped
   silently. `write_report(evaluation, out_dir)` writes `eval.json` and `eval.png` (ROC + both distance histograms,
   threshold marked; `app.matching.report`). `format_table(evaluation)` is the text `facegate eval` prints.
5. `calibrate(distances, same, target_far)`: the threshold for a target FAR (`app.matching.calibration`).

Nothing here knows HTTP or the gallery; the service and the CLI call these functions.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app.config import DetectorSettings
from app.errors import FacegateError, ImageTooLarge, InsufficientData, InvalidRequest, UnsupportedImage
from app.matching.calibration import FarCalibration, calibrate_far
from app.matching.distances import pairwise_squared_l2
from app.matching.evaluation import VerificationReport, evaluate_pairs
from app.matching.thresholds import DEFAULT_THRESHOLD
from app.vision.pipeline import Pipeline
from app.vision.types import EMBEDDING_DIM

__all__ = [
    "Embedded",
    "EmbeddingCache",
    "Evaluation",
    "Pair",
    "calibrate",
    "embed_photos",
    "evaluate",
    "format_table",
    "pair_distances",
    "pipeline_signature",
    "read_pairs",
    "write_report",
]

REPORT_JSON = "eval.json"
REPORT_PNG = "eval.png"
DISTANCES_JSON = "eval-distances.json"  # {"same": [...], "different": [...]}: the pairs part of a /calibrate body

_TRUE = {"1", "true", "yes", "same", "y", "t"}
_FALSE = {"0", "false", "no", "different", "n", "f"}


# -------------------------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True, slots=True)
class Pair:
    img_a: str  # relative to the images folder, as written in the CSV
    img_b: str
    same: bool


def read_pairs(path: Path, *, at_least: int = 1) -> list[Pair]:
    """Labelled pairs from a CSV with the header `img_a,img_b,same`. Raises InvalidRequest naming the bad line, or
    when the file holds fewer than `at_least` same or different pairs: refused before any photo is embedded (minutes
    for a large set), not after, since found faces can only make them fewer.

    As a spreadsheet saves it too: a UTF-8 byte-order mark (Excel's "CSV UTF-8"), CRLF line ends, and a header in
    another case or with spaces around the names."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"cannot read {path}: {error}", field="pairs") from None
    pairs = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames:
        reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
    missing = {"img_a", "img_b", "same"} - set(reader.fieldnames or ())
    if missing:
        raise InvalidRequest(
            f"{path}: the header must name img_a, img_b and same (missing {', '.join(sorted(missing))})",
            field="pairs",
        )
    for line, row in enumerate(reader, start=2):
        label = (row["same"] or "").strip().lower()
        if label not in _TRUE | _FALSE or not row["img_a"] or not row["img_b"]:
            raise InvalidRequest(f"{path}, line {line}: expected img_a,img_b,same (1 or 0)", field="pairs")
        if "\0" in row["img_a"] + row["img_b"]:
            # No file name holds a NUL (a damaged file, or one saved as UTF-16): opening it raised ValueError, a
            # traceback after the photos before it were embedded.
            raise InvalidRequest(f"{path}, line {line}: a photo path holds a NUL character", field="pairs")
        pairs.append(Pair(row["img_a"].strip(), row["img_b"].strip(), label in _TRUE))
    if not pairs:
        raise InvalidRequest(f"{path} has no pairs", field="pairs")
    n_same = sum(p.same for p in pairs)
    if min(n_same, len(pairs) - n_same) < at_least:
        raise InvalidRequest(
            f"{path} has {n_same} same and {len(pairs) - n_same} different pairs: at least {at_least} of each are "
            "needed",
            field="pairs",
        )
    return pairs


# ---------------------------------------------------------------------------------------------- embeddings


def pipeline_signature(model_version: str, detector: DetectorSettings) -> str:
    """What an embedding depends on besides the photo: the model, the detection settings (largest face) and how a
    large JPEG is decoded (`fit`: at a reduced scale; caches written before that are not reused)."""
    return (
        f"{model_version}|max_side={detector.max_side}|upsample={detector.upsample}"
        f"|auto_below={detector.auto_upsample_below}|score_threshold={detector.score_threshold}|face=largest"
        "|decode=fit"
    )


@dataclass(frozen=True, slots=True)
class Embedded:
    """One photo's largest-face embedding (NaN when `error` is set: the error's code, e.g. no_face)."""

    embedding: npt.NDArray[np.float32]
    error: str = ""


@dataclass
class EmbeddingCache:
    """Embeddings by photo path (relative), valid for one `signature` and while the file's size and mtime hold.

    Stored as an .npz (arrays: signature, paths, sizes, mtimes, embeddings, errors). A file written for another
    model or other detection settings is ignored as a whole (nothing of it is reused).
    """

    signature: str
    entries: dict[str, tuple[int, int, Embedded]] = field(default_factory=dict)  # path -> (size, mtime_ns, value)

    @classmethod
    def load(cls, path: Path, signature: str) -> EmbeddingCache:
        cache = cls(signature)
        if not Path(path).is_file():
            return cache
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["signature"]) != signature:
                    return cache
                for p, size, mtime, emb, err in zip(
                    data["paths"].tolist(),
                    data["sizes"].tolist(),
                    data["mtimes"].tolist(),
                    data["embeddings"],
                    data["errors"].tolist(),
                    strict=True,
                ):
                    cache.entries[str(p)] = (int(size), int(mtime), Embedded(emb.astype(np.float32), str(err)))
        # Unreadable or foreign file: start afresh (it is rewritten). numpy raises EOFError for an empty file and
        # BadZipFile for a cut one (a copy or disk that failed): neither is an OSError or a ValueError.
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return cls(signature)
        return cache

    def save(self, path: Path) -> None:
        paths = sorted(self.entries)
        emb = np.full((len(paths), EMBEDDING_DIM), np.nan, np.float32)
        for i, p in enumerate(paths):
            emb[i] = self.entries[p][2].embedding
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp.npz")
        # Embeddings, and the photos' paths (people's names): readable by the owner only, whatever the umask.
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            np.savez_compressed(
                out,
                signature=np.array(self.signature),
                paths=np.array(paths, dtype=str),
                sizes=np.array([self.entries[p][0] for p in paths], np.int64),
                mtimes=np.array([self.entries[p][1] for p in paths], np.int64),
                embeddings=emb,
                errors=np.array([self.entries[p][2].error for p in paths], dtype=str),
            )
        tmp.replace(target)

    def forget_missing(self, images: Path) -> None:
        """Drop the entries whose photo is no longer under `images`: an embedding identifies a person, and a person
        removed from the folder (a deleted photo or person folder) must not stay in the cache file, which is
        rewritten with what is left. (A cache used with another folder is so emptied of the first folder's photos:
        one cache per folder.)"""
        root = Path(images)
        self.entries = {p: entry for p, entry in self.entries.items() if (root / p).is_file()}

    def get(self, relative: str, file: Path) -> Embedded | None:
        entry = self.entries.get(relative)
        if entry is None:
            return None
        try:
            stat = file.stat()
        except OSError:
            return None
        size, mtime, value = entry
        if value.error in (UnsupportedImage.code, ImageTooLarge.code):
            # Whether a format is decoded (FACEGATE_IMAGE__HEIC) and how many pixels a photo may have
            # (FACEGATE_IMAGE__MAX_PIXELS) are settings, not in the signature: such a photo is tried again, at no
            # cost (it is refused from its first bytes / its header).
            return None
        return value if (size, mtime) == (stat.st_size, stat.st_mtime_ns) else None

    def put(self, relative: str, file: Path, value: Embedded) -> None:
        try:
            stat = file.stat()
        except OSError:
            return  # a file that cannot be read is not cached: it is tried again next time
        self.entries[relative] = (stat.st_size, stat.st_mtime_ns, value)


def embed_one(pipeline: Pipeline, file: Path) -> Embedded:
    """The largest face of one photo file; errors (no face, not an image, unreadable) become codes."""
    nan = np.full(EMBEDDING_DIM, np.nan, np.float32)
    try:
        face = pipeline.embed_photo(pipeline.file_loader(file), face="largest")
    except FacegateError as error:
        return Embedded(nan, error.code)
    except OSError:
        return Embedded(nan, "unreadable")
    return Embedded(np.asarray(face.embedding, np.float32), "")


def embed_photos(
    pipeline: Pipeline,
    images: Path,
    paths: Iterable[str],
    *,
    cache: EmbeddingCache | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Embedded]:
    """Each distinct relative path of `paths` (under `images`) embedded once; `progress(n)` after each photo. The
    cache first forgets the photos no longer under `images` (see `EmbeddingCache.forget_missing`)."""
    if cache is not None:
        cache.forget_missing(Path(images))
    out: dict[str, Embedded] = {}
    for relative in dict.fromkeys(paths):
        file = Path(images) / relative
        value = cache.get(relative, file) if cache is not None else None
        if value is None:
            value = embed_one(pipeline, file)
            if cache is not None:
                cache.put(relative, file, value)
        out[relative] = value
        if progress is not None:
            progress(1)
    return out


def pair_distances(pairs: Sequence[Pair], embeddings: dict[str, Embedded]) -> npt.NDArray[np.float64]:
    """Squared L2 per pair (NaN where a face of the pair is missing)."""
    if not pairs:
        return np.zeros(0, np.float64)
    a = np.stack([embeddings[p.img_a].embedding for p in pairs])
    b = np.stack([embeddings[p.img_b].embedding for p in pairs])
    return pairwise_squared_l2(a, b).astype(np.float64)


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Evaluation:
    report: VerificationReport
    distances: npt.NDArray[np.float64]  # per pair, NaN = missing face
    same: npt.NDArray[np.bool_]
    n_photos: int
    missing_photos: dict[str, str]  # relative path -> error code (no_face, invalid_image, ...)
    model_version: str
    pairs_file: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "pairs_file": self.pairs_file,
            "model_version": self.model_version,
            "n_photos": self.n_photos,
            "missing_photos": dict(sorted(self.missing_photos.items())),
            **self.report.to_dict(),
        }


def evaluate_distances(
    distances: npt.ArrayLike,
    same: npt.ArrayLike,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    model_version: str = "",
    n_photos: int = 0,
    missing_photos: dict[str, str] | None = None,
    pairs_file: str = "",
) -> Evaluation:
    d = np.asarray(distances, np.float64)
    s = np.asarray(same, bool)
    try:
        report = evaluate_pairs(d, s, threshold=threshold)
    except ValueError as error:  # too few found pairs of one label for ROC / 10-fold
        raise InvalidRequest(f"cannot evaluate these pairs: {error}", field="pairs") from None
    return Evaluation(report, d, s, n_photos, dict(missing_photos or {}), model_version, pairs_file)


def evaluate(
    pairs: Sequence[Pair],
    images: Path,
    pipeline: Pipeline,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    cache: EmbeddingCache | None = None,
    progress: Callable[[int], None] | None = None,
    pairs_file: str = "",
) -> Evaluation:
    """Embed the pairs' photos (once each) and evaluate the pairs at `threshold`."""
    photos = [p for pair in pairs for p in (pair.img_a, pair.img_b)]
    embedded = embed_photos(pipeline, images, photos, cache=cache, progress=progress)
    return evaluate_distances(
        pair_distances(pairs, embedded),
        [p.same for p in pairs],
        threshold=threshold,
        model_version=pipeline.model_version,
        n_photos=len(embedded),
        missing_photos={path: e.error for path, e in embedded.items() if e.error},
        pairs_file=pairs_file,
    )


def write_report(
    evaluation: Evaluation, out_dir: Path, *, title: str = "facegate 1:1"
) -> tuple[Path, Path | None]:
    """`eval.json` (everything, ROC thinned to ~200 points), `eval-distances.json` (every found pair's distance,
    split into same and different: with `source` and `target_far` added, a `POST /calibrate` body) and `eval.png`
    (ROC + histograms) in `out_dir`. The plot needs matplotlib (extra `report`); without it the PNG is skipped and
    None returned in its place."""
    from app.matching.report import plot_verification

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / REPORT_JSON
    json_path.write_text(json.dumps(evaluation.to_dict(), indent=1, allow_nan=False) + "\n")
    found = ~np.isnan(evaluation.distances)
    labelled = {
        side: [float(v) for v in evaluation.distances[found & (evaluation.same == same)]]
        for side, same in (("same", True), ("different", False))
    }
    (out / DISTANCES_JSON).write_text(json.dumps(labelled, allow_nan=False) + "\n")
    try:
        png_path = plot_verification(evaluation.report, out / REPORT_PNG, title=title)
    except ModuleNotFoundError as error:
        if error.name != "matplotlib" and not str(error.name).startswith("matplotlib."):
            raise
        return json_path, None
    return json_path, png_path


def format_table(evaluation: Evaluation) -> str:
    """The table `facegate eval` prints."""
    r = evaluation.report
    at = r.at_threshold
    rows = [
        ("pairs", f"{r.n_pairs} ({r.n_same} same, {r.n_different} different)"),
        (
            "missing faces",
            (
                f"{len(evaluation.missing_photos)} of {evaluation.n_photos} photos; {r.n_missing} pairs left out "
                f"({r.n_missing_same} same, {r.n_missing_different} different)"
            ),
        ),
        ("AUC", f"{r.auc:.4f}"),
        ("EER", f"{r.eer.eer:.2%} (at distance {r.eer.threshold:.4f})"),
        (
            f"accuracy at {r.threshold:g}",
            (
                f"{at.accuracy:.2%} (TAR {at.tar:.2%}, FAR {at.far:.3%}; {r.accuracy_missing_as_errors:.2%} "
                "counting missing pairs as errors)"
            ),
        ),
        (f"{r.kfold.n_folds}-fold accuracy", f"{r.kfold.mean:.2%} +- {r.kfold.std:.2%}"),
    ]
    for v in r.val_at_far:
        rows.append(
            (
                f"VAL @ FAR {v.target_far:g}",
                (
                    f"{v.val:.2%} (threshold {v.threshold:.4f}, measured FAR {v.far:.3%}, "
                    f"{v.false_accepts}/{v.n_different})"
                ),
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# --------------------------------------------------------------------------------------------- calibration


def calibrate(
    distances: npt.ArrayLike, same: npt.ArrayLike, target_far: float, *, confidence: float = 0.95
) -> FarCalibration:
    """Threshold for `target_far` from labelled pair distances (NaN = missing, left out). Raises InvalidRequest, or
    InsufficientData when no usable threshold keeps the FAR there."""
    d = np.asarray(distances, np.float64).ravel()
    s = np.asarray(same, bool).ravel()
    if d.shape != s.shape:
        raise InvalidRequest("distances and labels differ in length")
    try:
        calibration = calibrate_far(d[s], d[~s], target_far, confidence=confidence)
    except ValueError as error:
        raise InvalidRequest(f"cannot calibrate: {error}") from None
    problem = calibration.unusable()
    if problem is not None:  # as POST /calibrate: a threshold of 0 or less (or over 4) decides nothing
        raise InsufficientData(problem)
    return calibration

