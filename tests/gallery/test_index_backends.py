"""Search backends side by side: exact (GalleryIndex) and approximate (faiss IVF) on face-like synthetic galleries,
through changes, through the database's change log, and the bulk load/copy paths."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
import pytest
from sqlalchemy import func, select

from app.config import IndexBackend, IndexSettings
from app.gallery import Gallery, bulk, store, synthetic
from app.gallery.ann import ApproximateIndex, auto_nlist
from app.gallery.index import GalleryIndex, IdentityCandidate, create_index
from app.gallery.store import Change, ChangeOp
from app.gallery.tables import Face
from app.vision.types import Box

MODEL = "test-model-1"
GALLERY_FACES = 20_000


def _ids(n: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]


@pytest.fixture(scope="module")
def faces() -> tuple[synthetic.SyntheticGallery, list[str], list[str]]:
    gallery = synthetic.gallery(GALLERY_FACES, seed=3)
    identity_ids = _ids(len(gallery.centres))
    return gallery, _ids(GALLERY_FACES), [identity_ids[o] for o in gallery.owners]


def _adds(face_ids: list[str], owners: list[str], vectors: npt.NDArray[np.float32], first: int = 1) -> list[Change]:
    return [
        Change(first + i, ChangeOp.ADD, f, o, v, MODEL) for i, (f, o, v) in enumerate(zip(face_ids, owners, vectors))
    ]


def _pair(
    faces: tuple[synthetic.SyntheticGallery, list[str], list[str]], **options: int
) -> tuple[GalleryIndex, ApproximateIndex]:
    gallery, face_ids, owners = faces
    exact, approximate = GalleryIndex(MODEL), ApproximateIndex(MODEL, min_size=1000, **options)
    changes = _adds(face_ids, owners, gallery.embeddings)
    exact.apply(changes)
    approximate.apply(changes)
    return exact, approximate


def _top1(results: list[list[IdentityCandidate]]) -> list[str | None]:
    return [r[0].identity_id if r else None for r in results]


def test_auto_nlist_is_near_the_square_root() -> None:
    assert [auto_nlist(n) for n in (0, 1_000, 20_000, 100_000, 1_000_000, 10**8)] == [16, 32, 128, 256, 1024, 1024]


def test_approximate_top1_agrees_with_exact_and_never_beats_it(
    faces: tuple[synthetic.SyntheticGallery, list[str], list[str]],
) -> None:
    gallery, _, owners = faces
    exact, approximate = _pair(faces, nprobe=32)  # 32 of 128 cells: really approximate
    assert approximate.ivf_cells == auto_nlist(GALLERY_FACES) == 128
    queries, who = synthetic.probes(gallery, enrolled=300, strangers=100)
    want, got = exact.search(queries, top_k=5), approximate.search(queries, top_k=5)
    enrolled_agree = np.mean([a == b for a, b in zip(_top1(want)[:300], _top1(got)[:300])])
    assert enrolled_agree >= 0.99
    for w, g in zip(want, got):
        assert len(g) == 5 and len({c.identity_id for c in g}) == 5
        assert [c.distance for c in g] == sorted(c.distance for c in g)
        assert g[0].distance >= w[0].distance - 1e-6  # exact is the floor: the IVF can miss, never invent
    same_face = [g[0].face_id == w[0].face_id for w, g in zip(want[:300], got[:300])]
    assert np.mean(same_face) >= 0.99
    for w, g in zip(want, got):
        if g[0].face_id == w[0].face_id:  # the same face: the same exact distance
            assert g[0].distance == pytest.approx(w[0].distance, abs=1e-6)
    # The enrolled probes find their own identity (the data are separable at this size).
    found = [c[0].identity_id for c in got[:300]]
    assert np.mean([f == owners[int(np.flatnonzero(gallery.owners == w)[0])] for f, w in zip(found, who[:300])]) >= 0.99


def test_probing_every_cell_gives_exactly_the_exact_answer(
    faces: tuple[synthetic.SyntheticGallery, list[str], list[str]],
) -> None:
    gallery, _, _ = faces
    exact, approximate = _pair(faces, nprobe=128, candidates=400)
    queries, _ = synthetic.probes(gallery, enrolled=20, strangers=10, seed=5)
    for top_k in (1, 10, 150):  # 150: more identities than 400 candidate faces may hold -> exact fallback
        for w, g in zip(exact.search(queries, top_k=top_k), approximate.search(queries, top_k=top_k)):
            # to the last bit and in the same order, also where faces of different people are exactly as far from
            # a query (the synthetic gallery has such ties): equal distances go by identity id
            assert [(c.identity_id, c.face_id, c.distance) for c in g] == [
                (c.identity_id, c.face_id, c.distance) for c in w
            ]


def tied_gallery() -> tuple[list[str], list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Faces (ids, owners, vectors) with exact ties, and queries: three people enrolled with the same embedding, one
    person with the same face twice, among 120 others; the ids' sort order is not their enrolment order."""
    rng = np.random.default_rng(8)
    vectors = (rng.normal(size=(126, 128)) * 0.09).astype(np.float32)
    vectors[1:3] = vectors[0]  # people t2, t0, t1: the same face
    vectors[4] = vectors[3]  # t3's two faces
    owners = ["t2", "t0", "t1", "t3", "t3", *(f"p{i:03d}" for i in range(121))]
    face_ids = ["f9", "f5", "f7", "f4", "f2", *(f"g{i:03d}" for i in range(121))]
    noise = (rng.normal(size=(4, 128)) * 0.01).astype(np.float32)
    queries = np.concatenate([vectors[[0, 3]] + noise[:2], vectors[[0, 3]]])
    return face_ids, owners, vectors, queries


def check_tied_ranking(results: list[list[IdentityCandidate]]) -> None:
    """What `tied_gallery`'s queries must get from any backend, whatever the enrolment order."""
    for r in (results[0], results[2]):
        assert [(c.identity_id, c.face_id) for c in r[:3]] == [("t0", "f5"), ("t1", "f7"), ("t2", "f9")]
        assert r[0].distance == r[1].distance == r[2].distance < r[3].distance
    for r in (results[1], results[3]):
        assert (r[0].identity_id, r[0].face_id) == ("t3", "f2")  # the smaller id of its two equally near faces


@pytest.mark.parametrize("backend", ["exact", "approximate"])
def test_ties_are_ranked_by_identity_id_whatever_the_enrolment_order(backend: str) -> None:
    face_ids, owners, vectors, queries = tied_gallery()
    for order in (np.arange(len(face_ids)), np.arange(len(face_ids))[::-1]):
        index = GalleryIndex(MODEL) if backend == "exact" else ApproximateIndex(MODEL, min_size=10, nlist=4, nprobe=4, candidates=20)
        index.apply(_adds([face_ids[i] for i in order], [owners[i] for i in order], vectors[order]))
        check_tied_ranking(index.search(queries, top_k=5))


def test_more_tied_faces_than_candidates_are_ranked_by_identity_id() -> None:
    """The same face enrolled under more identities than the IVF proposes candidates: which of them faiss returned
    depended on the enrolment order; the answer must be exact search's (smallest identity ids)."""
    rng = np.random.default_rng(5)
    others = synthetic.faces_of(rng, synthetic.identity_centres(rng, 500))
    vectors = np.concatenate([np.repeat(others[:1], 100, axis=0), others[1:]])
    owners = [f"d{i:03d}" for i in range(100)] + _ids(499)
    face_ids = _ids(len(owners))
    expected = [f"d{i:03d}" for i in range(5)]
    for order in (np.arange(len(owners)), np.arange(len(owners))[::-1]):
        index = ApproximateIndex(MODEL, min_size=10, candidates=20)
        index.apply(_adds([face_ids[i] for i in order], [owners[i] for i in order], vectors[order]))
        assert index.ivf_cells
        assert [c.identity_id for c in index.search(vectors[0], top_k=5)[0]] == expected


@pytest.mark.parametrize("backend", ["exact", "approximate"])
def test_a_removed_face_leaves_the_workers_memory(backend: str) -> None:
    """Every worker holds the embeddings in memory for search: a removed face's stayed in the matrix until a
    compaction (1,024 dead rows and half of all rows dead: a large gallery never gets there before a restart)."""
    rng = np.random.default_rng(12)
    vectors = synthetic.faces_of(rng, synthetic.identity_centres(rng, 300))
    face_ids, owners = _ids(300), _ids(300)
    index = GalleryIndex(MODEL) if backend == "exact" else ApproximateIndex(MODEL, min_size=100, nprobe=64)
    index.apply(_adds(face_ids, owners, vectors))
    if isinstance(index, ApproximateIndex):  # and the last face of a cell, which faiss only cut off its list
        assert index._ivf is not None
        lists = index._ivf.index.invlists
        assert lists is not None
        sizes = [lists.list_size(cell) for cell in range(index._ivf.nlist)]
        last = faiss.rev_swig_ptr(lists.get_ids(0), sizes[0])[-1]
        gone = [5, 17, 250, int(last)]
    else:
        gone = [5, 17, 250]
    index.apply([Change(1000 + i, ChangeOp.REMOVE, face_ids[i], owners[i]) for i in gone])
    memory = index._vectors.tobytes()
    if isinstance(index, ApproximateIndex):
        assert lists is not None
        memory += b"".join(
            faiss.rev_swig_ptr(lists.get_codes(cell), size * lists.code_size).tobytes()
            for cell, size in enumerate(sizes)
        )
    for i in gone:
        assert vectors[i].tobytes() not in memory, i
    assert vectors[6].tobytes() in memory  # the others are still searched
    found = index.search(vectors[[5, 6, 17]], top_k=1)
    assert found[1][0].face_id == face_ids[6]
    assert not {c[0].face_id for c in found} & {face_ids[i] for i in gone}


def test_adds_and_removes_keep_the_backends_in_step(
    faces: tuple[synthetic.SyntheticGallery, list[str], list[str]],
) -> None:
    gallery, face_ids, owners = faces
    exact, approximate = _pair(faces, nprobe=32)
    rng = np.random.default_rng(11)
    queries, _ = synthetic.probes(gallery, enrolled=40, strangers=0, seed=7)
    next_id = GALLERY_FACES + 1
    # Remove the nearest face of every query: both must move to the next one.
    nearest = {c[0].face_id: c[0].identity_id for c in exact.search(queries, top_k=1)}
    removes = [Change(next_id + i, ChangeOp.REMOVE, f, o) for i, (f, o) in enumerate(nearest.items())]
    next_id += len(removes)
    for index in (exact, approximate):
        index.apply(removes)
        assert not any(index.contains(f) for f in nearest)
    # (A query whose person had one face is now a stranger's: the IVF may pick another near-tie.)
    after = zip(_top1(approximate.search(queries, top_k=1)), _top1(exact.search(queries, top_k=1)))
    assert np.mean([a == b for a, b in after]) >= 0.9
    assert not {c[0].face_id for c in approximate.search(queries, top_k=1)} & set(nearest)
    # New people enrolled right on the queries: both answer them at once.
    newcomers, new_faces = _ids(len(queries)), _ids(len(queries))
    adds = _adds(new_faces, newcomers, queries + rng.normal(0, 0.001, queries.shape).astype(np.float32), next_id)
    next_id += len(adds)
    for index in (exact, approximate):
        index.apply(adds)
    assert _top1(approximate.search(queries, top_k=1)) == newcomers == _top1(exact.search(queries, top_k=1))
    # Remove more than half of the gallery: storage is compacted, the IVF rebuilt over the renumbered rows.
    gone = [Change(next_id + i, ChangeOp.REMOVE, f, o) for i, (f, o) in enumerate(zip(face_ids[:12_000], owners))]
    for index in (exact, approximate):
        index.apply(gone)
    assert approximate.stats() == exact.stats() and approximate.face_ids() == exact.face_ids()
    assert approximate.ivf_cells > 0
    assert _top1(approximate.search(queries, top_k=1)) == newcomers
    probe_rest, _ = synthetic.probes(gallery, enrolled=100, strangers=0, seed=9)
    agree = np.mean([a == b for a, b in zip(_top1(exact.search(probe_rest, top_k=1)), _top1(approximate.search(probe_rest, top_k=1)))])
    assert agree >= 0.98


def test_fewer_identities_than_top_k_still_use_the_ivf(monkeypatch: pytest.MonkeyPatch) -> None:
    """The IVF's candidates must hold top_k identities, or as many as the gallery has: counted in faces, a gallery of
    fewer people than top_k (many faces each) was searched exactly every time."""
    rng = np.random.default_rng(4)
    vectors = synthetic.faces_of(rng, np.repeat(synthetic.identity_centres(rng, 3), 400, axis=0))
    people = _ids(3)
    face_ids, owners = _ids(1200), [people[i // 400] for i in range(1200)]
    exact, approximate = GalleryIndex(MODEL), ApproximateIndex(MODEL, min_size=100, nlist=4, nprobe=4, candidates=1000)
    for index in (exact, approximate):
        index.apply(_adds(face_ids, owners, vectors))
    expected = exact.search(vectors[:5], top_k=5)
    exact_searches: list[int] = []
    plain = GalleryIndex._search

    def counted(self: GalleryIndex, snap: Any, q: npt.NDArray[np.float32], top_k: int) -> list[list[IdentityCandidate]]:
        exact_searches.append(len(q))
        return plain(self, snap, q, top_k)

    monkeypatch.setattr(GalleryIndex, "_search", counted)
    found = approximate.search(vectors[:5], top_k=5)
    assert exact_searches == []  # every query answered from the IVF's candidates
    assert [[(c.identity_id, c.face_id) for c in r] for r in found] == [[(c.identity_id, c.face_id) for c in r] for r in expected]
    assert all(len(r) == 3 for r in found)


def test_small_galleries_are_searched_exactly_until_min_size() -> None:
    rng = np.random.default_rng(2)
    index = ApproximateIndex(MODEL, min_size=500)
    vectors = synthetic.faces_of(rng, synthetic.identity_centres(rng, 600))
    face_ids, owners = _ids(600), _ids(600)
    index.apply(_adds(face_ids[:499], owners[:499], vectors[:499]))
    assert index.ivf_cells == 0 and index.ivf_bytes() == 0
    index.apply(_adds(face_ids[499:], owners[499:], vectors[499:], first=500))
    assert index.ivf_cells == auto_nlist(600) and index.ivf_bytes() > 600 * 512
    assert index.search(vectors[598], top_k=1)[0][0].face_id == face_ids[598]


def test_background_build_takes_in_the_changes_made_meanwhile(
    faces: tuple[synthetic.SyntheticGallery, list[str], list[str]],
) -> None:
    gallery, face_ids, owners = faces
    exact = GalleryIndex(MODEL)
    approximate = ApproximateIndex(MODEL, min_size=1000, nprobe=32, background_above=1000)
    changes = _adds(face_ids, owners, gallery.embeddings)
    queries, _ = synthetic.probes(gallery, enrolled=50, strangers=0, seed=13)
    exact.apply(changes)
    nearest = exact.search(queries[:10], top_k=1)
    removes = [Change(GALLERY_FACES + 1 + i, ChangeOp.REMOVE, c[0].face_id, c[0].identity_id) for i, c in enumerate(nearest)]
    newcomers, new_faces = _ids(10), _ids(10)
    adds = _adds(new_faces, newcomers, queries[10:20] + np.float32(0.001), first=GALLERY_FACES + 11)
    exact.apply(removes + adds)
    # The IVF is trained on its thread (for far longer than the next call takes): the gallery changes meanwhile,
    # and exact search answers until the IVF, brought up to date, takes over.
    approximate.apply(changes)
    approximate.apply(removes + adds)
    assert _top1(approximate.search(queries[10:20], top_k=1)) == newcomers
    assert approximate.wait_until_built(timeout=60)
    assert approximate.ivf_cells == auto_nlist(GALLERY_FACES)
    snap = approximate._snapshot()
    assert snap.extra.index.ntotal == approximate.stats().size == exact.stats().size  # adds in, removals out
    got = approximate.search(queries, top_k=1)
    assert [c[0].identity_id for c in got[10:20]] == newcomers
    assert not {c[0].face_id for c in got} & {c[0].face_id for c in nearest}
    assert np.mean([a == b for a, b in zip(_top1(got), _top1(exact.search(queries, top_k=1)))]) >= 0.96


def test_create_index_follows_the_settings() -> None:
    assert type(create_index(MODEL)) is GalleryIndex
    assert type(create_index(MODEL, IndexSettings(backend=IndexBackend.EXACT))) is GalleryIndex
    chosen = create_index(MODEL, IndexSettings(backend=IndexBackend.APPROXIMATE, min_size=7, nprobe=3, candidates=9))
    assert isinstance(chosen, ApproximateIndex) and (chosen.min_size, chosen.nprobe, chosen.candidates) == (7, 3, 9)
    assert chosen.backend == "approximate"
    with pytest.raises(ValueError, match="engine"):
        create_index(MODEL, IndexSettings(backend=IndexBackend.PGVECTOR))


# ------------------------------------------------------------------------------------- through the database

APPROXIMATE = IndexSettings(backend=IndexBackend.APPROXIMATE, min_size=1000, nprobe=8)


@pytest.fixture
def open_approximate(database_url: str) -> Iterator[Callable[[], Gallery]]:
    opened: list[Gallery] = []

    def _open() -> Gallery:
        gallery = Gallery.open(database_url, MODEL, index=APPROXIMATE)
        opened.append(gallery)
        return gallery

    yield _open
    for gallery in opened:
        gallery.close()


def test_change_log_sync_with_the_approximate_backend(open_approximate: Callable[[], Gallery]) -> None:
    seeded = synthetic.gallery(3000, faces_per_identity=1, seed=4)
    writer = open_approximate()
    records = writer.bulk_enrol(names=[f"p{i}" for i in range(3000)], embeddings=seeded.embeddings)
    reader = open_approximate()  # loads the 3000 faces: builds its IVF
    assert isinstance(reader.index, ApproximateIndex) and reader.index.ivf_cells == auto_nlist(3000)
    queries, who = synthetic.probes(seeded, enrolled=30, strangers=0, seed=8)
    face_of = np.argsort(seeded.owners)  # one face per identity: identity number -> its row in `records`
    expected = [records[int(face_of[w])].identity_id for w in who]
    assert [c[0].identity_id for c in reader.search(queries, top_k=1)] == expected
    # The writer deletes one person and enrols a new one; the reader replays both before its next search.
    victim = records[int(face_of[who[0]])]
    writer.delete_identity(victim.identity_id)
    newcomer = writer.create_identity(name="newcomer")
    fresh = writer.enroll_face(
        identity_id=newcomer.id, embedding=queries[1] + 0.001, box=Box(0, 0, 9, 9), score=1.0
    )
    results = reader.search(queries[:2], top_k=1)
    assert not reader.index.contains(victim.id)
    assert results[0][0].identity_id != victim.identity_id
    assert (results[1][0].identity_id, results[1][0].face_id) == (newcomer.id, fresh.face.id)
    writer.refresh()
    assert reader.stats() == writer.stats()
    assert reader.index.face_ids() == writer.index.face_ids()


@pytest.mark.postgres
def test_bulk_read_and_copy_on_postgres(pg_schema_url: str) -> None:
    gallery = Gallery.open(pg_schema_url, MODEL)
    try:
        seeded = synthetic.gallery(2000, seed=6)
        enrolled = gallery.bulk_enrol(names=["a", "b"], embeddings=seeded.embeddings[:2])
        with gallery.session() as session:
            identities, count = bulk.copy_synthetic_gallery(
                session, embeddings=seeded.embeddings, owners=seeded.owners, model_version=MODEL
            )
        assert (identities, count) == (len(seeded.centres), 2000)
        with gallery.session() as session:
            fast = bulk.read_faces(session)
            plain = store.all_faces(session)
            assert session.execute(select(func.count()).select_from(Face)).scalar_one() == 2002
        order_fast, order_plain = np.argsort(fast[0]), np.argsort(plain[0])
        assert [fast[0][i] for i in order_fast] == [plain[0][i] for i in order_plain]
        assert [fast[1][i] for i in order_fast] == [plain[1][i] for i in order_plain]
        np.testing.assert_array_equal(fast[3][order_fast], plain[3][order_plain])
        # The copy left no log entries, only a jump of the head: this worker sees the gap and reloads in full.
        report = gallery.refresh()
        assert report.reloaded and gallery.stats().size == 2002
        assert {r.id for r in enrolled} <= gallery.index.face_ids()
        queries, who = synthetic.probes(seeded, enrolled=10, strangers=0)
        names = gallery.identity_names(c[0].identity_id for c in gallery.search(queries, top_k=1))
        assert sorted(names.values()) == sorted(f"synthetic-{int(w):08d}" for w in who)
    finally:
        gallery.close()


@pytest.mark.postgres
def test_cli_load_synthetic_fills_a_postgres_gallery(pg_schema_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from app.cli import cli
    from app.config import Settings
    from app.vision.pipeline import Pipeline

    monkeypatch.setenv("FACEGATE_DATABASE_URL", pg_schema_url)
    result = CliRunner().invoke(cli, ["db", "load-synthetic", "--faces", "3000"])
    assert result.exit_code == 0, result.output
    identities = int(result.output.split(" faces of ")[1].split()[0])
    gallery = Gallery.open(pg_schema_url, Pipeline.from_settings(Settings()).model_version, index=APPROXIMATE)
    try:
        assert (gallery.stats().size, gallery.stats().identities) == (3000, identities)
        names = gallery.identity_names(c[0].identity_id for c in gallery.search(np.zeros((1, 128)), top_k=1))
        assert next(iter(names.values())).startswith("synthetic-")
    finally:
        gallery.close()


@pytest.mark.postgres
def test_cli_load_synthetic_twice_gives_no_name_twice(pg_schema_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every load named its identities from synthetic-00000000: a second load repeated the first one's names (the
    same seed, the same count). They are numbered on from the highest one stored."""
    from sqlalchemy import create_engine
    from typer.testing import CliRunner

    from app.cli import cli
    from app.gallery.tables import Identity

    monkeypatch.setenv("FACEGATE_DATABASE_URL", pg_schema_url)
    counts = []
    for seed in ("0", "0"):
        result = CliRunner().invoke(cli, ["db", "load-synthetic", "--faces", "40", "--seed", seed])
        assert result.exit_code == 0, result.output
        counts.append(int(result.output.split(" faces of ")[1].split()[0]))
    engine = create_engine(pg_schema_url)
    try:
        with engine.connect() as connection:
            names = connection.execute(select(Identity.name).order_by(Identity.name)).scalars().all()
    finally:
        engine.dispose()
    assert names == [f"synthetic-{n:08d}" for n in range(sum(counts))]


def test_few_faces_per_cell_are_said_in_the_log_not_by_faiss_on_stderr(
    faces: tuple[synthetic.SyntheticGallery, list[str], list[str]],
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """faiss wrote "WARNING clustering ... please provide at least ..." straight to stderr (past the logging, so past
    FACEGATE_LOG__FORMAT=json) when the cells got fewer than 39 training faces each: a small min_size or large nlist."""
    gallery, face_ids, owners = faces
    approximate = ApproximateIndex(MODEL, min_size=100, nlist=64)
    caplog.set_level("INFO", logger="app.gallery.ann")
    approximate.apply(_adds(face_ids[:500], owners[:500], gallery.embeddings[:500]))
    assert approximate.ivf_cells == 64
    assert "WARNING" not in capfd.readouterr().err
    assert "IVF: 500 faces for 64 cells (7.8 per cell, faiss suggests at least 39)" in caplog.text
    assert len(approximate.search(gallery.embeddings[:5], top_k=1)) == 5
