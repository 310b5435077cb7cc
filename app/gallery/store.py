"""Gallery storage: keyword-only functions over a caller's `Session`. They never commit: the caller owns the
transaction (`Gallery.session()` or `with sessionmaker.begin() as session`), so an enrolment (identity + face +
change-log row) is all or nothing.

Every function that changes faces first takes the gallery's write lock (the `gallery_state` row), before it
reads or touches anything else: writers queue there instead of deadlocking, SQLite takes its write lock before
its first read (no stale snapshot), and change ids are handed out gap-free in commit order.

Functions return plain frozen dataclasses, never ORM objects. Ids are uuid4 hex strings; a string that is not
one is treated as unknown (it is never sent to the database).
"""

from __future__ import annotations

import json
import re
import unicodedata
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from sqlalchemy import Row, delete, func, insert, literal, select, text, tuple_, update
from sqlalchemy.orm import Session

from app.errors import UnknownFace, UnknownIdentity
from app.gallery import db
from app.gallery.tables import (
    EMBEDDING_BYTES,
    GALLERY_STATE_ID,
    MAX_MODEL_VERSION_LENGTH,
    MAX_NAME_LENGTH,
    DeploymentSetting,
    Face,
    GalleryChange,
    GalleryState,
    Identity,
    utcnow,
)
from app.vision.types import EMBEDDING_DIM, Box

_ID_RE = re.compile(r"[0-9a-f]{32}")
_PENDING_KEY = "facegate.gallery.pending_changes"
MAX_METADATA_BYTES = 64 * 1024
# Levels of objects and arrays in metadata, the metadata object itself being the first. Far below what the JSON
# parsers and pydantic's serializer handle (about 255 levels; deeper metadata was stored, then every read of the
# identity failed), and far more than any real record needs.
MAX_METADATA_DEPTH = 32


class ChangeOp(StrEnum):
    ADD = "add"
    REMOVE = "remove"


@dataclass(frozen=True, slots=True)
class FaceRecord:
    id: str
    identity_id: str
    model_version: str
    box: Box
    detector_score: float
    created_at: datetime
    has_image: bool


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    id: str
    name: str
    metadata: dict[str, Any]  # a copy: changing it changes nothing stored
    created_at: datetime
    updated_at: datetime
    faces: tuple[FaceRecord, ...]  # oldest first

    @property
    def face_count(self) -> int:
        return len(self.faces)


@dataclass(frozen=True, slots=True)
class DeletionReport:
    """What a deletion removed: the faces (their embeddings and photos) and, if `identity_deleted`, the identity."""

    identity_id: str
    face_ids: tuple[str, ...]
    identity_deleted: bool


@dataclass(frozen=True, slots=True)
class Change:
    """One change-log entry as the in-memory index applies it. `embedding`/`model_version` only for adds whose
    face still exists (None: the face was removed since, and a later 'remove' follows)."""

    id: int
    op: ChangeOp
    face_id: str
    identity_id: str
    embedding: npt.NDArray[np.float32] | None = None
    model_version: str | None = None


@dataclass(frozen=True, slots=True)
class DeploymentSettingRecord:
    key: str
    value: Any
    source: str | None
    updated_at: datetime


# ---------------------------------------------------------------------------------------------- identities


def new_id() -> str:
    return uuid.uuid4().hex


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def name_key(text: str) -> str:
    """A name (or a name filter) as the name filter compares it: NFKC case folding, Unicode's caseless match
    (`ÉLODIE` = `élodie`, `Straße` = `STRASSE`, `Ｋａｔｅ` = `kate`). Done here, not by the database: SQLite's
    lower() knows only ASCII and PostgreSQL's depends on the server's locale. Stored in `identities.name_key`:
    changing this function needs a migration that recomputes the column (see 0004)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def create_identity(session: Session, *, name: str, metadata: dict[str, Any] | None = None) -> IdentityRecord:
    """Insert a new identity (no faces yet). `name`: 1-255 characters, no NUL; `metadata`: a JSON object (see
    `check_metadata`)."""
    _check_name(name)
    meta = check_metadata(metadata)
    now = utcnow()
    identity_id = new_id()
    session.execute(
        insert(Identity).values(
            id=identity_id, name=name, name_key=name_key(name), meta=meta, created_at=now, updated_at=now
        )
    )
    return IdentityRecord(identity_id, name, dict(meta), now, now, ())


def get_identity(session: Session, *, identity_id: str) -> IdentityRecord:
    """The identity with its faces (oldest first). Raises UnknownIdentity."""
    row = _identity_row(session, identity_id)
    faces = _faces_of(session, [row.id])
    return _identity_record(row, tuple(faces.get(row.id, ())))


def identity_names(session: Session, *, identity_ids: Iterable[str]) -> dict[str, str]:
    """Names of the given identities in one query; ids that are malformed or gone are simply absent."""
    wanted = [i for i in set(identity_ids) if is_valid_id(i)]
    if not wanted:
        return {}
    rows = session.execute(select(Identity.id, Identity.name).where(Identity.id.in_(wanted))).all()
    return {identity_id: name for identity_id, name in rows}


def identities_named(session: Session, *, name: str) -> dict[str, str]:
    """Id -> name (oldest first) of the identities whose name folds to the same `name_key` as `name` (case and
    Unicode form aside: the caller compares exactly). One equality test per row: no counting or paging, unlike a
    listing's substring filter, which a one-letter name made scan and count every identity, page after page."""
    query = select(Identity.id, Identity.name).where(Identity.name_key == name_key(name))
    rows = session.execute(query.order_by(Identity.created_at, Identity.id)).all()  # oldest first, as listed
    return {identity_id: found for identity_id, found in rows}


def identity_exists(session: Session, *, identity_id: str) -> bool:
    if not is_valid_id(identity_id):
        return False
    return session.execute(select(Identity.id).where(Identity.id == identity_id)).first() is not None


@dataclass(frozen=True, slots=True)
class PageKey:
    """Where a page of the identity listing ended: the sort key (created_at, id) of its last identity. The next
    page starts after it, whatever was added or deleted meanwhile (an offset would shift by as many rows)."""

    created_at: datetime
    identity_id: str

    def token(self) -> str:
        """The cursor clients send back: microseconds since 1970 (UTC) and the id, `<micros>_<id>`."""
        return f"{(self.created_at - _EPOCH) // timedelta(microseconds=1)}_{self.identity_id}"

    @classmethod
    def parse(cls, token: str) -> PageKey:
        """Raises ValueError for anything `token()` does not write."""
        match = _PAGE_TOKEN_RE.fullmatch(token)
        if match is None:
            raise ValueError("not a listing cursor (the `next` of a previous page)")
        try:
            created_at = _EPOCH + timedelta(microseconds=int(match[1]))
        except OverflowError:
            raise ValueError("not a listing cursor (the `next` of a previous page)") from None
        return cls(created_at, match[2])


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PAGE_TOKEN_RE = re.compile(r"([0-9]{1,18})_([0-9a-f]{32})")  # not \d: it takes any script's digits, as int() does


class IdentityListing(NamedTuple):
    items: list[IdentityRecord]
    total: int  # every identity matching the filter, not only those after the cursor
    next: PageKey | None  # where the following page starts; None when this page is the last
    start: int = 0  # identities matching the filter before the page's first (its offset, with a cursor counted)


def list_identities(
    session: Session,
    *,
    offset: int = 0,
    limit: int = 100,
    name_contains: str | None = None,
    after: PageKey | None = None,
) -> IdentityListing:
    """One page of identities (oldest first, then by id) and the total count matching the filter.

    `name_contains`: a substring of the name, compared after `name_key` on both sides (case-insensitive for every
    script, the same on SQLite and PostgreSQL; `%`, `_` and `\\` match themselves). `after`: the page starts after
    this key (then `offset` counts from there); read from the (created_at, id) index, so a page deep in a large
    gallery costs what the first one does, where an offset walks past every row before it.
    """
    if offset < 0 or limit < 0:
        raise ValueError("offset and limit must be >= 0")
    if name_contains is not None and _bad_text(name_contains):
        return IdentityListing([], 0, None)  # no stored name can contain it
    condition = Identity.name_key.contains(name_key(name_contains), autoescape=True) if name_contains else None
    page_key = None
    if after is not None:
        page_key = tuple_(Identity.created_at, Identity.id) > tuple_(
            literal(after.created_at, Identity.created_at.type), literal(after.identity_id, Identity.id.type)
        )
    # Every match, and those before the cursor (where the page starts, for "41-60 of 300": counted now, so people
    # deleted before the cursor since an earlier page are not), in one pass over the matches.
    before = func.count().filter(~page_key) if page_key is not None else literal(0)
    counts = select(func.count().label("total"), before.label("before")).select_from(Identity)
    if condition is not None:
        counts = counts.where(condition)
    counted = counts.cte("counts")
    # The counts are in the page's own statement (same snapshot): an identity committed by another request
    # between two statements would otherwise be on the page and not in the total, or the other way round.
    page_query = (
        select(
            *_IDENTITY_COLUMNS,
            select(counted.c.total).scalar_subquery().label("total"),
            select(counted.c.before).scalar_subquery().label("before"),
        )
        .order_by(Identity.created_at, Identity.id)
        .offset(offset)
        .limit(limit + 1)  # one more: whether a next page exists
    )
    if condition is not None:
        page_query = page_query.where(condition)
    if page_key is not None:
        page_query = page_query.where(page_key)
    rows = session.execute(page_query).all()
    total, before_page = (rows[0].total, rows[0].before) if rows else session.execute(counts).one()
    more = len(rows) > limit
    rows = rows[:limit]
    faces = _faces_of(session, [row.id for row in rows])
    records = [_identity_record(row, tuple(faces.get(row.id, ()))) for row in rows]
    last = records[-1] if records else None
    next_key = PageKey(last.created_at, last.id) if more and last else None
    return IdentityListing(records, int(total), next_key, min(int(before_page) + offset, int(total)))


def update_identity(
    session: Session, *, identity_id: str, name: str | None = None, metadata: dict[str, Any] | None = None
) -> IdentityRecord:
    """Change the name and/or replace the metadata (None: keep). Raises UnknownIdentity."""
    if not is_valid_id(identity_id):
        raise UnknownIdentity(f"unknown identity {identity_id!r}", identity_id=identity_id)
    values: dict[str, Any] = {"updated_at": utcnow()}
    if name is not None:
        _check_name(name)
        values["name"] = name
        values["name_key"] = name_key(name)
    if metadata is not None:
        values["meta"] = check_metadata(metadata)
    lock_gallery(session)
    result = session.execute(update(Identity).where(Identity.id == identity_id).values(**values))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise UnknownIdentity(f"unknown identity {identity_id!r}", identity_id=identity_id)
    return get_identity(session, identity_id=identity_id)


def delete_identity(session: Session, *, identity_id: str) -> DeletionReport:
    """Delete the identity and all its faces (rows really deleted) and log a 'remove' per face. Raises UnknownIdentity."""
    if not is_valid_id(identity_id):
        raise UnknownIdentity(f"unknown identity {identity_id!r}", identity_id=identity_id)
    lock_gallery(session)
    face_ids = tuple(
        session.execute(
            select(Face.id).where(Face.identity_id == identity_id).order_by(Face.created_at, Face.id)
        ).scalars()
    )
    session.execute(delete(Face).where(Face.identity_id == identity_id))
    result = session.execute(delete(Identity).where(Identity.id == identity_id))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise UnknownIdentity(f"unknown identity {identity_id!r}", identity_id=identity_id)
    for face_id in face_ids:
        _log_change(session, ChangeOp.REMOVE, face_id=face_id, identity_id=identity_id)
    _forget_vectors(session, face_ids)
    return DeletionReport(identity_id, face_ids, identity_deleted=True)


def _forget_vectors(session: Session, face_ids: Sequence[str]) -> None:
    """PostgreSQL: delete the faces' rows of pgvector's `face_vectors` (app/gallery/pgvector.py) in the deletion's
    own transaction, whatever backend this process runs (a deletion made while no pgvector worker ran must not leave
    the embeddings there for good).

    First under a share lock of `face_vectors_state`'s row, which a worker's replay holds for one chunk of changes
    and a full copy for its swap: a face whose add is being replayed right now, uncommitted, would otherwise be
    inserted after this DELETE ran and stay until the next replay. Waiting for one chunk (seconds) has no timeout,
    as the replay has none. A worker's replay of the change log still applies the removal (to the new table during
    a full copy)."""
    connection = session.connection()
    if not face_ids or connection.dialect.name != "postgresql":
        return
    if connection.execute(text("SELECT to_regclass('face_vectors_state')")).scalar() is not None:
        db.without_timeouts(connection)  # the end of the deletion's transaction: nothing else is left to wait for
        connection.execute(text("SELECT 1 FROM face_vectors_state WHERE id = 1 FOR SHARE"))
    if connection.execute(text("SELECT to_regclass('face_vectors')")).scalar() is None:
        return
    connection.execute(text("DELETE FROM face_vectors WHERE face_id = ANY(:ids)"), {"ids": list(face_ids)})


# ---------------------------------------------------------------------------------------------------- faces


def add_face(
    session: Session,
    *,
    identity_id: str,
    embedding: npt.ArrayLike,
    model_version: str,
    box: Box,
    score: float,
    image: bytes | None = None,
    base_embedding: npt.ArrayLike | None = None,
) -> FaceRecord:
    """Store one face of an existing identity and log an 'add' change. Raises UnknownIdentity.

    `base_embedding`: the embedder's own output when `embedding` is a head's (kept for `facegate reindex`).

    `embedding`: 128 finite values, stored as float32. `image`: the photo's bytes, only when the deployment keeps
    photos (`store_images`); otherwise None.
    """
    vector = _check_embedding(embedding)
    base = None if base_embedding is None else _check_embedding(base_embedding).astype("<f4").tobytes()
    if not model_version or len(model_version) > MAX_MODEL_VERSION_LENGTH:
        raise ValueError(f"model_version must be 1-{MAX_MODEL_VERSION_LENGTH} characters")
    if not is_valid_id(identity_id):
        raise UnknownIdentity(f"unknown identity {identity_id!r}", identity_id=identity_id)
    lock_gallery(session)
    if not identity_exists(session, identity_id=identity_id):
        raise UnknownIdentity(f"unknown identity {identity_id!r}", identity_id=identity_id)
    face_id = new_id()
    now = utcnow()
    session.execute(
        insert(Face).values(
            id=face_id,
            identity_id=identity_id,
            embedding=vector.astype("<f4").tobytes(),
            base_embedding=base,
            model_version=model_version,
            box_left=int(box.left),
            box_top=int(box.top),
            box_right=int(box.right),
            box_bottom=int(box.bottom),
            detector_score=float(score),
            created_at=now,
            image=image,
        )
    )
    session.execute(update(Identity).where(Identity.id == identity_id).values(updated_at=now))
    _log_change(
        session, ChangeOp.ADD, face_id=face_id, identity_id=identity_id, embedding=vector, model_version=model_version
    )
    return FaceRecord(
        face_id,
        identity_id,
        model_version,
        Box(box.left, box.top, box.right, box.bottom),
        float(score),
        now,
        image is not None,
    )


def bulk_enrol(
    session: Session,
    *,
    names: Sequence[str],
    embeddings: npt.ArrayLike,
    model_version: str,
    boxes: Sequence[Box] | None = None,
    scores: Sequence[float] | None = None,
) -> list[FaceRecord]:
    """Many new identities with one face each, in a few statements (seeding a large gallery, benchmarks): the
    same rows and change-log entries as `create_identity` + `add_face` per name. `boxes`/`scores` default to an
    empty box and 0."""
    vectors = np.asarray(embeddings, dtype=np.float32)
    count = len(names)
    if vectors.shape != (count, EMBEDDING_DIM):
        raise ValueError(f"embeddings must have shape ({count}, {EMBEDDING_DIM}), got {vectors.shape}")
    if not np.all(np.isfinite(vectors)):
        raise ValueError("embeddings have non-finite values")
    if not model_version or len(model_version) > MAX_MODEL_VERSION_LENGTH:
        raise ValueError(f"model_version must be 1-{MAX_MODEL_VERSION_LENGTH} characters")
    boxes = list(boxes) if boxes is not None else [Box(0, 0, -1, -1)] * count
    scores = [float(v) for v in scores] if scores is not None else [0.0] * count
    if len(boxes) != count or len(scores) != count:
        raise ValueError("names, embeddings, boxes and scores must have the same length")
    for name in names:
        _check_name(name)
    if count == 0:
        return []
    now = utcnow()
    identity_ids = [new_id() for _ in range(count)]
    face_ids = [new_id() for _ in range(count)]
    lock_gallery(session)
    session.execute(
        insert(Identity),
        [
            {"id": i, "name": n, "name_key": name_key(n), "meta": {}, "created_at": now, "updated_at": now}
            for i, n in zip(identity_ids, names, strict=True)
        ],
    )
    blobs = vectors.astype("<f4")
    session.execute(
        insert(Face),
        [
            {
                "id": face_ids[k],
                "identity_id": identity_ids[k],
                "embedding": blobs[k].tobytes(),
                "model_version": model_version,
                "box_left": boxes[k].left,
                "box_top": boxes[k].top,
                "box_right": boxes[k].right,
                "box_bottom": boxes[k].bottom,
                "detector_score": scores[k],
                "created_at": now,
                "image": None,
            }
            for k in range(count)
        ],
    )
    last = session.execute(
        update(GalleryState)
        .where(GalleryState.id == GALLERY_STATE_ID)
        .values(last_change_id=GalleryState.last_change_id + count)
        .returning(GalleryState.last_change_id)
    ).scalar_one()
    first = int(last) - count + 1
    session.execute(
        insert(GalleryChange),
        [
            {
                "id": first + k,
                "op": ChangeOp.ADD.value,
                "face_id": face_ids[k],
                "identity_id": identity_ids[k],
                "created_at": now,
            }
            for k in range(count)
        ],
    )
    session.info.setdefault(_PENDING_KEY, []).extend(
        Change(first + k, ChangeOp.ADD, face_ids[k], identity_ids[k], vectors[k].copy(), model_version)
        for k in range(count)
    )
    return [
        FaceRecord(face_ids[k], identity_ids[k], model_version, boxes[k], scores[k], now, False) for k in range(count)
    ]


def delete_face(session: Session, *, identity_id: str, face_id: str) -> DeletionReport:
    """Delete one face of the identity (the identity stays, even with no faces left). Raises UnknownIdentity or
    UnknownFace (also when the face belongs to another identity)."""
    if not is_valid_id(identity_id):
        raise UnknownIdentity(f"unknown identity {identity_id!r}", identity_id=identity_id)
    if not is_valid_id(face_id):
        raise UnknownFace(f"unknown face {face_id!r}", identity_id=identity_id, face_id=face_id)
    lock_gallery(session)
    if not identity_exists(session, identity_id=identity_id):
        raise UnknownIdentity(f"unknown identity {identity_id!r}", identity_id=identity_id)
    result = session.execute(delete(Face).where(Face.id == face_id, Face.identity_id == identity_id))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise UnknownFace(f"unknown face {face_id!r}", identity_id=identity_id, face_id=face_id)
    session.execute(update(Identity).where(Identity.id == identity_id).values(updated_at=utcnow()))
    _log_change(session, ChangeOp.REMOVE, face_id=face_id, identity_id=identity_id)
    _forget_vectors(session, (face_id,))
    return DeletionReport(identity_id, (face_id,), identity_deleted=False)


def face_embeddings(
    session: Session, *, identity_id: str, model_version: str | None = None
) -> tuple[list[str], npt.NDArray[np.float32]]:
    """The identity's face ids and their embeddings as an (n, 128) float32 matrix (oldest first), only those of
    `model_version` if given. Raises UnknownIdentity."""
    _identity_row(session, identity_id)
    query = select(Face.id, Face.embedding).where(Face.identity_id == identity_id).order_by(Face.created_at, Face.id)
    if model_version is not None:
        query = query.where(Face.model_version == model_version)
    rows = session.execute(query).all()
    return [row.id for row in rows], decode_embeddings([row.embedding for row in rows])


def face_image(session: Session, *, identity_id: str, face_id: str) -> bytes | None:
    """The stored photo of a face (None when photos are not kept). Raises UnknownFace."""
    if not (is_valid_id(identity_id) and is_valid_id(face_id)):
        raise UnknownFace(f"unknown face {face_id!r}", identity_id=identity_id, face_id=face_id)
    row = session.execute(select(Face.image).where(Face.id == face_id, Face.identity_id == identity_id)).first()
    if row is None:
        raise UnknownFace(f"unknown face {face_id!r}", identity_id=identity_id, face_id=face_id)
    image: bytes | None = row.image
    return image


def face_counts(session: Session) -> dict[str, int]:
    """Number of stored faces per model version (what the index can and cannot search)."""
    rows = session.execute(select(Face.model_version, func.count()).group_by(Face.model_version)).all()
    return {version: count for version, count in rows}


def decode_embeddings(blobs: list[bytes]) -> npt.NDArray[np.float32]:
    if not blobs:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), EMBEDDING_DIM).astype(np.float32)


# ------------------------------------------------------------------------------------------- change log


def last_change_id(session: Session) -> int:
    """Id of the last committed change (0: none yet)."""
    value = session.execute(select(GalleryState.last_change_id).where(GalleryState.id == GALLERY_STATE_ID)).scalar_one()
    return int(value)


def changes_after(session: Session, *, after: int, upto: int) -> list[Change]:
    """Changes with after < id <= upto, oldest first, with the current embedding of each added face (one query,
    so one consistent snapshot)."""
    query = (
        select(
            GalleryChange.id,
            GalleryChange.op,
            GalleryChange.face_id,
            GalleryChange.identity_id,
            Face.embedding,
            Face.model_version,
        )
        .outerjoin(Face, (Face.id == GalleryChange.face_id) & (GalleryChange.op == ChangeOp.ADD.value))
        .where(GalleryChange.id > after, GalleryChange.id <= upto)
        .order_by(GalleryChange.id)
    )
    changes = []
    for row in session.execute(query):
        embedding = None if row.embedding is None else decode_embeddings([row.embedding])[0]
        changes.append(Change(row.id, ChangeOp(row.op), row.face_id, row.identity_id, embedding, row.model_version))
    return changes


def all_faces(session: Session) -> tuple[list[str], list[str], list[str], npt.NDArray[np.float32]]:
    """Every stored face: (face ids, identity ids, model versions, (n, 128) float32 embeddings). No statement
    timeout for the rest of the transaction: the read grows with the gallery (`db.without_statement_timeout`)."""
    db.without_statement_timeout(session.connection())
    rows = session.execute(select(Face.id, Face.identity_id, Face.model_version, Face.embedding)).all()
    return (
        [row.id for row in rows],
        [row.identity_id for row in rows],
        [row.model_version for row in rows],
        decode_embeddings([row.embedding for row in rows]),
    )


def relabel_faces(session: Session, *, old_versions: Sequence[str], new_version: str) -> int:
    """Faces stored under `old_versions` (earlier builds of the same model) now carry `new_version`; how many.
    Not a change-log event: no face is added or removed, and every worker loads its index after this."""
    if not old_versions:
        return 0
    lock_gallery(session)
    db.without_statement_timeout(session.connection())  # at start-up, every face of a gallery may be rewritten
    result = session.execute(
        update(Face).where(Face.model_version.in_(list(old_versions))).values(model_version=new_version)
    )
    if result.rowcount:  # type: ignore[attr-defined]
        # Workers already running hold these faces as stale and no log entry tells them otherwise: move the head past
        # a change id that is never written (as bulk.copy_synthetic_gallery does), so that each sees a gap and
        # reloads in full.
        session.execute(
            update(GalleryState)
            .where(GalleryState.id == GALLERY_STATE_ID)
            .values(last_change_id=GalleryState.last_change_id + 1)
        )
    return int(result.rowcount)  # type: ignore[attr-defined]


def fill_missing_name_keys(session: Session) -> int:
    """Give `name_key` to the identities without one; how many. A name is never empty, so an empty key is one the
    column's server default gave: a row written by a facegate from before migration 0004 (a worker still running
    through a rolling upgrade), which `identities_named` and the name filter would never find."""
    rows = session.execute(select(Identity.id, Identity.name).where(Identity.name_key == "")).all()
    if rows:
        session.execute(update(Identity), [{"id": row.id, "name_key": name_key(row.name)} for row in rows])
    return len(rows)


def purge_photos(session: Session) -> int:
    """Drop every stored photo (FACEGATE_STORE_IMAGES); the faces, their embeddings and their identities stay. How
    many photos went. Not a change-log event: search never reads the photos."""
    db.without_statement_timeout(session.connection())  # a large gallery's photos in one statement
    result = session.execute(update(Face).where(Face.image.is_not(None)).values(image=None))
    return int(result.rowcount)  # type: ignore[attr-defined]


def prune_changes(session: Session, *, keep_last: int) -> int:
    """Delete all but the last `keep_last` change-log rows; returns how many went. A worker whose index lags
    behind the pruned part notices the gap and reloads in full."""
    if keep_last < 0:
        raise ValueError("keep_last must be >= 0")
    lock_gallery(session)
    cutoff = last_change_id(session) - keep_last
    result = session.execute(delete(GalleryChange).where(GalleryChange.id <= cutoff))
    return int(result.rowcount)  # type: ignore[attr-defined]


def pending_changes(session: Session) -> list[Change]:
    """Changes written in the session's current transaction and not yet taken (see `take_pending_changes`)."""
    return list(session.info.get(_PENDING_KEY, ()))


def take_pending_changes(session: Session) -> list[Change]:
    """Remove and return the changes written so far: after a commit, for the local index; after a rollback, to
    discard them."""
    return list(session.info.pop(_PENDING_KEY, ()))


def nearest_added_since(
    session: Session, *, after: int, embedding: npt.ArrayLike, model_version: str
) -> tuple[str, str, float] | None:
    """(face id, identity id, squared distance) of the face nearest to `embedding` among the faces of this model
    version added after change `after` and still stored; None if there are none. Every stored face is compared
    instead when the log no longer holds every change since `after` (pruned)."""
    head = last_change_id(session)
    changes = changes_after(session, after=after, upto=head)
    if [c.id for c in changes] == list(range(after + 1, head + 1)):
        added = [c for c in changes if c.op is ChangeOp.ADD and c.embedding is not None and c.model_version == model_version]
        face_ids = [c.face_id for c in added]
        identity_ids = [c.identity_id for c in added]
        vectors = np.array([c.embedding for c in added], np.float32).reshape(-1, EMBEDDING_DIM)
    else:
        face_ids, identity_ids, versions, vectors = all_faces(session)
        keep = [i for i, v in enumerate(versions) if v == model_version]
        face_ids, identity_ids, vectors = [face_ids[i] for i in keep], [identity_ids[i] for i in keep], vectors[keep]
    if not face_ids:
        return None
    distances = ((vectors - np.asarray(embedding, np.float32)) ** 2).sum(axis=1)
    best = int(np.argmin(distances))
    return face_ids[best], identity_ids[best], float(distances[best])


def lock_gallery(session: Session) -> None:
    """Take the gallery's write lock now, held to the end of the transaction. Every function here that changes faces
    takes it first; a caller takes it for a check that must see every committed write and keep new ones out until
    its own write commits (an enrolment's duplicate check, reindex)."""
    # A write as the transaction's first statement: PostgreSQL row lock, SQLite write lock (BEGIN is issued by
    # pysqlite right before it), both held to commit. Re-running it in the same transaction costs one no-op update.
    session.execute(
        update(GalleryState)
        .where(GalleryState.id == GALLERY_STATE_ID)
        .values(last_change_id=GalleryState.last_change_id)
    )


def _log_change(
    session: Session,
    op: ChangeOp,
    *,
    face_id: str,
    identity_id: str,
    embedding: npt.NDArray[np.float32] | None = None,
    model_version: str | None = None,
) -> int:
    change_id = session.execute(
        update(GalleryState)
        .where(GalleryState.id == GALLERY_STATE_ID)
        .values(last_change_id=GalleryState.last_change_id + 1)
        .returning(GalleryState.last_change_id)
    ).scalar_one()
    session.execute(
        insert(GalleryChange).values(
            id=change_id, op=op.value, face_id=face_id, identity_id=identity_id, created_at=utcnow()
        )
    )
    session.info.setdefault(_PENDING_KEY, []).append(
        Change(int(change_id), op, face_id, identity_id, embedding, model_version)
    )
    return int(change_id)


# --------------------------------------------------------------------------------------- deployment settings


def get_setting(session: Session, *, key: str) -> DeploymentSettingRecord | None:
    row = session.execute(
        select(
            DeploymentSetting.key, DeploymentSetting.value, DeploymentSetting.source, DeploymentSetting.updated_at
        ).where(DeploymentSetting.key == key)
    ).first()
    if row is None:
        return None
    return DeploymentSettingRecord(row.key, row.value, row.source, as_utc(row.updated_at))


def set_setting(session: Session, *, key: str, value: Any, source: str | None = None) -> DeploymentSettingRecord:
    """Insert or replace a deployment setting (a JSON value; `source` says where it came from, e.g. a calibration)."""
    if not key or len(key) > 100:
        raise ValueError("setting key must be 1-100 characters")
    now = utcnow()
    # Serialised with every other settings write (and gallery write): without it two concurrent writers both found
    # no row and the second INSERT failed (unique key), or a concurrent delete made the UPDATE match no row.
    lock_gallery(session)
    existing = session.get(DeploymentSetting, key)
    if existing is None:
        session.add(DeploymentSetting(key=key, value=value, source=source, updated_at=now))
    else:
        existing.value = value
        existing.source = source
        existing.updated_at = now
    session.flush()
    return DeploymentSettingRecord(key, value, source, now)


def delete_setting(session: Session, *, key: str) -> bool:
    lock_gallery(session)  # see set_setting
    result = session.execute(delete(DeploymentSetting).where(DeploymentSetting.key == key))
    return bool(result.rowcount)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------ helpers

_IDENTITY_COLUMNS = (Identity.id, Identity.name, Identity.meta, Identity.created_at, Identity.updated_at)
_FACE_COLUMNS = (
    Face.id,
    Face.identity_id,
    Face.model_version,
    Face.box_left,
    Face.box_top,
    Face.box_right,
    Face.box_bottom,
    Face.detector_score,
    Face.created_at,
    Face.image.is_not(None).label("has_image"),
)


def _identity_row(session: Session, identity_id: str) -> Row[Any]:
    if not is_valid_id(identity_id):
        raise UnknownIdentity(f"unknown identity {identity_id!r}", identity_id=identity_id)
    row = session.execute(select(*_IDENTITY_COLUMNS).where(Identity.id == identity_id)).first()
    if row is None:
        raise UnknownIdentity(f"unknown identity {identity_id!r}", identity_id=identity_id)
    return row


def _faces_of(session: Session, identity_ids: list[str]) -> dict[str, list[FaceRecord]]:
    faces: dict[str, list[FaceRecord]] = {}
    if not identity_ids:
        return faces
    rows = session.execute(
        select(*_FACE_COLUMNS).where(Face.identity_id.in_(identity_ids)).order_by(Face.created_at, Face.id)
    ).all()
    for row in rows:
        faces.setdefault(row.identity_id, []).append(
            FaceRecord(
                row.id,
                row.identity_id,
                row.model_version,
                Box(row.box_left, row.box_top, row.box_right, row.box_bottom),
                float(row.detector_score),
                as_utc(row.created_at),
                bool(row.has_image),
            )
        )
    return faces


def _identity_record(row: Row[Any], faces: tuple[FaceRecord, ...]) -> IdentityRecord:
    meta = dict(row.meta or {})
    if _nested_too_deeply(meta):
        # Stored before the depth limit existed: readable all the same (a PATCH replaces it).
        meta = _cut_nesting(meta, MAX_METADATA_DEPTH)
    return IdentityRecord(row.id, row.name, meta, as_utc(row.created_at), as_utc(row.updated_at), faces)


def _cut_nesting(value: Any, levels: int) -> Any:
    """`value` (level 1) with every object or array at level `levels` replaced by its JSON text: nothing is lost,
    and the recursion is bounded by `levels`."""
    if not isinstance(value, (dict, list)):
        return value
    if levels <= 1:
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return {k: _cut_nesting(v, levels - 1) for k, v in value.items()}
    return [_cut_nesting(v, levels - 1) for v in value]


def as_utc(value: datetime) -> datetime:
    """The same instant in UTC. SQLite gives back naive datetimes, which are UTC already (the gallery writes UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH or _bad_text(name):
        raise ValueError(f"name must be 1-{MAX_NAME_LENGTH} characters of valid Unicode, not blank, without NUL")


def check_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of `metadata`, a JSON object both databases can store and every reader can read back: at most
    MAX_METADATA_DEPTH levels deep, no NaN/Infinity, no NUL character or lone surrogate, at most MAX_METADATA_BYTES.
    Raises ValueError. The depth is checked first, without recursion: the checks after it recurse."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata must be a JSON object")  # noqa: TRY004 - every store validation error is a ValueError
    if _nested_too_deeply(metadata):
        raise ValueError(f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep (objects and arrays)")
    try:
        text = json.dumps(metadata, allow_nan=False, ensure_ascii=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata is not plain JSON: {error}") from None
    if _bad_text(metadata):
        raise ValueError("metadata strings must be valid Unicode without NUL characters")
    # Bytes of its UTF-8 JSON, as the client sent it and README counts it: the ASCII-escaped text above makes a
    # non-ASCII character 6 bytes (an emoji 12), which refused 36 kB of Japanese as "larger than 65536 bytes".
    if len(json.dumps(metadata, ensure_ascii=False).encode("utf-8")) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata larger than {MAX_METADATA_BYTES} bytes as JSON (UTF-8)")
    copy: dict[str, Any] = json.loads(text)
    return copy


def _nested_too_deeply(value: dict[str, Any]) -> bool:
    """More than MAX_METADATA_DEPTH levels of objects and arrays (tuples too), found with an explicit stack: a value
    nested thousands of levels deep costs no recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]  # (an object or array, its level)
    while stack:
        current, depth = stack.pop()
        children = current.values() if isinstance(current, dict) else current
        for child in children:
            if isinstance(child, (dict, list, tuple)):
                if depth == MAX_METADATA_DEPTH:
                    return True
                stack.append((child, depth + 1))
    return False


def _bad_text(value: Any) -> bool:
    """True if a string inside `value` has a NUL or a lone surrogate (neither database can store them). Recursive:
    metadata reaches it only once its depth is checked."""
    if isinstance(value, str):
        if "\x00" in value:
            return True
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_bad_text(k) or _bad_text(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_bad_text(v) for v in value)
    return False


def _check_embedding(embedding: npt.ArrayLike) -> npt.NDArray[np.float32]:
    vector = np.asarray(embedding, dtype=np.float32)
    if vector.shape != (EMBEDDING_DIM,):
        raise ValueError(f"embedding must have shape ({EMBEDDING_DIM},), got {vector.shape}")
    if not np.all(np.isfinite(vector)):
        raise ValueError("embedding has non-finite values")
    assert vector.nbytes == EMBEDDING_BYTES
    return vector.copy()


@dataclass(frozen=True)
class EvaluationFaces:
    """Every face of one model version, in the order issue 9's protocol needs: identity names, then enrolment."""

    identity_ids: list[str]
    names: list[str]
    face_ids: list[str]
    embeddings: npt.NDArray[np.float32]


def faces_for_evaluation(session: Session, *, model_version: str) -> EvaluationFaces:
    """Faces of `model_version` with their identity's name, sorted by (name, identity id, enrolment time, face id):
    the live gallery's counterpart of a folder of people sorted by name with their photos in file order. No
    statement timeout for the rest of the transaction, as `all_faces`."""
    db.without_statement_timeout(session.connection())
    rows = session.execute(
        select(Face.identity_id, Identity.name, Face.id, Face.embedding)
        .join(Identity, Identity.id == Face.identity_id)
        .where(Face.model_version == model_version)
        .order_by(Identity.name, Identity.id, Face.created_at, Face.id)
    ).all()
    return EvaluationFaces(
        identity_ids=[row.identity_id for row in rows],
        names=[row.name for row in rows],
        face_ids=[row.id for row in rows],
        embeddings=decode_embeddings([row.embedding for row in rows]),
    )
