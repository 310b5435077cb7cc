"""The gallery's tables (SQLAlchemy 2 declarative). Alembic's migrations in `migrations/` create them.

- `identities`: a person (name + free JSON metadata), and `name_key`, the name as the name filter compares it
  (`store.name_key`: Unicode case folding done in Python, the same on SQLite and PostgreSQL).
- `faces`: one enrolled face: its 128 float32 embedding (little-endian bytes), the model version that made it,
  the detector box/score, and the photo only when the `store_images` setting asks for it.
- `gallery_changes`: the change log ('add'/'remove' of a face) that every worker's in-memory index replays.
  Its ids are handed out by `gallery_state.last_change_id` while that row is locked, so they are gap-free and
  committed in id order (a sequence would leave gaps on rollback and commit out of order on PostgreSQL). The log
  holds ids only, never an embedding.
- `gallery_state`: one row (id 1): the id of the last change written; also the write lock every gallery
  transaction takes first.
- `deployment_settings`: per-deployment values stored in the database (e.g. a calibrated threshold).
- `api_keys`: API keys (hash, scopes, revocation); the key itself is shown once at creation and never stored.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

EMBEDDING_BYTES = 128 * 4  # 128 float32, little-endian
ID_LENGTH = 32  # uuid4().hex
MAX_NAME_LENGTH = 255
MAX_MODEL_VERSION_LENGTH = 128
GALLERY_STATE_ID = 1

# Constraint names are fixed so that later migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JsonType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Identity(Base):
    __tablename__ = "identities"
    # The listing's order (oldest first, then id): its pages, by offset or by cursor, are read from this index
    # rather than by sorting every identity (migration 0005).
    __table_args__ = (Index("ix_identities_created_at_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH), index=True)
    # store.name_key(name), written with the name (migration 0004). Its server default only serves SQLite's ADD
    # COLUMN for existing rows: every writer sets it.
    name_key: Mapped[str] = mapped_column(Text, server_default="")
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    faces: Mapped[list[Face]] = relationship(
        back_populates="identity", cascade="all, delete-orphan", passive_deletes=True, order_by="Face.created_at"
    )


class Face(Base):
    __tablename__ = "faces"
    __table_args__ = (
        CheckConstraint(f"length(embedding) = {EMBEDDING_BYTES}", name="embedding_size"),
        CheckConstraint(
            f"base_embedding IS NULL OR length(base_embedding) = {EMBEDDING_BYTES}", name="base_embedding_size"
        ),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    identity_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("identities.id", ondelete="CASCADE"), index=True
    )
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    model_version: Mapped[str] = mapped_column(String(MAX_MODEL_VERSION_LENGTH), index=True)
    # The embedder's own output (migration 0003), from which `facegate reindex` recomputes `embedding` when the
    # served head changes; NULL for faces stored before it (their embedding is the base one if model_version is).
    base_embedding: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    box_left: Mapped[int] = mapped_column(Integer)
    box_top: Mapped[int] = mapped_column(Integer)
    box_right: Mapped[int] = mapped_column(Integer)
    box_bottom: Mapped[int] = mapped_column(Integer)
    detector_score: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    image: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)

    identity: Mapped[Identity] = relationship(back_populates="faces")


class GalleryChange(Base):
    __tablename__ = "gallery_changes"
    __table_args__ = (CheckConstraint("op IN ('add', 'remove')", name="op"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    op: Mapped[str] = mapped_column(String(8))
    face_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    identity_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class GalleryState(Base):
    __tablename__ = "gallery_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_change_id: Mapped[int] = mapped_column(BigInteger, default=0)


class DeploymentSetting(Base):
    __tablename__ = "deployment_settings"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[Any] = mapped_column(JsonType, nullable=True)
    source: Mapped[str | None] = mapped_column(String(200), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key: only its SHA-256 hash is stored; `prefix` (the key's first characters) names it in lists and
    logs and finds the row in one lookup."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(128))
    scopes: Mapped[list[str]] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
