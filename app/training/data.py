"""Training data for a head: base embeddings (dlib's 128-d, no head) of labelled photos, never the photos.

A folder with one sub-folder per person is embedded once (`embed_folder`, the largest face of each photo, through
`app.evaluate.embed_photos` and its `EmbeddingCache`, so a second run reads the .npz instead of running the
networks); training then runs on the (n, 128) matrix in seconds. Photos without a usable face are left out and
counted. `split_identities` makes an identity-disjoint train/validation split (no person on both sides, so the
validation figures are about people the head never saw).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from app.config import HeadSettings
from app.errors import InvalidRequest
from app.evaluate import EmbeddingCache, embed_photos, pipeline_signature
from app.identify_eval import folder_entries, hidden, photo_suffixes
from app.vision.pipeline import Pipeline

__all__ = ["EmbeddingSet", "base_pipeline", "embed_folder", "folder_photos", "pair_indices", "split_identities"]



@dataclass(frozen=True)
class EmbeddingSet:
    """Labelled base embeddings: row i is photo `paths[i]` of identity `names[labels[i]]`."""

    embeddings: npt.NDArray[np.float32]  # (n, 128)
    labels: npt.NDArray[np.int64]  # (n,), 0..len(names)-1
    names: tuple[str, ...]
    paths: tuple[str, ...] = ()
    missing: int = 0  # photos without a usable face, left out

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.labels):
            raise ValueError("embeddings must be (n, d) with one label per row")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_identities(self) -> int:
        return len(np.unique(self.labels))

    def subset(self, identities: Sequence[int]) -> EmbeddingSet:
        """The rows of the given identities (labels renumbered 0..len-1, names kept in that order)."""
        chosen = list(identities)
        remap = {old: new for new, old in enumerate(chosen)}
        rows = np.flatnonzero(np.isin(self.labels, chosen))
        return EmbeddingSet(
            self.embeddings[rows],
            np.array([remap[int(v)] for v in self.labels[rows]], np.int64),
            tuple(self.names[i] for i in chosen),
            tuple(self.paths[i] for i in rows) if self.paths else (),
        )

    @classmethod
    def from_mapping(cls, embeddings: Mapping[str, npt.ArrayLike], *, identity_of: Callable[[str], str]) -> EmbeddingSet:
        """From {photo path: embedding} (NaN rows = no face, left out), the identity read from each path."""
        paths = sorted(embeddings)
        found = [p for p in paths if np.all(np.isfinite(np.asarray(embeddings[p], np.float64)))]
        names = sorted({identity_of(p) for p in found})
        index = {n: i for i, n in enumerate(names)}
        matrix = (
            np.stack([np.asarray(embeddings[p], np.float32) for p in found])
            if found
            else np.zeros((0, 128), np.float32)
        )
        labels = np.array([index[identity_of(p)] for p in found], np.int64)
        return cls(matrix, labels, tuple(names), tuple(found), missing=len(paths) - len(found))


def folder_photos(images: Path, *, heic: bool = False) -> list[str]:
    """Photo paths (relative, sorted) in a folder with one sub-folder per person, the person's own sub-folders
    included; HEIC/HEIF files too with `heic` (FACEGATE_IMAGE__HEIC). A folder that cannot be listed is refused."""
    root = Path(images)
    suffixes = photo_suffixes(heic)
    if not root.is_dir():
        raise InvalidRequest(f"{images} is not a folder", field="images")
    photos = []
    for person in folder_entries(root):
        if person.is_dir() and not hidden(person.name):
            found = (p for p in _files_under(person) if p.suffix.lower() in suffixes)
            photos += [str(p.relative_to(root)) for p in found]
    photos.sort()
    if not photos:
        raise InvalidRequest(f"{images} has no photos in per-person sub-folders", field="images")
    return photos


def _files_under(folder: Path) -> list[Path]:
    """The files in `folder` and its sub-folders, each folder listed once by `folder_entries`, so that one that
    cannot be listed is refused as a person's folder is (rglob left its photos out without a word). Linked
    sub-folders are not followed, as rglob did not follow them: a link back up would never end."""
    files, pending = [], [folder]
    while pending:
        for entry in folder_entries(pending.pop()):
            if hidden(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                pending.append(entry)
            elif entry.is_file():
                files.append(entry)
    return files


def _person(relative: str) -> str:
    return Path(relative).parts[0]


def base_pipeline(settings_pipeline: Pipeline) -> Pipeline:
    """A pipeline with the same models and settings but no head: training always starts from base embeddings."""
    if settings_pipeline.head is None:
        return settings_pipeline
    return Pipeline(settings_pipeline.settings.model_copy(update={"head": HeadSettings()}), settings_pipeline.manifest)


def embed_folder(
    pipeline: Pipeline,
    images: Path,
    *,
    photos: Sequence[str] | None = None,
    cache_path: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> EmbeddingSet:
    """Base embeddings of every photo under `images` (one sub-folder per person), cached in `cache_path`. `photos`:
    `folder_photos(images)` when the caller has listed them already (to size its progress bar): listed once."""
    pipeline = base_pipeline(pipeline)
    if photos is None:
        photos = folder_photos(images, heic=pipeline.settings.image.heic)
    cache = None
    if cache_path is not None:
        cache = EmbeddingCache.load(cache_path, pipeline_signature(pipeline.model_version, pipeline.settings.detector))
    try:
        embedded = embed_photos(pipeline, Path(images), photos, cache=cache, progress=progress)
    finally:  # an interrupted run (Ctrl-C) keeps what it embedded, as `facegate eval` does
        if cache is not None and cache_path is not None:
            cache.save(cache_path)
    return EmbeddingSet.from_mapping({p: e.embedding for p, e in embedded.items()}, identity_of=_person)


def split_identities(data: EmbeddingSet, *, val_fraction: float, seed: int = 0) -> tuple[EmbeddingSet, EmbeddingSet]:
    """Identity-disjoint (train, validation) split: a seeded `val_fraction` of the identities with >= 2 faces go to
    validation (at least 2 of them); every other identity trains."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be between 0 and 1")
    counts = np.bincount(data.labels, minlength=len(data.names))
    eligible = np.flatnonzero(counts >= 2)
    n_val = max(2, round(val_fraction * len(eligible)))
    if len(eligible) - n_val < 2:
        raise InvalidRequest(
            f"{len(eligible)} identities with 2 or more faces: too few for a train/validation split", field="images"
        )
    rng = np.random.default_rng(seed)
    val = sorted(rng.choice(eligible, size=n_val, replace=False).tolist())
    train = [i for i in range(len(data.names)) if i not in set(val) and counts[i] > 0]
    return data.subset(train), data.subset(val)


def pair_indices(
    labels: npt.ArrayLike, *, max_different: int = 200_000, seed: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Every same-identity pair (i < j) and every different pair, or a seeded sample of `max_different` of them:
    (i, j, same) for verification figures."""
    y = np.asarray(labels, np.int64)
    i, j = np.triu_indices(len(y), k=1)
    same = y[i] == y[j]
    diff_rows = np.flatnonzero(~same)
    if len(diff_rows) > max_different:
        diff_rows = np.sort(np.random.default_rng(seed).choice(diff_rows, size=max_different, replace=False))
    rows = np.concatenate([np.flatnonzero(same), diff_rows])
    return i[rows].astype(np.int64), j[rows].astype(np.int64), same[rows]
