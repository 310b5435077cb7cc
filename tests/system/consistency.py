"""What the database holds, read directly (SQLAlchemy, no facegate code path), and the invariants every state of
the gallery must satisfy whatever happened to the server."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import create_engine, text

from app.gallery import face_ids_digest
from app.gallery.tables import EMBEDDING_BYTES


@dataclass(frozen=True)
class DatabaseState:
    identities: set[str]
    faces: dict[str, str]  # face id -> identity id
    last_change_id: int

    @property
    def identities_with_faces(self) -> set[str]:
        return set(self.faces.values())

    @property
    def digest(self) -> str:
        return face_ids_digest(self.faces)


def read_database(url: str) -> DatabaseState:
    """Read the gallery and check its invariants: every face has its identity and a 512-byte embedding, the change
    log's ids are 1..last_change_id without a gap, and replaying the log gives exactly the face table."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            identities = set(connection.execute(text("SELECT id FROM identities")).scalars())
            faces = connection.execute(
                text(
                    "SELECT f.id, f.identity_id, i.id AS owner, length(f.embedding) AS size "
                    "FROM faces f LEFT JOIN identities i ON i.id = f.identity_id"
                )
            ).all()
            changes = connection.execute(
                text("SELECT id, op, face_id, identity_id FROM gallery_changes ORDER BY id")
            ).all()
            last = connection.execute(text("SELECT last_change_id FROM gallery_state WHERE id = 1")).scalar_one()
    finally:
        engine.dispose()

    orphans = [row.id for row in faces if row.owner is None]
    assert orphans == [], f"faces without their identity: {orphans}"
    bad_sizes = [(row.id, row.size) for row in faces if row.size != EMBEDDING_BYTES]
    assert bad_sizes == [], f"faces without a {EMBEDDING_BYTES}-byte embedding: {bad_sizes}"

    assert [row.id for row in changes] == list(range(1, int(last) + 1)), "the change log has gaps or extra ids"
    replayed: dict[str, str] = {}
    for row in changes:
        if row.op == "add":
            assert row.face_id not in replayed, f"change {row.id} adds face {row.face_id} twice"
            replayed[row.face_id] = row.identity_id
        else:
            assert replayed.pop(row.face_id, None) == row.identity_id, f"change {row.id} removes an absent face"
    state = DatabaseState(identities, {row.id: row.identity_id for row in faces}, int(last))
    assert replayed == state.faces, "replaying the change log does not give the face table"
    return state


def identity_names(url: str) -> dict[str, str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return {row.id: row.name for row in connection.execute(text("SELECT id, name FROM identities"))}
    finally:
        engine.dispose()


def assert_workers_agree(states: dict[int, dict[str, object]], database: DatabaseState) -> None:
    """Every worker's index (GET /admin/index, refreshed) holds exactly the database's faces."""
    expected = {
        "size": len(database.faces),
        "identities": len(database.identities_with_faces),
        "stale": 0,
        "last_change_id": database.last_change_id,
        "face_ids_sha256": database.digest,
    }
    for pid, state in states.items():
        got = {key: state[key] for key in expected}
        assert got == expected, f"worker {pid}'s index differs from the database"
