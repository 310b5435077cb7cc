"""Gallery on both databases: several Gallery objects on one database stand for several workers."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event, text

import app.gallery as gallery_module
from app.errors import ShuttingDown, UnknownFace, UnknownIdentity
from app.gallery import DeletionReport, DuplicateFace, DuplicateGuard, Gallery, db, store
from app.gallery.index import GalleryIndex
from app.vision.types import Box
from tests.gallery.conftest import MODEL, random_embeddings

BOX = Box(0, 0, 99, 99)
OpenGallery = Callable[..., Gallery]


def _face_rows(gallery: Gallery) -> set[str]:
    with gallery.engine.connect() as connection:
        return set(connection.execute(text("SELECT id FROM faces")).scalars())


def test_enrolled_face_is_searchable_when_enroll_returns(gallery: Gallery) -> None:
    vector = random_embeddings(np.random.default_rng(0), 1)[0]
    enrolment = gallery.enroll_face(embedding=vector, box=BOX, score=2.0, name="Ada", metadata={"k": "v"})
    assert enrolment.identity_created
    # No refresh: this process's index took the change right after the commit.
    best = gallery.search(vector[np.newaxis], top_k=1, refresh=False)[0][0]
    assert (best.identity_id, best.face_id, best.distance) == (enrolment.identity_id, enrolment.face.id, 0.0)
    second = gallery.enroll_face(embedding=vector * 0.9, box=BOX, score=1.0, identity_id=enrolment.identity_id)
    assert not second.identity_created
    face_ids, distances = gallery.identity_distances(vector, enrolment.identity_id, refresh=False)
    assert face_ids == [enrolment.face.id, second.face.id] and distances[0] == 0.0
    identity = gallery.get_identity(enrolment.identity_id)
    assert (identity.name, identity.metadata, identity.face_count) == ("Ada", {"k": "v"}, 2)


def test_enroll_face_arguments(gallery: Gallery) -> None:
    vector = np.zeros(128, dtype=np.float32)
    with pytest.raises(ValueError):
        gallery.enroll_face(embedding=vector, box=BOX, score=1, name="a", identity_id="0" * 32)
    with pytest.raises(ValueError):
        gallery.enroll_face(embedding=vector, box=BOX, score=1)
    with pytest.raises(UnknownIdentity):
        gallery.enroll_face(embedding=vector, box=BOX, score=1, identity_id="0" * 32)


def test_failed_enrolment_leaves_database_and_index_untouched(gallery: Gallery) -> None:
    with pytest.raises(ValueError):
        gallery.enroll_face(embedding=np.zeros(3), box=BOX, score=1, name="half-written")
    with pytest.raises(UnknownIdentity):
        gallery.enroll_face(embedding=np.zeros(128), box=BOX, score=1, identity_id="f" * 32)
    assert gallery.list_identities() == ([], 0, None, 0)
    assert _face_rows(gallery) == set()
    assert gallery.refresh().applied == 0
    assert gallery.stats().size == 0 and gallery.stats().last_change_id == 0


def test_stop_writes_refuses_later_commits_and_waits_for_one_under_way(gallery: Gallery) -> None:
    """Shutdown (FaceService.close): the transactions of requests cut at the shutdown timeout must not commit
    afterwards, and stop_writes returns only once a commit already under way has ended."""
    vectors = random_embeddings(np.random.default_rng(7), 3)
    in_commit, release = threading.Event(), threading.Event()

    def slow_commit(_connection: object) -> None:
        if not in_commit.is_set():
            in_commit.set()
            assert release.wait(timeout=30)

    event.listen(gallery.engine, "commit", slow_commit)
    enrolled: list[str] = []
    writer = threading.Thread(
        target=lambda: enrolled.append(gallery.enroll_face(embedding=vectors[0], box=BOX, score=1, name="Ada").face.id)
    )
    writer.start()
    assert in_commit.wait(timeout=30)
    stopper = threading.Thread(target=gallery.stop_writes)
    stopper.start()
    stopper.join(timeout=0.3)
    assert stopper.is_alive()  # waits for Ada's commit
    release.set()
    stopper.join(timeout=30)
    writer.join(timeout=30)
    assert not stopper.is_alive() and len(enrolled) == 1

    with pytest.raises(ShuttingDown):
        with gallery.session() as session:  # begun before the stop, would commit after it
            store.create_identity(session, name="Bob")
    with pytest.raises(ShuttingDown):
        gallery.enroll_face(embedding=vectors[1], box=BOX, score=1, name="Cy")
    assert _face_rows(gallery) == set(enrolled)
    with gallery.engine.connect() as connection:
        assert list(connection.execute(text("SELECT name FROM identities")).scalars()) == ["Ada"]
    assert gallery.stats().size == 1


def test_workers_see_each_others_enrolments_and_deletions(open_gallery: OpenGallery) -> None:
    rng = np.random.default_rng(1)
    worker_a, worker_b = open_gallery(), open_gallery()
    vectors = random_embeddings(rng, 3)
    ada = worker_a.enroll_face(embedding=vectors[0], box=BOX, score=1, name="Ada")
    bob = worker_b.enroll_face(embedding=vectors[1], box=BOX, score=1, name="Bob")
    bob2 = worker_b.enroll_face(embedding=vectors[2], box=BOX, score=1, identity_id=bob.identity_id)

    # Before a refresh each worker only knows its own writes; search() refreshes by default.
    assert worker_a.index.face_ids() == {ada.face.id}
    assert worker_a.search(vectors[1], top_k=1)[0][0].identity_id == bob.identity_id
    for worker in (worker_a, worker_b):
        worker.refresh()
        assert worker.index.face_ids() == {ada.face.id, bob.face.id, bob2.face.id} == _face_rows(worker)
        assert worker.stats().identities == 2

    report = worker_a.delete_face(bob.identity_id, bob.face.id)
    assert report.face_ids == (bob.face.id,)
    assert [c.face_id for c in worker_b.search(vectors[1], top_k=2)[0] if c.identity_id == bob.identity_id] == [
        bob2.face.id
    ]
    worker_b.delete_identity(ada.identity_id)
    assert [c.identity_id for c in worker_a.search(vectors[0], top_k=5)[0]] == [bob.identity_id]
    with pytest.raises(UnknownIdentity):
        worker_a.identity_distances(vectors[0], ada.identity_id)
    with pytest.raises(UnknownIdentity):
        worker_a.get_identity(ada.identity_id)
    for worker in (worker_a, worker_b):
        assert worker.index.face_ids() == {bob2.face.id} == _face_rows(worker)
        worker.refresh()
        assert worker.stats().last_change_id == 5


def test_deleted_faces_are_gone_from_rows_index_and_log(gallery: Gallery) -> None:
    vectors = random_embeddings(np.random.default_rng(2), 2)
    first = gallery.enroll_face(embedding=vectors[0], box=BOX, score=1, name="Gone", image=b"photo-bytes")
    gallery.enroll_face(embedding=vectors[1], box=BOX, score=1, identity_id=first.identity_id)
    report = gallery.delete_identity(first.identity_id)
    assert report.identity_deleted and len(report.face_ids) == 2
    assert gallery.search(vectors, top_k=3, refresh=False) == [[], []]
    with gallery.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM faces")).scalar_one() == 0
        assert connection.execute(text("SELECT count(*) FROM identities")).scalar_one() == 0
        log = connection.execute(text("SELECT op, face_id FROM gallery_changes ORDER BY id")).all()
    assert [op for op, _ in log] == ["add", "add", "remove", "remove"]
    with pytest.raises(UnknownIdentity):
        gallery.delete_identity(first.identity_id)
    with pytest.raises(UnknownIdentity):
        gallery.delete_face(first.identity_id, report.face_ids[0])


def test_identity_without_searchable_faces(gallery: Gallery) -> None:
    identity = gallery.create_identity(name="No faces yet")
    face_ids, distances = gallery.identity_distances(np.zeros(128), identity.id)
    assert face_ids == [] and distances.shape == (0,)


def test_model_version_change_is_counted_not_mixed(open_gallery: OpenGallery) -> None:
    vectors = random_embeddings(np.random.default_rng(3), 2)
    old = open_gallery("model-v1")
    enrolment = old.enroll_face(embedding=vectors[0], box=BOX, score=1, name="Old")
    new = open_gallery("model-v2")
    assert (new.stats().size, new.stats().stale) == (0, 1)
    assert new.search(vectors[0], top_k=3) == [[]]
    assert new.identity_distances(vectors[0], enrolment.identity_id)[0] == []  # exists, nothing comparable
    fresh = new.enroll_face(embedding=vectors[1], box=BOX, score=1, identity_id=enrolment.identity_id)
    assert [f.model_version for f in new.get_identity(enrolment.identity_id).faces] == ["model-v1", "model-v2"]
    old.refresh()
    assert (old.stats().size, old.stats().stale) == (1, 1)
    assert old.search(vectors[1], top_k=3)[0][0].face_id == enrolment.face.id
    new.delete_face(enrolment.identity_id, enrolment.face.id)
    assert (new.stats().size, new.stats().stale) == (1, 0)  # own removal applied locally ...
    new.refresh()
    assert (new.stats().size, new.stats().stale) == (1, 0)  # ... and replayed without change
    old.refresh()
    assert (old.stats().size, old.stats().stale) == (0, 1)
    assert fresh.face.model_version == "model-v2"


def test_pruned_log_or_reset_database_means_full_reload(open_gallery: OpenGallery) -> None:
    rng = np.random.default_rng(4)
    writer, reader = open_gallery(), open_gallery()
    for vector in random_embeddings(rng, 3):
        writer.enroll_face(embedding=vector, box=BOX, score=1, name="x")
    with writer.session() as session:
        assert store.prune_changes(session, keep_last=1) == 2
    report = reader.refresh()
    assert report.reloaded
    assert reader.index.face_ids() == _face_rows(reader) and reader.stats().size == 3
    assert reader.refresh().applied == 0 and not reader.refresh().reloaded

    # A database restored from an older backup: the log is behind the index.
    with writer.engine.begin() as connection:
        connection.execute(text("DELETE FROM faces"))
        connection.execute(text("DELETE FROM identities"))
        connection.execute(text("DELETE FROM gallery_changes"))
        connection.execute(text("UPDATE gallery_state SET last_change_id = 1"))
    report = reader.refresh()
    assert report.reloaded and reader.stats().size == 0 and reader.stats().last_change_id == 1


def test_replay_batch_read_before_a_local_delete_cannot_resurrect_the_face(open_gallery: OpenGallery) -> None:
    """Interleaving of a refresh in one thread with a delete in another, step by step."""
    writer, worker = open_gallery(), open_gallery()
    vector = random_embeddings(np.random.default_rng(5), 1)[0]
    enrolment = writer.enroll_face(embedding=vector, box=BOX, score=1, name="x")
    with worker.session() as session:
        batch = worker.index.fetch(session)  # the refresh reads the 'add' (with its embedding) ...
    assert batch is not None and [c.op for c in batch.changes] == [store.ChangeOp.ADD]
    worker.delete_identity(enrolment.identity_id)  # ... another thread deletes and applies the removal ...
    assert worker.index.replay(batch)  # ... then the refresh applies its stale batch
    assert not worker.index.contains(enrolment.face.id)
    worker.refresh()
    assert isinstance(worker.index, GalleryIndex)
    assert worker.index.face_ids() == set() and worker.index._pending_removed == {}


def test_late_local_apply_after_a_replay_is_ignored(open_gallery: OpenGallery) -> None:
    """A worker commits an enrolment but applies it to its index only after another worker deleted the face
    and its own refresh replayed both: the late apply must not bring the face back."""
    worker, other = open_gallery(), open_gallery()
    sessions = db.make_session_factory(worker.engine)
    vector = random_embeddings(np.random.default_rng(6), 1)[0]
    with sessions() as session:
        with session.begin():
            identity = store.create_identity(session, name="x")
            store.add_face(session, identity_id=identity.id, embedding=vector, model_version=MODEL, box=BOX, score=1)
        late = store.take_pending_changes(session)
    other.delete_identity(identity.id)
    worker.refresh()
    worker.index.apply(late)
    assert worker.index.face_ids() == set()


def test_concurrent_writers_and_readers_agree_with_the_database(open_gallery: OpenGallery) -> None:
    """Two workers, three threads each: enrol, add, delete and search at once, while faces are added to a shared
    identity that all threads try to delete. Afterwards every worker's index equals the database, which equals
    what the successful calls say."""
    workers = [open_gallery(), open_gallery()]
    shared = workers[0].enroll_face(embedding=np.full(128, 0.01), box=BOX, score=1, name="shared")
    added: dict[str, str] = {shared.face.id: shared.identity_id}  # face -> identity, from successful calls
    removed: set[str] = set()
    lock = threading.Lock()
    errors: list[BaseException] = []
    shared_deletions: list[DeletionReport] = []
    barrier = threading.Barrier(6)

    def run(worker: Gallery, thread_no: int) -> None:
        rng = np.random.default_rng(100 + thread_no)
        mine: list[tuple[str, str]] = []
        try:
            barrier.wait(timeout=30)
            for step in range(12):
                vector = random_embeddings(rng, 1)[0]
                if step % 4 == 3 and mine:
                    identity_id, face_id = mine.pop(0)
                    worker.delete_face(identity_id, face_id)
                    with lock:
                        removed.add(face_id)
                    continue
                if step in (5, 9) and thread_no % 2:
                    target: str | None = shared.identity_id
                elif step % 4 == 1 and mine:
                    target = mine[-1][0]
                else:
                    target = None
                try:
                    if target is None:
                        enrolment = worker.enroll_face(embedding=vector, box=BOX, score=1, name=f"t{thread_no}-{step}")
                    else:
                        enrolment = worker.enroll_face(embedding=vector, box=BOX, score=1, identity_id=target)
                except UnknownIdentity:
                    assert target == shared.identity_id  # deleted by another thread first
                    continue
                with lock:
                    added[enrolment.face.id] = enrolment.identity_id
                if target != shared.identity_id:
                    mine.append((enrolment.identity_id, enrolment.face.id))
                for candidate in worker.search(vector, top_k=3)[0]:
                    assert len(candidate.face_id) == 32
                if step == 6 and thread_no % 2 == 0:
                    try:
                        report = worker.delete_identity(shared.identity_id)
                    except UnknownIdentity:
                        continue
                    with lock:
                        shared_deletions.append(report)
                        removed.update(report.face_ids)
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(workers[i % 2], i)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert len(shared_deletions) == 1
    assert set(shared_deletions[0].face_ids) == {f for f, i in added.items() if i == shared.identity_id}
    expected = {face: identity for face, identity in added.items() if face not in removed}
    rows = _face_rows(workers[0])
    assert rows == set(expected)
    for worker in workers:
        worker.refresh()
        assert worker.index.face_ids() == rows
        assert worker.stats().identities == len(set(expected.values()))
    with workers[0].engine.connect() as connection:
        ids = list(connection.execute(text("SELECT id FROM gallery_changes ORDER BY id")).scalars())
    assert ids == list(range(1, len(ids) + 1))  # gap-free


def test_unknown_face_and_settings(gallery: Gallery) -> None:
    enrolment = gallery.enroll_face(embedding=np.zeros(128), box=BOX, score=1, name="x")
    with pytest.raises(UnknownFace):
        gallery.delete_face(enrolment.identity_id, "0" * 32)
    assert gallery.get_setting("threshold") is None
    gallery.set_setting("threshold", 0.3, source="calibration")
    setting = gallery.get_setting("threshold")
    assert setting is not None and (setting.value, setting.source) == (0.3, "calibration")
    gallery.ping()
    assert gallery.backend in {"sqlite", "postgresql"}


def test_concurrent_settings_writes_and_deletions_all_succeed(open_gallery: OpenGallery) -> None:
    """Concurrent `POST /calibrate apply=true` and `DELETE /calibration` from several workers: the settings write read
    the row, then inserted or updated it unlocked, so two writers both inserted (unique key) or a deletion in between
    left the update matching no row (StaleDataError): 500s. Under the gallery's write lock every one succeeds and the
    last write wins."""
    workers = [open_gallery() for _ in range(4)]
    failures: list[BaseException] = []
    start = threading.Barrier(len(workers))

    def hammer(k: int, worker: Gallery) -> None:
        start.wait()
        try:
            for round_no in range(15):
                if k % 2 and round_no % 3 == 0:
                    worker.delete_setting("threshold")
                else:
                    worker.set_setting("threshold", {"threshold": 0.3 + k / 100}, source=f"worker {k}")
        except BaseException as error:  # noqa: BLE001 - any failure is the finding
            failures.append(error)

    threads = [threading.Thread(target=hammer, args=(k, w)) for k, w in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    workers[0].set_setting("threshold", {"threshold": 0.31}, source="last")
    setting = workers[1].get_setting("threshold")
    assert setting is not None and (setting.value, setting.source) == ({"threshold": 0.31}, "last")


def test_bulk_enrol_matches_single_enrolments(open_gallery: OpenGallery) -> None:
    seeder, worker = open_gallery(), open_gallery()
    vectors = random_embeddings(np.random.default_rng(8), 50)
    single = seeder.enroll_face(embedding=vectors[0], box=BOX, score=1, name="first")
    records = seeder.bulk_enrol(names=[f"p{i}" for i in range(49)], embeddings=vectors[1:])
    assert len({r.identity_id for r in records}) == 49
    assert seeder.index.face_ids() == {single.face.id} | {r.id for r in records} == _face_rows(seeder)
    assert worker.refresh().applied == 50
    assert worker.index.face_ids() == _face_rows(worker)
    got = worker.search(vectors[1:4], top_k=1)
    assert [g[0].face_id for g in got] == [r.id for r in records[:3]]
    assert worker.get_identity(records[0].identity_id).name == "p0"
    with worker.engine.connect() as connection:
        ids = list(connection.execute(text("SELECT id FROM gallery_changes ORDER BY id")).scalars())
    assert ids == list(range(1, 51))
    with pytest.raises(ValueError):
        seeder.bulk_enrol(names=["a", "b"], embeddings=vectors[:3])
    assert seeder.list_identities()[1] == 50


def test_change_log_is_pruned_as_it_grows_and_a_lagging_worker_reloads(open_gallery: OpenGallery) -> None:
    """Every `prune_every` changes the log keeps only its last `keep_changes` rows (it does not grow forever); a
    worker that fell behind the pruned part notices the gap and reloads in full."""
    rng = np.random.default_rng(5)
    writer, lagging = open_gallery(), open_gallery()
    writer.prune_every, writer.keep_changes = 4, 2
    enrolled = [writer.enroll_face(embedding=v, box=BOX, score=1, name="x") for v in random_embeddings(rng, 9)]
    writer.delete_face(enrolled[0].identity_id, enrolled[0].face.id)  # change 10
    with writer.engine.connect() as connection:
        ids = [row[0] for row in connection.execute(text("SELECT id FROM gallery_changes ORDER BY id"))]
    assert ids == [7, 8, 9, 10]  # pruned at change 8 (to 7, 8); 9 and 10 came after
    report = lagging.refresh()
    assert report.reloaded
    assert lagging.index.face_ids() == _face_rows(lagging) and lagging.stats().size == 8


def test_faces_of_an_earlier_build_of_the_same_model_are_adopted(open_gallery: OpenGallery) -> None:
    """A converter upgrade that keeps the embeddings (within the parity tolerance) relabels the stored faces instead
    of leaving them stale; versions not listed stay stale."""
    rng = np.random.default_rng(6)
    vectors = random_embeddings(rng, 3)
    old = open_gallery("model+onnx2-aaaaaaaaaaaa")
    kept = [old.enroll_face(embedding=v, box=BOX, score=1, name="x") for v in vectors[:2]]
    other = open_gallery("other-model")
    other.enroll_face(embedding=vectors[2], box=BOX, score=1, name="y")
    assert open_gallery("model+onnx-bbbbbbbbbbbb").stats().stale == 3  # not adopted: reported stale

    new = Gallery.open(old.engine.url.render_as_string(hide_password=False), "model+onnx-bbbbbbbbbbbb",
                       adopt=["model+onnx2-aaaaaaaaaaaa"])  # fmt: skip
    try:
        assert (new.stats().size, new.stats().stale) == (2, 1)
        assert new.search(vectors[0], top_k=1)[0][0].face_id == kept[0].face.id
        assert new.adopt_versions(["model+onnx2-aaaaaaaaaaaa"]) == 0  # idempotent: every worker may run it
    finally:
        new.close()


def test_workers_already_running_search_the_faces_another_worker_adopted(open_gallery: OpenGallery) -> None:
    """A worker started on an upgraded build relabels an earlier build's faces; the workers already running held them
    as stale and no change told them otherwise: they answered without those faces until restarted, while the new
    worker found them. The relabelling moves the log's head on, so every running index reloads."""
    vectors = random_embeddings(np.random.default_rng(9), 2)
    current = open_gallery("model+onnx-bbbbbbbbbbbb")
    running = open_gallery("model+onnx-bbbbbbbbbbbb")
    current.enroll_face(embedding=vectors[0], box=BOX, score=1, name="current")
    late = open_gallery("model+onnx2-aaaaaaaaaaaa").enroll_face(embedding=vectors[1], box=BOX, score=1, name="late")
    running.refresh()
    assert (running.stats().size, running.stats().stale) == (1, 1)  # an earlier build's face: not searched
    assert current.adopt_versions(["model+onnx2-aaaaaaaaaaaa"]) == 1  # as a worker starting on the new build
    for worker in (running, current):
        assert worker.search(vectors[1], top_k=1)[0][0].face_id == late.face.id
        assert (worker.stats().size, worker.stats().stale) == (2, 0)


def test_a_write_brings_the_index_up_to_the_changes_before_its_own(open_gallery: OpenGallery) -> None:
    """A write that searches nothing first (a deletion) applied only its own change: the index then held a later
    change without the earlier ones of other workers, and the facegate_gallery_faces gauge (the index changed last)
    showed a count the database never had. It replays them right after its commit."""
    vectors = random_embeddings(np.random.default_rng(10), 3)
    a, b = open_gallery(), open_gallery()
    gone = a.enroll_face(embedding=vectors[0], box=BOX, score=1, name="gone")
    b.refresh()
    a.enroll_face(embedding=vectors[1], box=BOX, score=1, name="new")  # b has not seen it
    b.delete_identity(gone.identity_id)
    assert b.stats().size == 1 == len(_face_rows(b))
    a.refresh()
    assert b.stats().last_change_id == a.stats().last_change_id == 3  # add, add, remove: all replayed


def test_duplicate_guard_sees_faces_added_after_the_callers_search(open_gallery: OpenGallery) -> None:
    """Two workers enrol one new face at once: both searched before either wrote. Under the write lock the second
    sees the first's face (added after its search) and writes nothing; another model's face, a far face, or a
    face already removed do not count."""
    first, second = open_gallery(), open_gallery()
    other_model = open_gallery("other-model")
    rng = np.random.default_rng(7)
    face, far, removed = random_embeddings(rng, 3)
    second.refresh()
    checked = second.stats().last_change_id  # second's search: nobody near
    guard = DuplicateGuard(threshold=0.36, checked_upto=checked)
    first_id = first.enroll_face(embedding=face, box=BOX, score=1, name="first").identity_id
    other_model.enroll_face(embedding=face, box=BOX, score=1, name="other model")
    gone = first.enroll_face(embedding=removed, box=BOX, score=1, name="removed")
    first.delete_identity(gone.identity_id)
    with pytest.raises(DuplicateFace) as caught:
        second.enroll_face(embedding=face * 1.01, box=BOX, score=1, name="second", unless_near=guard)
    assert caught.value.identity_id == first_id
    assert caught.value.distance == pytest.approx(float(((face * 0.01) ** 2).sum()), rel=1e-4)
    assert sorted(i.name for i in second.list_identities()[0]) == ["first", "other model"]  # nothing written
    # A face far from everything added since passes; so does the removed one's embedding.
    assert second.enroll_face(embedding=far, box=BOX, score=1, name="far", unless_near=guard).identity_created
    assert second.enroll_face(embedding=removed, box=BOX, score=1, name="again", unless_near=guard).identity_created


def test_the_same_face_sent_twice_at_once_is_stored_once(open_gallery: OpenGallery) -> None:
    """Two workers get the same "add this face" at once (a client retrying while its first request still runs):
    both checked the identity's faces before either wrote. Under the write lock the second finds the first's face
    and writes nothing; another model's face, or a face of another identity, does not count."""
    first, second, other_model = open_gallery(), open_gallery(), open_gallery("other-model")
    rng = np.random.default_rng(9)
    face, other = random_embeddings(rng, 2)
    amy = first.enroll_face(embedding=other, box=BOX, score=1, name="Amy").identity_id
    bob = first.enroll_face(embedding=face, box=BOX, score=1, name="Bob")
    other_amy = other_model.enroll_face(embedding=face, box=BOX, score=1, name="Amy (other model)").identity_id
    other_model.enroll_face(embedding=face, box=BOX, score=1, identity_id=other_amy)
    barrier = threading.Barrier(2)
    results = []

    def add(gallery: Gallery) -> None:
        barrier.wait()
        results.append(gallery.enroll_face(embedding=face, box=BOX, score=1, identity_id=amy, same_face_within=1e-4))

    workers = [threading.Thread(target=add, args=(g,)) for g in (first, second)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert sorted(r.face_added for r in results) == [False, True]
    stored = next(r.face for r in results if r.face_added)
    assert next(r.face for r in results if not r.face_added).id == stored.id
    assert len(first.get_identity(amy).faces) == 2  # her first face, and this one
    assert bob.face.id not in {r.face.id for r in results}
    # Without the option a face is added whatever it is near (callers that mean it: bulk tools, tests).
    assert second.enroll_face(embedding=face, box=BOX, score=1, identity_id=amy).face_added
    assert len(first.get_identity(amy).faces) == 3


def test_duplicate_guard_compares_every_face_when_the_log_was_pruned(open_gallery: OpenGallery) -> None:
    writer, checker = open_gallery(), open_gallery()
    writer.prune_every, writer.keep_changes = 2, 1
    rng = np.random.default_rng(8)
    vectors = random_embeddings(rng, 4)
    for k, v in enumerate(vectors):
        writer.enroll_face(embedding=v, box=BOX, score=1, name=f"p{k}")
    with pytest.raises(DuplicateFace):  # changes 1..3 are pruned: the guard reads every stored face instead
        checker.enroll_face(
            embedding=vectors[0], box=BOX, score=1, name="dup", unless_near=DuplicateGuard(0.36, checked_upto=0)
        )


def test_sqlite_keeps_no_copy_of_erased_data(tmp_path: Path) -> None:
    """Deleting a face or an identity, or renaming one, leaves none of the old bytes in the database file or its
    WAL (secure_delete zeroes the rows; the WAL is checkpointed and truncated)."""
    url = f"sqlite:///{tmp_path / 'g.db'}"
    gallery = Gallery.open(url, MODEL)
    try:
        vector = random_embeddings(np.random.default_rng(3), 2)
        kept = gallery.enroll_face(embedding=vector[1], box=BOX, score=1, name="Kept Person")
        erased = gallery.enroll_face(
            embedding=vector[0], box=BOX, score=1, name="Zebediah Scrubwell", metadata={"badge": "marker-7f3a"}
        )
        extra = gallery.enroll_face(
            embedding=vector[0] * 0.9, box=BOX, score=1, identity_id=kept.identity_id, image=b"PHOTO-BYTES-91c2" * 64
        )
        gallery.update_identity(kept.identity_id, name="Renamed Person")
        gallery.delete_face(kept.identity_id, extra.face.id)
        gallery.delete_identity(erased.identity_id)
        blobs = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("g.db"))
        for secret in (b"Zebediah", b"marker-7f3a", b"PHOTO-BYTES-91c2", b"Kept Person", vector[0].tobytes()[:64]):
            assert secret not in blobs, secret
        assert b"Renamed Person" in blobs  # what was not erased is still there
        wal = tmp_path / "g.db-wal"
        assert not wal.exists() or wal.stat().st_size == 0
    finally:
        gallery.close()


def test_a_new_sqlite_gallery_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """SQLite creates a missing file world-readable (0644): names and embeddings open to every local user. facegate
    creates it 0600 first, and the -wal and -shm files SQLite makes beside it take its mode."""
    previous = os.umask(0o022)  # the usual umask, whatever the test runner's
    gallery = Gallery.open(f"sqlite:///{tmp_path / 'g.db'}", MODEL)
    try:
        gallery.enroll_face(embedding=random_embeddings(np.random.default_rng(4), 1)[0], box=BOX, score=1, name="A")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        gallery.close()
        os.umask(previous)
    assert {"g.db", "g.db-wal", "g.db-shm"} <= modes.keys()
    assert set(modes.values()) == {0o600}, modes


def test_an_existing_sqlite_file_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    path.touch(mode=0o640)
    path.chmod(0o640)  # an operator's choice (a group that reads backups) is left alone
    Gallery.open(f"sqlite:///{path}", MODEL).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.postgres
def test_a_deletion_removes_the_pgvector_mirrors_rows_whatever_backend_runs(pg_schema_url: str) -> None:
    """pgvector's `face_vectors` holds a copy of every embedding. Only a pgvector worker's index removed a deleted
    face's row, so a deletion made while none ran (the service moved back to the exact backend, a command) left it
    there for good. The deletion's own transaction deletes those rows now. (A plain table of the same name and key
    stands in for the mirror: what is checked is the DELETE, which the pgvector tests cover with the extension.)"""
    gallery = Gallery.open(pg_schema_url, MODEL)  # the exact backend
    try:
        vectors = random_embeddings(np.random.default_rng(13), 3)
        kept = gallery.enroll_face(embedding=vectors[0], box=BOX, score=1, name="Kept")
        erased = gallery.enroll_face(embedding=vectors[1], box=BOX, score=1, name="Erased")
        extra = gallery.enroll_face(embedding=vectors[2], box=BOX, score=1, identity_id=kept.identity_id)
        with gallery.engine.begin() as connection:
            connection.execute(text("CREATE TABLE face_vectors (face_id text PRIMARY KEY, embedding real[])"))
            for record, vector in ((kept, vectors[0]), (erased, vectors[1]), (extra, vectors[2])):
                connection.execute(
                    text("INSERT INTO face_vectors VALUES (:f, :e)"), {"f": record.face.id, "e": vector.tolist()}
                )
        gallery.delete_identity(erased.identity_id)
        gallery.delete_face(kept.identity_id, extra.face.id)
        with gallery.engine.connect() as connection:
            left = connection.execute(text("SELECT face_id FROM face_vectors")).scalars().all()
        assert left == [kept.face.id]
    finally:
        gallery.close()


def test_a_deletion_waits_only_briefly_for_a_long_reader_before_it_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: the checkpoint that cuts the WAL after a deletion waits for readers of older snapshots. It waited the
    whole busy timeout (30 s, now the lock timeout) behind a long read after the deletion was committed; now about
    a second, and the WAL is cut by a retry once the reader is gone (it waited for the next deletion or restart,
    days in a quiet gallery)."""
    monkeypatch.setattr(gallery_module, "SCRUB_RETRY_SECONDS", 0.2)
    path = tmp_path / "g.db"
    gallery = Gallery.open(f"sqlite:///{path}", MODEL, lock_timeout=20)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        vectors = random_embeddings(np.random.default_rng(5), 2)
        gallery.enroll_face(embedding=vectors[0], box=BOX, score=1, name="Kept Person")
        erased = gallery.enroll_face(embedding=vectors[1], box=BOX, score=1, name="Zebediah Scrubwell")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM faces").fetchone()  # a long read holds its snapshot
        started = time.monotonic()
        report = gallery.delete_identity(erased.identity_id)
        assert time.monotonic() - started < 5  # SCRUB_WAIT_MS, not the 20 s busy timeout
        assert report.identity_deleted and gallery.stats().size == 1
        time.sleep(0.6)  # retries while the reader holds its snapshot
        assert (path.parent / "g.db-wal").stat().st_size > 0  # the erased pages wait for the reader
        reader.execute("COMMIT")
        deadline = time.monotonic() + 10
        while (path.parent / "g.db-wal").stat().st_size > 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # nothing else is written or deleted: only the retry can cut it
        assert (path.parent / "g.db-wal").stat().st_size == 0
        assert b"Zebediah" not in b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("g.db"))
        with gallery.engine.connect() as connection:  # the requests' busy timeout is as it was
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 20_000
    finally:
        reader.close()
        gallery.close()
