"""Initial gallery: identities, faces, change log, gallery state, deployment settings.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out here (not imported from app.gallery.tables) so that this revision keeps meaning what it meant
# when later revisions change the tables.
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "identities",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("metadata", _JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_identities")),
    )
    op.create_index(op.f("ix_identities_name"), "identities", ["name"])

    op.create_table(
        "faces",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("identity_id", sa.String(32), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("box_left", sa.Integer(), nullable=False),
        sa.Column("box_top", sa.Integer(), nullable=False),
        sa.Column("box_right", sa.Integer(), nullable=False),
        sa.Column("box_bottom", sa.Integer(), nullable=False),
        sa.Column("detector_score", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("image", sa.LargeBinary(), nullable=True),
        sa.CheckConstraint("length(embedding) = 512", name=op.f("ck_faces_embedding_size")),
        sa.ForeignKeyConstraint(
            ["identity_id"], ["identities.id"], name=op.f("fk_faces_identity_id_identities"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_faces")),
    )
    op.create_index(op.f("ix_faces_identity_id"), "faces", ["identity_id"])
    op.create_index(op.f("ix_faces_model_version"), "faces", ["model_version"])

    op.create_table(
        "gallery_changes",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("op", sa.String(8), nullable=False),
        sa.Column("face_id", sa.String(32), nullable=False),
        sa.Column("identity_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("op IN ('add', 'remove')", name=op.f("ck_gallery_changes_op")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gallery_changes")),
    )

    state = op.create_table(
        "gallery_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_change_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gallery_state")),
    )
    op.bulk_insert(state, [{"id": 1, "last_change_id": 0}])

    op.create_table(
        "deployment_settings",
        sa.Column("key", sa.String(100), nullable=False),
        sa.Column("value", _JSON, nullable=True),
        sa.Column("source", sa.String(200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_deployment_settings")),
    )


def downgrade() -> None:
    op.drop_table("deployment_settings")
    op.drop_table("gallery_state")
    op.drop_table("gallery_changes")
    op.drop_index(op.f("ix_faces_model_version"), table_name="faces")
    op.drop_index(op.f("ix_faces_identity_id"), table_name="faces")
    op.drop_table("faces")
    op.drop_index(op.f("ix_identities_name"), table_name="identities")
    op.drop_table("identities")
