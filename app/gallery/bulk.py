"""Bulk reads and writes of faces for large galleries: the index's start-up load and the synthetic bulk loader.

- `read_faces`: every stored face for the index. On PostgreSQL a server-side cursor in binary format, fetched in
  chunks (no per-row ORM work, embeddings arrive as raw bytes and are decoded with one `frombuffer` per chunk);
  elsewhere the plain query.
- `copy_synthetic_gallery`: writes identities and faces with COPY, as a restore would (PostgreSQL only): the change
  log is not written, `gallery_state.last_change_id` jumps past the new rows instead, so a running worker sees a
  gap and reloads in full, as after a pruned log.
"""

from __future__ import annotations

import io
import re
import uuid
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
from sqlalchemy import BigInteger, cast, func, select, text, update
from sqlalchemy.orm import Session

from app.gallery import db, store
from app.gallery.tables import GALLERY_STATE_ID, GalleryState, Identity
from app.vision.types import EMBEDDING_DIM

READ_CHUNK = 50_000
COPY_CHUNK = 50_000


def read_faces(session: Session) -> tuple[list[str], list[str], list[str], npt.NDArray[np.float32]]:
    """Every stored face: (face ids, identity ids, model versions, (n, 128) float32 embeddings), in the session's
    transaction (one snapshot). Its callers lift the statement timeout first: 1M faces take longer than a request's
    statement may (`db.without_statement_timeout`)."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        return store.all_faces(session)
    raw = connection.connection.driver_connection  # psycopg 3, inside the session's transaction
    face_ids: list[str] = []
    identity_ids: list[str] = []
    versions: list[str] = []
    blocks: list[npt.NDArray[np.float32]] = []
    with raw.cursor(name=f"facegate_faces_{uuid.uuid4().hex[:8]}", binary=True) as cursor:  # type: ignore[union-attr]
        cursor.itersize = READ_CHUNK
        cursor.execute("SELECT id, identity_id, model_version, embedding FROM faces")
        while rows := cursor.fetchmany(READ_CHUNK):
            ids, owners, models, blobs = zip(*rows, strict=True)
            face_ids.extend(ids)
            identity_ids.extend(owners)
            versions.extend(models)
            blocks.append(np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), EMBEDDING_DIM))
    if not blocks:
        return face_ids, identity_ids, versions, np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    return face_ids, identity_ids, versions, np.concatenate(blocks).astype(np.float32, copy=False)


def copy_synthetic_gallery(
    session: Session,
    *,
    embeddings: npt.NDArray[np.float32],
    owners: npt.NDArray[np.int64],
    model_version: str,
    name_prefix: str = "synthetic",
) -> tuple[int, int]:
    """Insert identities `0..owners.max()` and one face per row of `embeddings` (owner `owners[row]`) with COPY, in
    the caller's transaction (PostgreSQL). Returns (identities, faces). The identities are named
    `{name_prefix}-{n:08d}`, numbered on from the highest such name already stored: a second load repeated the
    first one's names (two "synthetic-00000000"), and a folder named after one could not tell them apart."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        raise ValueError("copy_synthetic_gallery needs PostgreSQL")
    vectors = np.ascontiguousarray(embeddings, dtype="<f4")
    if vectors.ndim != 2 or vectors.shape[1] != EMBEDDING_DIM or len(owners) != len(vectors):
        raise ValueError(f"embeddings must be (n, {EMBEDDING_DIM}) with one owner each")
    if not np.all(np.isfinite(vectors)):
        raise ValueError("embeddings have non-finite values")
    db.without_statement_timeout(connection)  # COPY of millions of rows, then ANALYZE: minutes
    session.execute(  # the gallery's write lock, as every face writer takes it first
        update(GalleryState).where(GalleryState.id == GALLERY_STATE_ID).values(last_change_id=GalleryState.last_change_id)
    )
    n_identities = int(owners.max()) + 1 if len(owners) else 0
    first_number = _next_number(session, name_prefix)  # under the write lock just taken: no other load interleaves
    identity_ids = [store.new_id() for _ in range(n_identities)]
    now = datetime.now(UTC).isoformat()
    raw = connection.connection.driver_connection
    with raw.cursor() as cursor:  # type: ignore[union-attr]
        for first in range(0, n_identities, COPY_CHUNK):
            buffer = io.StringIO()
            for i in range(first, min(first + COPY_CHUNK, n_identities)):
                name = f"{name_prefix}-{first_number + i:08d}"
                buffer.write(f"{identity_ids[i]}\t{name}\t{store.name_key(name)}\t{{}}\t{now}\t{now}\n")
            with cursor.copy(
                "COPY identities (id, name, name_key, metadata, created_at, updated_at) FROM STDIN"
            ) as copy:
                copy.write(buffer.getvalue())
        for first in range(0, len(vectors), COPY_CHUNK):
            buffer = io.StringIO()
            block = vectors[first : first + COPY_CHUNK]
            for offset, row in enumerate(block):
                buffer.write(
                    f"{store.new_id()}\t{identity_ids[int(owners[first + offset])]}\t\\\\x{row.tobytes().hex()}\t"
                    f"{model_version}\t0\t0\t-1\t-1\t0\t{now}\n"
                )
            with cursor.copy(
                "COPY faces (id, identity_id, embedding, model_version, box_left, box_top, box_right, box_bottom, "
                "detector_score, created_at) FROM STDIN"
            ) as copy:
                copy.write(buffer.getvalue())
    # Past the new rows with no log entries for them: workers see a gap and load in full (see module docstring).
    head = session.execute(select(GalleryState.last_change_id).where(GalleryState.id == GALLERY_STATE_ID)).scalar_one()
    session.execute(
        update(GalleryState)
        .where(GalleryState.id == GALLERY_STATE_ID)
        .values(last_change_id=int(head) + len(vectors) + 1)
    )
    # Fresh statistics (this transaction's rows count): until autovacuum gets to them, the planner would take the
    # faces table for the few rows it had and read faces of a page of identities by scanning all of them (1M faces:
    # a GET /identities page read its faces in 280 ms instead of a few).
    session.execute(text("ANALYZE identities, faces"))
    return n_identities, len(vectors)


def _next_number(session: Session, name_prefix: str) -> int:
    """One past the highest n of the identities named `{name_prefix}-<n>` (0 when there is none; PostgreSQL)."""
    number = func.substring(Identity.name, f"^{re.escape(name_prefix)}-([0-9]+)$")  # the group, or NULL
    highest = session.execute(select(func.max(cast(number, BigInteger)))).scalar_one()
    return 0 if highest is None else int(highest) + 1
