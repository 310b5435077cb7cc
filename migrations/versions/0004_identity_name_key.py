"""Name keys: identities.name_key holds the name case-folded by facegate (`app.gallery.store.name_key`), which the
name filter of GET /identities compares, so that it finds the same people on SQLite (whose lower() knows only
ASCII) and on PostgreSQL (whose lower() depends on the server's locale and maps no `ß` to `ss`).

A plain ADD COLUMN (with a server default for the existing rows), never a batch copy of `identities` on SQLite:
with foreign keys on, dropping the old table would cascade-delete every face (see migrations/README.md).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 10_000
_identities = sa.table("identities", sa.column("id", sa.String), sa.column("name", sa.String), sa.column("name_key"))


def _name_key(text: str) -> str:
    """`app.gallery.store.name_key` as of this revision (written out, so that this revision keeps its meaning)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def upgrade() -> None:
    op.add_column("identities", sa.Column("name_key", sa.Text(), nullable=False, server_default=""))
    connection = op.get_bind()
    last = ""
    while True:  # in id order, a batch at a time: a million identities are never held at once
        rows = connection.execute(
            sa.select(_identities.c.id, _identities.c.name)
            .where(_identities.c.id > last)
            .order_by(_identities.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            return
        connection.execute(
            _identities.update().where(_identities.c.id == sa.bindparam("row_id")),
            [{"row_id": row.id, "name_key": _name_key(row.name)} for row in rows],
        )
        last = rows[-1].id


def downgrade() -> None:
    op.drop_column("identities", "name_key")
