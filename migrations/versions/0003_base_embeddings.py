"""Base embeddings (issue 8): faces.base_embedding keeps the embedder's own output beside the served embedding, so
`facegate reindex` can recompute served embeddings when the active head changes, without the photos.

Nullable: faces enrolled before this revision have none (their `embedding` is the base one when their
model_version is the embedder's own, and reindex uses it then).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("faces") as batch:
        batch.add_column(sa.Column("base_embedding", sa.LargeBinary(), nullable=True))
        batch.create_check_constraint(
            op.f("ck_faces_base_embedding_size"), "base_embedding IS NULL OR length(base_embedding) = 512"
        )


def downgrade() -> None:
    with op.batch_alter_table("faces") as batch:
        batch.drop_constraint(op.f("ck_faces_base_embedding_size"), type_="check")
        batch.drop_column("base_embedding")
