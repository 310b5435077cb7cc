"""`facegate eval-identify` from Python: a folder of people -> 1:N open-set figures (issue 9), JSON and a PNG.

Steps, each taking the previous one's output:

1. `person_photos(images_dir)`: the photo files one folder down (folder name = person), as relative paths
   "person/file", sorted by (person, file name). Hidden files and folders are skipped.
2. Embedding (`app.evaluate.embed_photos`): each photo's LARGEST face, as `Pipeline.embed_photo(face="largest")`;
   with an `EmbeddingCache` (or its .npz path) photos already embedded with the same model and detection settings
   are not embedded again. A photo without a usable face (no_face, invalid_image, image_too_small, ...) is
   counted and listed with its error code, and left out BEFORE the split.
3. The protocol (`app.matching.openset_eval.enrolment_split`, issue 9): people sorted by name; those at even
   positions (0, 2, ...) are enrolled with their first photo (file names sorted), their other photos are probes;
   every photo of the people at odd positions is a stranger. People none of whose photos has a face take no
   position. On lfw-dev: 414 enrolled, 647 probes, 1,046 strangers; on dev: 27, 214, 233 (as measured).
4. `app.matching.openset_eval.evaluate_identification` with the shipped open-set model and the settings'
   `identify_fpir`, `threshold` (max distance) and `ambiguity_margin`: DIR at FPIR 1 %, 5 %, 10 % for the raw
   distance, the ratio d1/d2 and facegate's rule, with each threshold set on this evaluation's own strangers, and
   the default operating point (the rule as /identify applies it, calibrated for this gallery's size), whose
   FPIR gets a 95 % Clopper-Pearson interval from the number of strangers.
5. `write_identify_report(result, out_dir)`: `eval-identify.json` (everything, curves included) and
   `eval-identify.png` (DIR vs FPIR for each rule, default point marked; `app.matching.report`).
   `format_identify_table(result)` is the text the command prints.

`run_identify_eval` does 1-5. `evaluate_gallery` runs 3-4 on a live gallery's stored faces (`POST
/evaluate/identify`). Nothing here knows HTTP or SQL.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from app.config import Settings
from app.errors import InsufficientData, InvalidRequest
from app.evaluate import EmbeddingCache, embed_photos, pipeline_signature
from app.gallery.store import EvaluationFaces
from app.matching.calibration import binomial_interval
from app.matching.data_files import OPENSET_FILE, data_dir
from app.matching.openset import OpenSetModel, load_default_model
from app.matching.openset_eval import (
    IdentificationReport,
    Split,
    enrolment_split,
    evaluate_identification,
)
from app.vision.decode import HEIF_SUFFIXES
from app.vision.pipeline import Pipeline

__all__ = [
    "PHOTO_SUFFIXES",
    "REPORT_JSON",
    "REPORT_PNG",
    "GalleryEvaluation",
    "IdentifyEvaluation",
    "evaluate_embeddings",
    "evaluate_gallery",
    "format_identify_table",
    "folder_entries",
    "hidden",
    "person_photos",
    "photo_suffixes",
    "run_identify_eval",
    "write_identify_report",
]

REPORT_JSON = "eval-identify.json"
REPORT_PNG = "eval-identify.png"
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".avif", ".tif", ".tiff"})
RULE_LABELS = {"raw": "raw distance d1", "ratio": "ratio d1/d2", "facegate": "facegate"}


def folder_entries(folder: Path) -> list[Path]:
    """What `folder` holds; InvalidRequest naming it when it cannot be listed (no permission): a person's folder left
    out would change the protocol's split, and an OSError ended the command with a traceback."""
    try:
        return list(folder.iterdir())
    except OSError as error:
        raise InvalidRequest(f"cannot read the folder {folder}: {error.strerror}", field="images") from None


def hidden(name: str) -> bool:
    """Whether every folder command leaves this file or folder name out: a copy from a Mac holds "._IMG_0001.jpg"
    (AppleDouble metadata, not a photo) beside each photo, and ".thumbnails/" folders hold other photos' previews."""
    return name.startswith(".")


def photo_suffixes(heic: bool) -> frozenset[str]:
    """The file names of photos in a folder: HEIC/HEIF ones too when they are decoded (FACEGATE_IMAGE__HEIC)."""
    return PHOTO_SUFFIXES | HEIF_SUFFIXES if heic else PHOTO_SUFFIXES


def person_photos(images_dir: Path, *, heic: bool = False) -> list[str]:
    """Photo files one folder down, "person/file", sorted by (person, file name); HEIC/HEIF files too with `heic`.
    Raises InvalidRequest if none."""
    root = Path(images_dir)
    suffixes = photo_suffixes(heic)
    if not root.is_dir():
        raise InvalidRequest(f"{root} is not a folder", field="images")
    found = [
        (person.name, photo.name)
        for person in folder_entries(root)
        if person.is_dir() and not hidden(person.name)
        for photo in folder_entries(person)
        if photo.is_file() and not hidden(photo.name) and photo.suffix.lower() in suffixes
    ]
    if not found:
        raise InvalidRequest(f"{root} holds no photos in per-person folders (person/photo.jpg)", field="images")
    return [f"{person}/{name}" for person, name in sorted(found)]


@dataclass(frozen=True)
class IdentifyEvaluation:
    """The protocol's result on one folder. `report` has the rates; the rest says what went in."""

    report: IdentificationReport
    images_dir: str
    model_version: str
    n_people: int  # person folders with at least one photo
    n_photos: int
    missing_photos: dict[str, str]  # "person/file" -> error code (no_face, invalid_image, ...)
    fpir_interval: tuple[float, float]  # 95 % Clopper-Pearson interval of the default point's FPIR
    files: tuple[Path, ...] = ()  # the JSON and PNG, once written

    def to_dict(self) -> dict[str, Any]:
        return {
            "images_dir": self.images_dir,
            "model_version": self.model_version,
            "protocol": (
                "people sorted by name; even positions enrolled with their first photo (file names sorted), their "
                "other photos are probes; every photo of odd positions is a stranger; photos without a face are "
                "left out before the split"
            ),
            "n_people": self.n_people,
            "n_photos": self.n_photos,
            "n_missing": len(self.missing_photos),
            "missing_photos": dict(sorted(self.missing_photos.items())),
            "default_fpir_interval": list(self.fpir_interval),
            **self.report.to_dict(),
        }


def evaluate_embeddings(
    photos: list[str],
    embeddings: np.ndarray,
    *,
    settings: Settings,
    model: OpenSetModel | None = None,
    max_distance: float | None = None,
) -> IdentificationReport:
    """The protocol on already embedded photos ("person/file" each; rows without a face must be removed first)."""
    identities = [p.split("/", 1)[0] for p in photos]
    split = enrolment_split(identities, photos)
    if len(split.gallery_ids) < 2 or split.probe_rows.size == 0 or split.stranger_rows.size == 0:
        raise InvalidRequest(
            "the protocol needs at least 3 people with a face found, an enrolled person with a second photo and a "
            f"stranger; got {len(split.gallery_ids)} enrolled, {split.probe_rows.size} probes, "
            f"{split.stranger_rows.size} strangers",
            field="images",
        )
    return _evaluate_split(
        np.asarray(embeddings, np.float32), split, settings=settings, model=model, max_distance=max_distance
    )


def _evaluate_split(
    emb: np.ndarray, split: Split, *, settings: Settings, model: OpenSetModel | None, max_distance: float | None = None
) -> IdentificationReport:
    """The split's gallery, probes and strangers through `evaluate_identification` at the deployment settings (the
    shipped open-set calibration of its embedding variant unless `model` is given; `max_distance`, the 1:1
    threshold in force, else `settings.threshold`)."""
    if model is None:
        model = load_default_model(data_dir(settings.embedding.flip) / OPENSET_FILE)
    return evaluate_identification(
        emb[split.gallery_rows],
        split.gallery_ids,
        emb[split.probe_rows],
        split.probe_ids,
        emb[split.stranger_rows],
        model=model,
        target_fpir=settings.identify_fpir,
        max_distance=settings.threshold if max_distance is None else max_distance,
        ambiguity_margin=settings.ambiguity_margin,
    )


@dataclass(frozen=True)
class GalleryEvaluation:
    """The protocol run on a live gallery's stored embeddings (`POST /evaluate/identify`)."""

    report: IdentificationReport
    model_version: str
    n_identities: int  # identities with at least one face of the served model
    n_faces: int
    fpir_interval: tuple[float, float]  # 95 % Clopper-Pearson interval of the default point's FPIR


def evaluate_gallery(
    faces: EvaluationFaces,
    *,
    model_version: str,
    settings: Settings,
    model: OpenSetModel | None = None,
    max_distance: float | None = None,
) -> GalleryEvaluation:
    """Issue 9's protocol on the gallery's own faces, as `facegate eval-identify` runs it on a folder.

    Identities play the person folders (sorted by name, then id) and their faces, in enrolment order, the photos:
    identities at even positions keep their first face as the gallery and their other faces are probes; every face
    of the identities at odd positions is a stranger. Nothing is written. The default operating point is the rule
    calibrated for the evaluation's gallery (about half the identities), not for the whole live gallery, with
    `max_distance` the 1:1 threshold /identify uses (a stored deployment threshold or a head's; default
    `settings.threshold`).
    """
    keys = [(name, ident) for name, ident in zip(faces.names, faces.identity_ids, strict=True)]
    split = enrolment_split(keys, list(range(len(keys))))
    if len(split.gallery_ids) < 2 or split.probe_rows.size == 0 or split.stranger_rows.size == 0:
        raise InsufficientData(
            "evaluating identification needs at least 3 identities: 2 enrolled (at even positions in name order), "
            "one of them with a second face (a probe), and a stranger (at an odd position); this gallery gives "
            f"{len(split.gallery_ids)} enrolled, "
            f"{split.probe_rows.size} probes, {split.stranger_rows.size} strangers"
        )
    report = _evaluate_split(faces.embeddings, split, settings=settings, model=model, max_distance=max_distance)
    accepted = round(report.default_point["fpir"] * report.n_strangers)
    return GalleryEvaluation(
        report=report,
        model_version=model_version,
        n_identities=len(set(faces.identity_ids)),
        n_faces=len(faces.face_ids),
        fpir_interval=binomial_interval(accepted, report.n_strangers),
    )


def run_identify_eval(
    images_dir: Path,
    *,
    settings: Settings,
    out_dir: Path | None = None,
    cache: EmbeddingCache | Path | None = None,
    pipeline: Pipeline | None = None,
    model: OpenSetModel | None = None,
    progress: Callable[[int], None] | None = None,
    photos: list[str] | None = None,
    max_distance: float | None = None,
) -> IdentifyEvaluation:
    """Embed every photo of `images_dir` (folder per person), run issue 9's protocol, write the report if `out_dir`.

    cache: an `EmbeddingCache`, or the path of its .npz file (read if present, written back after embedding).
    pipeline: a pipeline to reuse (default: one built from `settings`). model: the open-set model (default: the
    shipped one). progress(n): called after each photo. photos: `person_photos(images_dir)` when the caller has
    listed them already (to size its progress bar): each folder is listed once. Raises InvalidRequest when the
    folder cannot give the protocol (no photos, fewer than 3 people with faces, no probe or no stranger).
    """
    if photos is None:
        heic = (pipeline.settings if pipeline is not None else settings).image.heic  # the pipeline's decoder's
        photos = person_photos(images_dir, heic=heic)
    pipe = pipeline if pipeline is not None else Pipeline.from_settings(settings)
    signature = pipeline_signature(pipe.model_version, pipe.settings.detector)
    store = EmbeddingCache.load(cache, signature) if isinstance(cache, Path) else cache
    try:
        embedded = embed_photos(pipe, Path(images_dir), photos, cache=store, progress=progress)
    finally:
        if isinstance(cache, Path) and store is not None:
            store.save(cache)
    found = [p for p in photos if not embedded[p].error]
    embeddings = np.stack([embedded[p].embedding for p in found]) if found else np.zeros((0, 128), np.float32)
    report = evaluate_embeddings(found, embeddings, settings=settings, model=model, max_distance=max_distance)
    n_strangers = report.n_strangers
    accepted = round(report.default_point["fpir"] * n_strangers)
    result = IdentifyEvaluation(
        report=report,
        images_dir=str(images_dir),
        model_version=pipe.model_version,
        n_people=len({p.split("/", 1)[0] for p in photos}),
        n_photos=len(photos),
        missing_photos={p: embedded[p].error for p in photos if embedded[p].error},
        fpir_interval=binomial_interval(accepted, n_strangers),
    )
    if out_dir is not None:
        result = replace(result, files=write_identify_report(result, out_dir))
    return result


def write_identify_report(
    result: IdentifyEvaluation, out_dir: Path, *, title: str | None = None
) -> tuple[Path, Path]:
    """`eval-identify.json` and `eval-identify.png` (DIR vs FPIR, one curve per rule) in `out_dir`."""
    from app.matching.report import plot_identification

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / REPORT_JSON
    json_path.write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False) + "\n")
    name = Path(result.images_dir).name or result.images_dir
    png_path = plot_identification(result.report, out / REPORT_PNG, title=title or f"facegate 1:N on {name}")
    return json_path, png_path


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f} %"


def format_identify_table(result: IdentifyEvaluation) -> str:
    """The table `facegate eval-identify` prints: DIR / FNIR at FPIR 1 %, 5 %, 10 % per rule, then the default."""
    r = result.report
    p = r.default_point
    lines = [
        f"people      {result.n_people}: {r.n_enrolled} enrolled with their first photo, the others strangers",
        f"photos      {result.n_photos}; {len(result.missing_photos)} without a face (left out)",
        f"probes      {r.n_probes} photos of enrolled people; strangers: {r.n_strangers} photos",
        f"rank-1      {_pct(r.rank1)} of probes have the right person nearest (the ceiling of DIR)",
        "",
        (
            "DIR / FNIR at FPIR (threshold set on these strangers; DIR = enrolled people named correctly, "
            "FNIR = 1 - DIR)"
        ),
    ]
    points = list(next(iter(r.dir_at_fpir.values())))
    header = ["rule"] + [f"FPIR {100 * float(f):g} %" for f in points]
    rows = [
        [RULE_LABELS.get(rule, rule)] + [f"{_pct(v)} / {_pct(1 - v)}" for v in table.values()]
        for rule, table in r.dir_at_fpir.items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    lo, hi = result.fpir_interval
    accepted = round(p["fpir"] * r.n_strangers)
    raw = r.raw_threshold_point
    lines += [
        "",
        (
            f"default     facegate rule, target FPIR {100 * p['target_fpir']:g} % for N = {p['gallery_size']} "
            f"(score <= {p['score_threshold']:.3f}, max distance {p['max_distance']:g}, ambiguity margin "
            f"{p['ambiguity_margin']:g}):"
        ),
        (
            f"            FPIR {_pct(p['fpir'], 2)} ({accepted}/{r.n_strangers}; 95 % CI {_pct(lo, 2)}-{_pct(hi, 2)}), "
            f"DIR {_pct(p['dir'])}, FNIR {_pct(p['fnir'])}"
        ),
        f"            probes: {_reasons(p['probe_reasons'])}; strangers: {_reasons(p['stranger_reasons'])}",
        (
            f"raw rule    nearest identity if distance <= {raw['threshold']:g}: FPIR {_pct(raw['fpir'])}, "
            f"DIR {_pct(raw['dir'])}"
        ),
    ]
    return "\n".join(lines)


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts.get(k, 0)} {k}" for k in ("accepted", "ambiguous", "unknown"))
