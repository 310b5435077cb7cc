"""`facegate reindex`: recompute the served embeddings of every enrolled face for the model version now served
(the embedder's, or embedder + a trained head), from the stored base embeddings: no photo is needed.

Which base embedding a face has: its `base_embedding` column (written at enrolment since migration 0003), else its
`embedding` when it was made by the bare embedder (`model_version` == the base version). Either is used only when
the face was made by the same base as the target's: its version is the base version, or the base version plus a
head's (`<name>-<12 hex>`). A face of another base (the embedder applied otherwise, e.g. with or without mirror
averaging, "+flip") has base numbers on another scale, and relabelling them would silently mix scales. Such a face,
or one with no base embedding at all (made by a head before 0003), is recomputed from its stored photo when the
caller gives `photo_base` and the photo was kept (FACEGATE_STORE_IMAGES); otherwise it is counted as `skipped` and
stays stale (enrol it again).

Photos are embedded before the write lock is taken (it can take minutes: ~60 ms a face on 2 cores); the face in the
photo is the detection that overlaps the stored box best (IoU >= 0.5).

Everything happens in ONE transaction under the gallery's write lock (enrolments wait, searches go on): the
embeddings and model versions change together, and for each face the change log gets a 'remove' then an 'add', so
every worker's index replays them, dropping the old vector and taking the new one; no identity is ever missing from
a worker whose model version matches. A failure rolls everything back, and running it again is always safe: only
faces not already at the target version are touched (a second run reports 0 updated).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from app.gallery import Gallery, db
from app.gallery.store import ChangeOp, decode_embeddings, lock_gallery
from app.gallery.tables import GALLERY_STATE_ID, Face, GalleryChange, GalleryState, utcnow
from app.vision.types import EMBEDDING_DIM, Box

__all__ = ["PhotoBase", "ReindexReport", "reindex", "same_base"]

Transform = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]
# The base embedding of the face at this box of this photo (the bytes as uploaded), None when it cannot be found.
PhotoBase = Callable[[bytes, Box], npt.NDArray[np.float32] | None]
_HEAD_VERSION = re.compile(r"[^+]+-[0-9a-f]{12}")  # app/training/export.py: f"{name}-{sha256[:12]}"


def same_base(model_version: str, base_version: str) -> bool:
    """Whether a face of `model_version` was made by the embedder as `base_version` applies it (with or without a
    head): only then are its base numbers those the target expects."""
    if model_version == base_version:
        return True
    head = model_version.removeprefix(base_version + "+")
    return head != model_version and _HEAD_VERSION.fullmatch(head) is not None


def _of_bases(model_version: str, bases: tuple[str, ...]) -> bool:
    return any(same_base(model_version, base) for base in bases)


@dataclass(frozen=True)
class ReindexReport:
    target_version: str
    updated: int  # faces whose embedding and model version were rewritten
    already_current: int  # faces already at the target version
    skipped: int  # faces without a usable base embedding or photo (left stale)
    from_versions: dict[str, int]  # model version -> faces updated from it
    from_photos: int = 0  # of `updated`, faces embedded again from their stored photo


def reindex(
    gallery: Gallery,
    *,
    target_version: str,
    base_version: str,
    transform: Transform | None,
    photo_base: PhotoBase | None = None,
    earlier_bases: Sequence[str] = (),
    chunk: int = 1024,
) -> ReindexReport:
    """Rewrite every face not at `target_version`: embedding = transform(base) (None: the base itself), the base
    from the face's stored base embedding, or from its stored photo through `photo_base` (module docstring).
    `earlier_bases`: earlier builds' names of `base_version` (the same numbers, `ModelManifest.earlier_versions`):
    their faces are served from their stored numbers as the base's own are."""
    bases = (base_version, *earlier_bases)
    photo_bases = _bases_from_photos(gallery, target_version, bases, photo_base) if photo_base else {}
    with gallery.session() as session:
        report = _reindex(
            session,
            target_version=target_version,
            bases=bases,
            transform=transform,
            photo_bases=photo_bases,
            chunk=chunk,
        )
    # This process's index skips re-adding faces it has itself just removed (its guard against stale replays), so
    # it is rebuilt from the database; other workers replay the change log.
    gallery.load()
    return report


def _bases_from_photos(
    gallery: Gallery, target_version: str, bases: tuple[str, ...], photo_base: PhotoBase
) -> dict[str, bytes]:
    """Face id -> base embedding (bytes) from the stored photo, for faces the stored numbers cannot serve."""
    with gallery.session() as session:
        db.without_statement_timeout(session.connection())  # a scan of every face (module docstring)
        rows = session.execute(
            select(
                Face.id,
                Face.model_version,
                Face.base_embedding.is_(None).label("no_base"),
                Face.box_left,
                Face.box_top,
                Face.box_right,
                Face.box_bottom,
            )
            .where(Face.model_version != target_version, Face.image.is_not(None))
            .order_by(Face.id)
        ).all()
        # the faces `_reindex` could not serve from stored numbers: another base, or a head's face without its base
        needed = [
            r
            for r in rows
            if not _of_bases(r.model_version, bases) or (r.no_base and r.model_version not in bases)
        ]
        out: dict[str, bytes] = {}
        for r in needed:  # one photo in memory at a time
            photo = session.execute(select(Face.image).where(Face.id == r.id)).scalar_one_or_none()
            if photo is None:
                continue
            base = photo_base(photo, Box(r.box_left, r.box_top, r.box_right, r.box_bottom))
            if base is not None:
                out[r.id] = np.asarray(base, dtype="<f4").reshape(EMBEDDING_DIM).tobytes()
    return out


def _reindex(
    session: Session,
    *,
    target_version: str,
    bases: tuple[str, ...],
    transform: Transform | None,
    photo_bases: dict[str, bytes],
    chunk: int,
) -> ReindexReport:
    lock_gallery(session)
    db.without_statement_timeout(session.connection())  # every face read and rewritten: minutes at 1M faces
    rows = session.execute(
        select(Face.id, Face.identity_id, Face.model_version, Face.embedding, Face.base_embedding).order_by(Face.id)
    ).all()
    current = sum(1 for r in rows if r.model_version == target_version)
    todo = []
    skipped = from_photos = 0
    for r in rows:
        if r.model_version == target_version:
            continue
        blob = None
        if _of_bases(r.model_version, bases):
            blob = r.base_embedding if r.base_embedding is not None else (
                r.embedding if r.model_version in bases else None
            )
        if blob is None and r.id in photo_bases:
            blob = photo_bases[r.id]
            from_photos += 1
        if blob is None:
            skipped += 1
            continue
        todo.append((r.id, r.identity_id, r.model_version, blob))
    from_versions: dict[str, int] = {}
    for _, _, version, _ in todo:
        from_versions[version] = from_versions.get(version, 0) + 1
    if not todo:
        return ReindexReport(target_version, 0, current, skipped, from_versions, from_photos)
    now = utcnow()
    count = len(todo)
    # Change ids for every face's 'remove' then 'add', reserved in one statement (gap-free, as bulk_enrol does).
    last = session.execute(
        update(GalleryState)
        .where(GalleryState.id == GALLERY_STATE_ID)
        .values(last_change_id=GalleryState.last_change_id + 2 * count)
        .returning(GalleryState.last_change_id)
    ).scalar_one()
    first = int(last) - 2 * count + 1
    for start in range(0, count, chunk):
        part = todo[start : start + chunk]
        base_vectors = decode_embeddings([blob for *_, blob in part])
        served = base_vectors if transform is None else np.asarray(transform(base_vectors), np.float32)
        if served.shape != (len(part), EMBEDDING_DIM) or not np.all(np.isfinite(served)):
            raise ValueError("the head gave embeddings of the wrong shape or non-finite values")
        # One executemany per chunk (an UPDATE by primary key per row; psycopg pipelines them): a statement per face
        # took 118 s at 60k faces on PostgreSQL, with every writer refused meanwhile.
        session.execute(
            update(Face),
            [
                {
                    "id": face_id,
                    "embedding": vector.astype("<f4").tobytes(),
                    "base_embedding": base.astype("<f4").tobytes(),
                    "model_version": target_version,
                }
                for (face_id, *_), base, vector in zip(part, base_vectors, served, strict=True)
            ],
        )
    for offset, op in ((0, ChangeOp.REMOVE), (count, ChangeOp.ADD)):
        for start in range(0, count, chunk):
            session.execute(
                insert(GalleryChange),
                [
                    {"id": first + offset + k, "op": op.value, "face_id": f, "identity_id": i, "created_at": now}
                    for k, (f, i, _, _) in enumerate(todo[start : start + chunk], start=start)
                ],
            )
    return ReindexReport(target_version, count, current, skipped, from_versions, from_photos)
