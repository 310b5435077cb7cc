"""Listing index: identities (created_at, id), the order of GET /identities, so that a page (by offset or by
cursor) is read from the index instead of sorting every identity. On 500k identities (PostgreSQL) the first page
took ~170 ms, and a cursor page anywhere in the list now takes what counting the total takes.

A plain CREATE INDEX: it blocks writes to identities while it is built (about a second per million rows).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_identities_created_at_id", "identities", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_identities_created_at_id", table_name="identities")
