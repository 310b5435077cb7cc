"""`POST /cluster` and `facegate cluster DIR`: group the faces of a set of photos by person.

Every face of every photo (up to `detector.max_faces` per photo) is embedded (`Pipeline.photo_faces`), then
`app.matching.clustering.chinese_whispers` (dlib's algorithm) groups them over the graph "distance <= threshold". A
cluster is a group of at least 2 faces; a face that matches nobody else is UNCLUSTERED (a singleton). Photos that
cannot be used (not an image, no face) are listed with the error code, not dropped silently, and so are photos
whose faces were capped (too_many_faces).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.errors import FacegateError
from app.matching.clustering import chinese_whispers
from app.vision.pipeline import Loader, Pipeline, PixelBudget, no_face
from app.vision.types import EMBEDDING_DIM, Box, Face

__all__ = ["ClusterMember", "ClusterReport", "PhotoProblem", "cluster_faces", "cluster_files", "cluster_photos"]


@dataclass(frozen=True, slots=True)
class ClusterMember:
    photo: str  # the name the photo was given (upload file name, or path relative to the folder)
    photo_index: int  # position of the photo in the input
    box: Box
    score: float


@dataclass(frozen=True, slots=True)
class PhotoProblem:
    photo: str
    photo_index: int
    code: str  # no_face, invalid_image, image_too_large, ...
    message: str


@dataclass(frozen=True)
class ClusterReport:
    threshold: float
    clusters: tuple[tuple[ClusterMember, ...], ...]  # largest first
    unclustered: tuple[ClusterMember, ...]  # faces that match no other face
    problems: tuple[PhotoProblem, ...]  # photos that gave no face
    n_photos: int

    @property
    def n_faces(self) -> int:
        return sum(len(c) for c in self.clusters) + len(self.unclustered)

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.clusters]


def cluster_faces(
    faces: list[tuple[int, str, Face]],
    threshold: float,
    *,
    n_photos: int,
    problems: Iterable[PhotoProblem] = (),
    max_links: int | None = None,
) -> ClusterReport:
    """Cluster already-found faces: (photo index, photo name, face) each. `max_links`: see `neighbour_lists`."""
    embeddings = (
        np.stack([f.embedding for _, _, f in faces]).astype(np.float32)
        if faces
        else np.zeros((0, EMBEDDING_DIM), np.float32)
    )
    result = chinese_whispers(embeddings, threshold, max_links=max_links)
    members = [ClusterMember(name, index, f.box, float(f.score)) for index, name, f in faces]
    clusters = tuple(
        tuple(m for m, label in zip(members, result.labels.tolist(), strict=True) if label == c)
        for c in range(result.n_clusters)
    )
    unclustered = tuple(m for m, label in zip(members, result.labels.tolist(), strict=True) if label == -1)
    return ClusterReport(float(threshold), clusters, unclustered, tuple(problems), n_photos)


def _collect(
    pipeline: Pipeline,
    named: Iterable[tuple[str, Loader]],
    progress: Callable[[int], None] | None,
) -> tuple[list[tuple[int, str, Face]], list[PhotoProblem], int]:
    faces: list[tuple[int, str, Face]] = []
    problems: list[PhotoProblem] = []
    n = 0
    for index, (name, load) in enumerate(named):
        n += 1
        try:
            found = pipeline.photo_faces(load)  # decoded under the pipeline's full-size limit
            if not found.faces:
                missing = no_face(found.min_face_px)  # the message /identify refuses it with, naming the reach
                problems.append(PhotoProblem(name, index, missing.code, missing.message))
            elif found.capped:
                problems.append(
                    PhotoProblem(
                        name,
                        index,
                        "too_many_faces",
                        f"{found.detected} faces were found; the {len(found.faces)} most confident were clustered "
                        "(FACEGATE_DETECTOR__MAX_FACES)",
                    )
                )
            faces.extend((index, name, f) for f in found.faces)
        except FacegateError as error:
            problems.append(PhotoProblem(name, index, error.code, error.message))
        except OSError as error:
            problems.append(PhotoProblem(name, index, "unreadable", f"cannot read the file: {error.strerror}"))
        if progress is not None:
            progress(1)
    return faces, problems, n


def cluster_photos(
    pipeline: Pipeline,
    photos: Iterable[tuple[str, bytes]],
    threshold: float,
    *,
    max_links: int | None = None,
    budget: PixelBudget | None = None,
) -> ClusterReport:
    """Uploaded photos (name, bytes) -> every face -> clusters; with a `budget` of pixels for them all."""
    named = [(name, pipeline.decoder(data, budget)) for name, data in photos]
    faces, problems, n = _collect(pipeline, named, None)
    return cluster_faces(faces, threshold, n_photos=n, problems=problems, max_links=max_links)


def cluster_files(
    pipeline: Pipeline,
    root: Path,
    files: Iterable[Path],
    threshold: float,
    *,
    progress: Callable[[int], None] | None = None,
) -> ClusterReport:
    """Photo files (named by their path relative to `root`) -> every face -> clusters."""
    named = [(str(f.relative_to(root)), pipeline.file_loader(f)) for f in files]
    faces, problems, n = _collect(pipeline, named, progress)
    return cluster_faces(faces, threshold, n_photos=n, problems=problems)
