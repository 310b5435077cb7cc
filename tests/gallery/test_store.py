"""store.py on both databases: identities and faces, paging, deletion that really deletes, atomic failures."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy import Engine, event, insert, inspect, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import UnknownFace, UnknownIdentity
from app.gallery import db, store
from app.gallery.tables import Face, GalleryChange, Identity, utcnow
from app.vision.types import Box
from tests.gallery.conftest import MODEL, random_embeddings

BOX = Box(10, 20, 109, 119)


def nested(levels: int) -> dict[str, object]:
    """Metadata `levels` deep: {"a": [[...]]}, the object itself being the first level (built without recursion)."""
    inner: list[object] = []
    for _ in range(levels - 2):
        inner = [inner]
    return {"a": inner}


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = db.make_engine(database_url)
    db.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return db.make_session_factory(engine)


def _counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        counts = {
            table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in ("identities", "faces", "gallery_changes")
        }
        counts["last_change_id"] = connection.execute(text("SELECT last_change_id FROM gallery_state")).scalar_one()
    return counts


def _enrol(sessions: sessionmaker[Session], name: str, n_faces: int, seed: int = 0) -> tuple[str, list[str]]:
    embeddings = random_embeddings(np.random.default_rng(seed), n_faces)
    with sessions.begin() as session:
        identity = store.create_identity(session, name=name, metadata={"n": n_faces})
        faces = [
            store.add_face(session, identity_id=identity.id, embedding=e, model_version=MODEL, box=BOX, score=1.25)
            for e in embeddings
        ]
    return identity.id, [f.id for f in faces]


class TestIdentities:
    def test_create_get_update(self, sessions: sessionmaker[Session]) -> None:
        with sessions.begin() as session:
            created = store.create_identity(session, name="Ada Lovelace", metadata={"team": "x", "tags": [1, 2]})
        with sessions.begin() as session:
            got = store.get_identity(session, identity_id=created.id)
        assert (got.id, got.name, got.metadata, got.faces) == (
            created.id,
            "Ada Lovelace",
            {"team": "x", "tags": [1, 2]},
            (),
        )
        assert store.is_valid_id(got.id)
        assert got.created_at.tzinfo is not None
        assert abs((got.created_at - created.created_at).total_seconds()) < 1e-3

        with sessions.begin() as session:
            renamed = store.update_identity(session, identity_id=created.id, name="Ada King")
        assert (renamed.name, renamed.metadata) == ("Ada King", {"team": "x", "tags": [1, 2]})
        assert renamed.updated_at >= created.updated_at
        with sessions.begin() as session:
            store.update_identity(session, identity_id=created.id, metadata={"new": True})
            assert store.get_identity(session, identity_id=created.id).metadata == {"new": True}
            assert store.get_identity(session, identity_id=created.id).name == "Ada King"

    def test_identities_named_match_the_whole_name_whatever_its_case_or_form(
        self, sessions: sessionmaker[Session]
    ) -> None:
        """`enroll DIR` finds a folder's identity by name: a listing's substring filter made a folder named "y"
        count and page through every identity with a y (15 s at 50k identities); this is one equality test."""
        with sessions.begin() as session:
            composed = store.create_identity(session, name="\u00c9lodie", metadata=None)
            decomposed = store.create_identity(session, name="E\u0301LODIE", metadata=None)
            store.create_identity(session, name="\u00c9lodie Martin", metadata=None)
            store.create_identity(session, name="y", metadata=None)
        with sessions.begin() as session:
            assert store.identities_named(session, name="\u00e9lodie") == {
                composed.id: "\u00c9lodie",
                decomposed.id: "E\u0301LODIE",
            }  # oldest first
            assert list(store.identities_named(session, name="Y").values()) == ["y"]
            assert store.identities_named(session, name="lodie") == {}

    def test_names_in_one_call(self, sessions: sessionmaker[Session]) -> None:
        with sessions.begin() as session:
            ada = store.create_identity(session, name="Ada", metadata=None)
            bob = store.create_identity(session, name="Bob", metadata=None)
            gone = store.create_identity(session, name="Gone", metadata=None)
            store.delete_identity(session, identity_id=gone.id)
        with sessions.begin() as session:
            names = store.identity_names(session, identity_ids=[ada.id, bob.id, gone.id, "not-an-id"])
            assert names == {ada.id: "Ada", bob.id: "Bob"}
            assert store.identity_names(session, identity_ids=[]) == {}

    def test_unknown_or_malformed_ids(self, sessions: sessionmaker[Session]) -> None:
        for bad_id in ["0" * 32, "not-an-id", "", "A" * 32, "x" * 5000, "a\x00b"]:
            with sessions.begin() as session:
                with pytest.raises(UnknownIdentity):
                    store.get_identity(session, identity_id=bad_id)
                with pytest.raises(UnknownIdentity):
                    store.update_identity(session, identity_id=bad_id, name="x")
                with pytest.raises(UnknownIdentity):
                    store.delete_identity(session, identity_id=bad_id)
                with pytest.raises(UnknownIdentity):
                    store.face_embeddings(session, identity_id=bad_id)
                assert not store.identity_exists(session, identity_id=bad_id)

    def test_invalid_values_are_refused_before_the_database(
        self, sessions: sessionmaker[Session], engine: Engine
    ) -> None:
        cases: list[tuple[str, dict[str, object] | None]] = [
            ("", None),
            ("   ", None),
            ("x" * 256, None),
            ("nul\x00name", None),
            ("lone \udcff surrogate", None),
            ("ok", {"v": math.nan}),
            ("ok", {"v": "nul\x00"}),
            ("ok", {"v": object()}),
            ("ok", {"v": "x" * (store.MAX_METADATA_BYTES + 1)}),
            ("ok", nested(store.MAX_METADATA_DEPTH + 1)),
            ("ok", nested(256)),  # pydantic could not serialise it back: every read of the identity failed
            ("ok", nested(100_000)),  # no RecursionError
        ]
        for name, metadata in cases:
            with pytest.raises(ValueError), sessions.begin() as session:
                store.create_identity(session, name=name, metadata=metadata)
        with sessions.begin() as session:
            identity_id = store.create_identity(session, name="ok").id
        for name, metadata in cases:
            with pytest.raises(ValueError), sessions.begin() as session:
                store.update_identity(
                    session, identity_id=identity_id, name=None if name == "ok" else name, metadata=metadata
                )
        assert _counts(engine)["identities"] == 1
        with sessions.begin() as session:
            assert store.get_identity(session, identity_id=identity_id).name == "ok"

    def test_metadata_limit_counts_utf8_bytes(self, sessions: sessionmaker[Session]) -> None:
        # 36 kB of UTF-8 (12,000 three-byte characters) is under the 64 kB limit, however SQLite escapes it.
        text = "日本語" * 4000
        with sessions.begin() as session:
            identity_id = store.create_identity(session, name="ok", metadata={"notes": text}).id
        with sessions.begin() as session:
            assert store.get_identity(session, identity_id=identity_id).metadata == {"notes": text}
        with pytest.raises(ValueError, match="larger than"), sessions.begin() as session:
            store.create_identity(session, name="ok", metadata={"notes": "é" * (store.MAX_METADATA_BYTES // 2)})

    def test_longest_name_and_unicode_round_trip(self, sessions: sessionmaker[Session]) -> None:
        name = "Zoë 山田 🙂" + "é" * 247
        assert len(name) == 255
        with sessions.begin() as session:
            identity_id = store.create_identity(session, name=name, metadata={"ключ": "значение"}).id
        with sessions.begin() as session:
            got = store.get_identity(session, identity_id=identity_id)
        assert (got.name, got.metadata) == (name, {"ключ": "значение"})

    def test_metadata_depth_limit(self, sessions: sessionmaker[Session]) -> None:
        deepest = nested(store.MAX_METADATA_DEPTH)
        with sessions.begin() as session:
            identity_id = store.create_identity(session, name="deep", metadata=deepest).id
        with sessions.begin() as session:
            assert store.get_identity(session, identity_id=identity_id).metadata == deepest
            with pytest.raises(ValueError, match="nested more than 32 levels"):
                store.update_identity(session, identity_id=identity_id, metadata={"b": [deepest]})
        loop: dict[str, object] = {}
        loop["self"] = loop  # a Python caller's cycle is too deep, not an endless walk
        with pytest.raises(ValueError, match="nested more than"), sessions.begin() as session:
            store.create_identity(session, name="loop", metadata=loop)

    def test_metadata_stored_too_deep_is_still_readable(self, sessions: sessionmaker[Session]) -> None:
        """Metadata stored before the depth limit: read with its deepest part as JSON text, never failing."""
        with sessions.begin() as session:
            identity_id = store.create_identity(session, name="old row").id
            session.execute(update(Identity).where(Identity.id == identity_id).values(meta=nested(300)))
        with sessions.begin() as session:
            got = store.get_identity(session, identity_id=identity_id).metadata
            listed = store.list_identities(session)[0][0].metadata
        assert got == listed
        cut: object = got["a"]
        for _ in range(store.MAX_METADATA_DEPTH - 2):
            assert isinstance(cut, list) and len(cut) == 1
            cut = cut[0]
        # levels 1 to 31 as stored, the 269 levels below as the JSON text of the array at level 32
        assert cut == "[" * 269 + "]" * 269
        assert store.check_metadata(got) == got  # what a client reads can be written back

    def test_list_paging_and_filter(self, sessions: sessionmaker[Session]) -> None:
        names = [f"person {i:02d}" for i in range(7)] + ["100% real_name", "100 percent"]
        ids = []
        for name in names:
            with sessions.begin() as session:
                ids.append(store.create_identity(session, name=name).id)
        with sessions.begin() as session:
            pages = [store.list_identities(session, offset=o, limit=4) for o in (0, 4, 8, 12)]
            assert [page.total for page in pages] == [9, 9, 9, 9]
            assert [r.id for page in pages for r in page.items] == ids  # oldest first, every identity once
            assert [len(page.items) for page in pages] == [4, 4, 1, 0]
            assert [page.next is not None for page in pages] == [True, True, False, False]

            found, total, *_ = store.list_identities(session, offset=0, limit=100, name_contains="PERSON 0")
            assert total == 7 and [r.name for r in found] == names[:7]
            # LIKE wildcards in the filter match themselves
            assert [r.name for r in store.list_identities(session, name_contains="0% r")[0]] == ["100% real_name"]
            assert store.list_identities(session, name_contains="pers_n")[1] == 0
            assert store.list_identities(session, name_contains="nul\x00")[1] == 0
            with pytest.raises(ValueError):
                store.list_identities(session, offset=-1)

    def test_cursor_pages_neither_skip_nor_repeat_while_the_gallery_changes(
        self, sessions: sessionmaker[Session]
    ) -> None:
        """Paging with `after`: identities deleted or added between pages shift no page (with an offset each
        deletion skips someone). Identities created in the same microsecond (a bulk load) are ordered by id."""
        with sessions.begin() as session:
            ids = [store.create_identity(session, name=f"p{i:02d}").id for i in range(10)]
            # four identities with p03's timestamp: the cursor's id part orders them
            same = session.scalar(select(Identity.created_at).where(Identity.id == ids[3]))
            session.execute(update(Identity).where(Identity.id.in_(ids[3:7])).values(created_at=same))
        expected = ids[:3] + sorted(ids[3:7]) + ids[7:]
        seen: list[str] = []
        after: store.PageKey | None = None
        pages = 0
        while True:
            with sessions.begin() as session:
                page = store.list_identities(session, limit=3, after=after)
            pages += 1
            seen += [r.id for r in page.items]
            if pages == 1:  # between pages: the first listed and a later one go, a newer one comes
                with sessions.begin() as session:
                    store.delete_identity(session, identity_id=expected[0])
                    store.delete_identity(session, identity_id=expected[5])
                    newest = store.create_identity(session, name="newest").id
            if page.next is None:
                break
            assert page.next == store.PageKey.parse(page.next.token())  # the cursor survives its text form
            after = page.next
        assert seen == expected[:5] + expected[6:] + [newest]
        assert pages == 4 and page.total == 9

        with sessions.begin() as session:  # a cursor with the name filter, and one past the end
            first = store.list_identities(session, limit=2, name_contains="P0")
            second = store.list_identities(session, limit=2, name_contains="P0", after=first.next)
            whole = store.list_identities(session, limit=100, name_contains="P0")
            assert first.items + second.items == whole.items[:4] and len(whole.items) == whole.total == 8
            assert second.total == 8 and second.next is not None
            last = store.list_identities(session, after=store.PageKey(datetime(9999, 1, 1, tzinfo=UTC), "f" * 32))
            assert last == ([], 9, None, 9)  # nobody after it: all 9 come before

    def test_a_page_says_how_many_come_before_it(self, sessions: sessionmaker[Session]) -> None:
        """`start`: the identities matching the filter before the page's first, counted now (a client showing
        "4-6 of 10" needs it; adding up the pages it saw is wrong once people before the cursor are deleted)."""
        with sessions.begin() as session:
            ids = [store.create_identity(session, name=f"{'ab'[i % 2]}{i:02d}").id for i in range(10)]
        with sessions.begin() as session:
            first = store.list_identities(session, limit=3)
            second = store.list_identities(session, limit=3, after=first.next)
            assert (first.start, second.start, second.total) == (0, 3, 10)
            assert store.list_identities(session, limit=3, offset=4).start == 4
            assert store.list_identities(session, limit=3, offset=2, after=first.next).start == 5
            store.delete_identity(session, identity_id=ids[0])
        with sessions.begin() as session:
            again = store.list_identities(session, limit=3, after=first.next)
            assert (again.start, again.total, again.items) == (2, 9, second.items)
            named = store.list_identities(session, limit=2, name_contains="b")  # b01, b03 | b05 ...
            after = store.list_identities(session, limit=2, name_contains="b", after=named.next)
            assert (after.start, after.total, [r.name for r in after.items]) == (2, 5, ["b05", "b07"])
            assert store.list_identities(session, offset=50).start == 9  # past the end: everyone is before

    @pytest.mark.parametrize(
        "token",
        [
            "",
            "12_",
            "_" + "a" * 32,
            "12_" + "A" * 32,
            "12_" + "a" * 31,
            "-5_" + "a" * 32,
            "9" * 18 + "_" + "a" * 32,
            "\u0661\u0662_" + "a" * 32,  # Arabic-Indic digits: re's \d took them and int() read them as 12
        ],
    )
    def test_a_cursor_not_written_by_a_page_is_refused(self, token: str) -> None:
        with pytest.raises(ValueError, match="not a listing cursor"):
            store.PageKey.parse(token)

    def test_name_filter_is_the_same_caseless_match_on_both_databases(self, sessions: sessionmaker[Session]) -> None:
        """Unicode case folding done by facegate, not by the database: SQLite's lower() knows only ASCII, and
        PostgreSQL's depends on the server's locale (and maps no `ß` to `ss`)."""
        names = ["Élodie Durand", "ÉLODIE", "Straße 5", "STRASSE", "Ｋａｔｅ", "under_score", "back\\slash", "Ωmega"]
        with sessions.begin() as session:
            for name in names:
                store.create_identity(session, name=name)
        cases = {
            "élodie": ["Élodie Durand", "ÉLODIE"],
            "ÉLODIE DU": ["Élodie Durand"],
            "straße": ["Straße 5", "STRASSE"],
            "STRASSE": ["Straße 5", "STRASSE"],
            "kate": ["Ｋａｔｅ"],
            "ωMEGA": ["Ωmega"],
            "_": ["under_score"],
            "%": [],
            "\\": ["back\\slash"],
            "\\_": [],  # a backslash escapes nothing
        }
        with sessions.begin() as session:
            for query, expected in cases.items():
                found, total, *_ = store.list_identities(session, name_contains=query)
                assert ([r.name for r in found], total) == (expected, len(expected)), query
        with sessions.begin() as session:  # a rename changes what the filter finds
            renamed = store.list_identities(session, name_contains="kate")[0][0]
            store.update_identity(session, identity_id=renamed.id, name="ÅSA")
            assert store.list_identities(session, name_contains="kate")[1] == 0
            assert [r.name for r in store.list_identities(session, name_contains="åsa")[0]] == ["ÅSA"]

    def test_list_total_agrees_with_the_page_when_another_request_commits_meanwhile(
        self, sessions: sessionmaker[Session], engine: Engine, database_url: str
    ) -> None:
        """Another request's identity is committed right after the listing's first statement: the page and its total
        still come from one snapshot (either both count it or neither does)."""
        with sessions.begin() as session:
            store.create_identity(session, name="first")
        other = db.make_engine(database_url)
        committed: list[str] = []

        def commit_another(*_args: object) -> None:
            if not committed:
                with db.make_session_factory(other).begin() as session:
                    committed.append(store.create_identity(session, name="second").id)

        event.listen(engine, "after_cursor_execute", commit_another)
        try:
            with sessions.begin() as session:
                page, total, *_ = store.list_identities(session, limit=10)
        finally:
            event.remove(engine, "after_cursor_execute", commit_another)
            other.dispose()
        assert committed
        assert total == len(page)

    def test_list_includes_faces(self, sessions: sessionmaker[Session]) -> None:
        _, face_ids = _enrol(sessions, "two faces", 2)
        _enrol(sessions, "none", 0)
        with sessions.begin() as session:
            records, *_ = store.list_identities(session)
        assert [(r.name, r.face_count) for r in records] == [("two faces", 2), ("none", 0)]
        assert [f.id for f in records[0].faces] == face_ids


class TestFaces:
    def test_add_face_stores_embedding_exactly(self, sessions: sessionmaker[Session], engine: Engine) -> None:
        embeddings = random_embeddings(np.random.default_rng(3), 3)
        with sessions.begin() as session:
            identity = store.create_identity(session, name="A")
            records = [
                store.add_face(
                    session, identity_id=identity.id, embedding=e, model_version=MODEL, box=BOX, score=0.5 + i
                )
                for i, e in enumerate(embeddings)
            ]
        with sessions.begin() as session:
            face_ids, matrix = store.face_embeddings(session, identity_id=identity.id)
            got = store.get_identity(session, identity_id=identity.id)
        assert face_ids == [r.id for r in records]
        assert matrix.dtype == np.float32 and matrix.shape == (3, 128)
        np.testing.assert_array_equal(matrix, embeddings)
        assert [f.box for f in got.faces] == [BOX] * 3
        assert [f.detector_score for f in got.faces] == [0.5, 1.5, 2.5]
        assert {f.model_version for f in got.faces} == {MODEL}
        assert not any(f.has_image for f in got.faces)
        with engine.connect() as connection:
            blob = connection.execute(select(Face.embedding).where(Face.id == records[0].id)).scalar_one()
        assert blob == embeddings[0].astype("<f4").tobytes()
        assert _counts(engine) == {"identities": 1, "faces": 3, "gallery_changes": 3, "last_change_id": 3}

    def test_image_kept_only_when_given(self, sessions: sessionmaker[Session]) -> None:
        e = random_embeddings(np.random.default_rng(0), 2)
        with sessions.begin() as session:
            identity = store.create_identity(session, name="A")
            with_photo = store.add_face(
                session,
                identity_id=identity.id,
                embedding=e[0],
                model_version=MODEL,
                box=BOX,
                score=1,
                image=b"\xff\xd8jpeg",
            )
            without = store.add_face(
                session, identity_id=identity.id, embedding=e[1], model_version=MODEL, box=BOX, score=1
            )
        with sessions.begin() as session:
            assert store.face_image(session, identity_id=identity.id, face_id=with_photo.id) == b"\xff\xd8jpeg"
            assert store.face_image(session, identity_id=identity.id, face_id=without.id) is None
            assert [f.has_image for f in store.get_identity(session, identity_id=identity.id).faces] == [True, False]

    def test_add_face_to_unknown_identity_writes_nothing(self, sessions: sessionmaker[Session], engine: Engine) -> None:
        _enrol(sessions, "existing", 1)
        before = _counts(engine)
        with pytest.raises(UnknownIdentity), sessions.begin() as session:
            store.add_face(
                session, identity_id="0" * 32, embedding=np.zeros(128), model_version=MODEL, box=BOX, score=1
            )
        assert _counts(engine) == before

    @pytest.mark.parametrize(
        "embedding", [np.zeros(127), np.zeros((1, 128)), np.full(128, np.nan), np.full(128, np.inf)]
    )
    def test_bad_embedding_rolls_back_the_whole_enrolment(
        self, sessions: sessionmaker[Session], engine: Engine, embedding: np.ndarray
    ) -> None:
        with pytest.raises(ValueError), sessions.begin() as session:
            identity = store.create_identity(session, name="half")
            store.add_face(session, identity_id=identity.id, embedding=embedding, model_version=MODEL, box=BOX, score=1)
        assert _counts(engine) == {"identities": 0, "faces": 0, "gallery_changes": 0, "last_change_id": 0}

    def test_database_refuses_a_face_without_a_full_embedding_or_identity(
        self, sessions: sessionmaker[Session], engine: Engine
    ) -> None:
        identity_id, _ = _enrol(sessions, "A", 0)
        row = {
            "id": store.new_id(),
            "identity_id": identity_id,
            "embedding": b"\x00" * 511,
            "model_version": MODEL,
            "box_left": 0,
            "box_top": 0,
            "box_right": 1,
            "box_bottom": 1,
            "detector_score": 1.0,
            "created_at": utcnow(),
        }
        for bad in ({"embedding": b"\x00" * 511}, {"embedding": None}, {"identity_id": "0" * 32}):
            with pytest.raises(IntegrityError), engine.begin() as connection:
                connection.execute(insert(Face).values(**{**row, **bad}))
        assert _counts(engine)["faces"] == 0


class TestDeletion:
    def test_delete_identity_removes_every_row(self, sessions: sessionmaker[Session], engine: Engine) -> None:
        keep_id, keep_faces = _enrol(sessions, "keep", 2, seed=1)
        gone_id, gone_faces = _enrol(sessions, "gone", 3, seed=2)
        with sessions.begin() as session:
            report = store.delete_identity(session, identity_id=gone_id)
        assert report == store.DeletionReport(gone_id, tuple(gone_faces), identity_deleted=True)
        with engine.connect() as connection:
            assert set(connection.execute(select(Face.id)).scalars()) == set(keep_faces)
            assert connection.execute(text("SELECT count(*) FROM identities")).scalar_one() == 1
            changes = connection.execute(
                select(GalleryChange.id, GalleryChange.op, GalleryChange.face_id).order_by(GalleryChange.id)
            ).all()
        assert [(c.op, c.face_id) for c in changes[-3:]] == [("remove", f) for f in gone_faces]
        assert [c.id for c in changes] == list(range(1, 9))
        with sessions.begin() as session:
            with pytest.raises(UnknownIdentity):
                store.get_identity(session, identity_id=gone_id)
            assert store.get_identity(session, identity_id=keep_id).face_count == 2

    def test_change_log_never_holds_an_embedding(self, engine: Engine, sessions: sessionmaker[Session]) -> None:
        _enrol(sessions, "A", 2)
        columns = {c["name"] for c in inspect(engine).get_columns("gallery_changes")}
        assert columns == {"id", "op", "face_id", "identity_id", "created_at"}
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT * FROM gallery_changes")).all()
        assert all(len(str(value)) < 64 for row in rows for value in row)

    def test_delete_face(self, sessions: sessionmaker[Session], engine: Engine) -> None:
        identity_id, face_ids = _enrol(sessions, "A", 2)
        _, other_faces = _enrol(sessions, "B", 1, seed=5)
        with sessions.begin() as session:
            with pytest.raises(UnknownFace):
                store.delete_face(session, identity_id=identity_id, face_id=other_faces[0])  # someone else's face
            with pytest.raises(UnknownFace):
                store.delete_face(session, identity_id=identity_id, face_id="bogus")
            with pytest.raises(UnknownIdentity):
                store.delete_face(session, identity_id="0" * 32, face_id=face_ids[0])
        with sessions.begin() as session:
            report = store.delete_face(session, identity_id=identity_id, face_id=face_ids[0])
        assert report == store.DeletionReport(identity_id, (face_ids[0],), identity_deleted=False)
        with sessions.begin() as session:
            assert [f.id for f in store.get_identity(session, identity_id=identity_id).faces] == [face_ids[1]]
            with pytest.raises(UnknownFace):
                store.delete_face(session, identity_id=identity_id, face_id=face_ids[0])  # already gone
        with sessions.begin() as session:
            store.delete_face(session, identity_id=identity_id, face_id=face_ids[1])
        with sessions.begin() as session:
            assert store.get_identity(session, identity_id=identity_id).faces == ()  # the identity stays
        counts = _counts(engine)
        assert (counts["faces"], counts["identities"], counts["last_change_id"]) == (1, 2, 5)


class TestChangeLog:
    def test_changes_after_joins_current_embeddings(self, sessions: sessionmaker[Session]) -> None:
        identity_id, face_ids = _enrol(sessions, "A", 2)
        with sessions.begin() as session:
            store.delete_face(session, identity_id=identity_id, face_id=face_ids[0])
        with sessions.begin() as session:
            assert store.last_change_id(session) == 3
            changes = store.changes_after(session, after=0, upto=3)
            assert [(c.id, c.op, c.face_id) for c in changes] == [
                (1, store.ChangeOp.ADD, face_ids[0]),
                (2, store.ChangeOp.ADD, face_ids[1]),
                (3, store.ChangeOp.REMOVE, face_ids[0]),
            ]
            assert changes[0].embedding is None  # removed since
            assert changes[1].embedding is not None and changes[1].model_version == MODEL
            _, matrix = store.face_embeddings(session, identity_id=identity_id)
            np.testing.assert_array_equal(changes[1].embedding, matrix[0])
            assert [c.id for c in store.changes_after(session, after=1, upto=2)] == [2]

    def test_pending_changes_follow_the_transaction(self, sessions: sessionmaker[Session]) -> None:
        with sessions() as session:
            with session.begin():
                identity = store.create_identity(session, name="A")
                store.add_face(
                    session, identity_id=identity.id, embedding=np.ones(128), model_version=MODEL, box=BOX, score=1
                )
                assert [c.op for c in store.pending_changes(session)] == [store.ChangeOp.ADD]
            taken = store.take_pending_changes(session)
            assert [c.id for c in taken] == [1] and store.pending_changes(session) == []

    def test_prune(self, sessions: sessionmaker[Session]) -> None:
        _enrol(sessions, "A", 5)
        with sessions.begin() as session:
            assert store.prune_changes(session, keep_last=2) == 3
        with sessions.begin() as session:
            assert [c.id for c in store.changes_after(session, after=0, upto=5)] == [4, 5]
            assert store.last_change_id(session) == 5


def test_deployment_settings(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        assert store.get_setting(session, key="threshold") is None
        store.set_setting(session, key="threshold", value=0.36, source="default")
    with sessions.begin() as session:
        store.set_setting(session, key="threshold", value={"value": 0.31, "far": 0.001}, source="calibration")
    with sessions.begin() as session:
        record = store.get_setting(session, key="threshold")
        assert record is not None
        assert (record.value, record.source) == ({"value": 0.31, "far": 0.001}, "calibration")
        assert store.delete_setting(session, key="threshold") is True
        assert store.get_setting(session, key="threshold") is None
