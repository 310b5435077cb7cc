"""GalleryIndex without a database: search against brute force, removals, compaction, stale faces."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import numpy.typing as npt
import pytest

from app.gallery.index import GalleryIndex, IdentityCandidate
from app.gallery.store import Change, ChangeOp
from tests.gallery.conftest import random_embeddings

MODEL = "m1"


def _ids(n: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]


def _filled(
    rng: np.random.Generator, n_identities: int, max_faces: int
) -> tuple[GalleryIndex, list[str], list[str], npt.NDArray[np.float32]]:
    identities = _ids(n_identities)
    owners = [identity for identity in identities for _ in range(int(rng.integers(1, max_faces + 1)))]
    rng.shuffle(owners)
    faces = _ids(len(owners))
    vectors = random_embeddings(rng, len(owners))
    index = GalleryIndex(MODEL)
    index.apply(
        [Change(i + 1, ChangeOp.ADD, f, o, v, MODEL) for i, (f, o, v) in enumerate(zip(faces, owners, vectors))]
    )
    return index, faces, owners, vectors


def _brute_force(
    query: npt.NDArray[np.float32], faces: list[str], owners: list[str], vectors: npt.NDArray[np.float32], top_k: int
) -> list[tuple[str, str, float]]:
    d = ((vectors.astype(np.float64) - query.astype(np.float64)) ** 2).sum(axis=1)
    best: dict[str, tuple[float, str]] = {}
    for face, owner, distance in zip(faces, owners, d):
        if owner not in best or distance < best[owner][0]:
            best[owner] = (float(distance), face)
    ranked = sorted(best.items(), key=lambda item: item[1][0])[:top_k]
    return [(owner, face, distance) for owner, (distance, face) in ranked]


def _assert_matches(got: list[IdentityCandidate], expected: list[tuple[str, str, float]]) -> None:
    assert len(got) == len(expected)
    # Same distances in the same order (float32 vs float64: 1e-5); each reported identity's distance is its
    # true minimum, reached at the reported face.
    np.testing.assert_allclose([c.distance for c in got], [e[2] for e in expected], rtol=0, atol=1e-5)
    truth = {owner: (face, distance) for owner, face, distance in expected}
    for candidate in got:
        if candidate.identity_id in truth:
            assert abs(truth[candidate.identity_id][1] - candidate.distance) <= 1e-5
    assert len({c.identity_id for c in got}) == len(got)
    assert [c.distance for c in got] == sorted(c.distance for c in got)


@pytest.mark.parametrize("top_k", [1, 3, 20, 1000])
def test_search_matches_brute_force(top_k: int) -> None:
    rng = np.random.default_rng(top_k)
    index, faces, owners, vectors = _filled(rng, n_identities=300, max_faces=6)
    assert (index.size, index.identities) == (len(faces), 300)
    # Queries near stored faces (small noise) and far from all.
    queries = np.concatenate([vectors[:5] + random_embeddings(rng, 5) * 0.3, random_embeddings(rng, 5)])
    results = index.search(queries, top_k=top_k)
    assert len(results) == len(queries)
    for query, got in zip(queries, results):
        _assert_matches(got, _brute_force(query, faces, owners, vectors, top_k))
    assert results[0][0].face_id == faces[0]  # the face the query was made from


def test_search_one_identity_with_many_faces_widens_the_window() -> None:
    rng = np.random.default_rng(7)
    crowd, loner = uuid.uuid4().hex, uuid.uuid4().hex
    vectors = random_embeddings(rng, 501)
    faces = _ids(501)
    owners = [crowd] * 500 + [loner]
    index = GalleryIndex(MODEL)
    index.apply(
        [Change(i + 1, ChangeOp.ADD, f, o, v, MODEL) for i, (f, o, v) in enumerate(zip(faces, owners, vectors))]
    )
    query = vectors[0]
    got = index.search(query[np.newaxis], top_k=5)[0]
    assert [c.identity_id for c in got] == [crowd, loner]
    _assert_matches(got, _brute_force(query, faces, owners, vectors, 5))


def test_reported_distance_is_the_direct_squared_l2() -> None:
    rng = np.random.default_rng(1)
    index, faces, _, vectors = _filled(rng, 50, 2)
    query = random_embeddings(rng, 1)[0]
    for candidate in index.search(query, top_k=10)[0]:
        row = faces.index(candidate.face_id)
        assert candidate.distance == float(((vectors[row] - query) ** 2).sum(dtype=np.float32))
    # A stored face against itself is exactly 0.
    assert index.search(vectors[3:4], top_k=1)[0][0].distance == 0.0


def test_identity_distances() -> None:
    rng = np.random.default_rng(2)
    index, faces, owners, vectors = _filled(rng, 20, 5)
    query = random_embeddings(rng, 1)[0]
    identity = owners[0]
    face_ids, distances = index.identity_distances(query, identity)
    rows = [i for i, o in enumerate(owners) if o == identity]
    expected = sorted(((vectors[i] - query) ** 2).sum(dtype=np.float32) for i in rows)
    assert sorted(face_ids) == sorted(faces[i] for i in rows)
    np.testing.assert_array_equal(distances, expected)
    assert index.identity_distances(query, uuid.uuid4().hex)[0] == []


def test_removals_and_compaction_keep_search_exact() -> None:
    rng = np.random.default_rng(3)
    index, faces, owners, vectors = _filled(rng, 1500, 2)  # ~2250 faces
    gone = set(rng.choice(len(faces), size=len(faces) * 2 // 3, replace=False).tolist())
    index.apply(
        [Change(10_000 + i, ChangeOp.REMOVE, faces[i], owners[i]) for i in sorted(gone)[: len(gone) // 2]]
    )  # some removed before compaction kicks in ...
    index.apply([Change(20_000 + i, ChangeOp.REMOVE, faces[i], owners[i]) for i in sorted(gone)])  # ... idempotent
    keep = [i for i in range(len(faces)) if i not in gone]
    assert index.size == len(keep)
    assert index.face_ids() == {faces[i] for i in keep}
    assert index.identities == len({owners[i] for i in keep})
    kept_faces = [faces[i] for i in keep]
    kept_owners = [owners[i] for i in keep]
    kept_vectors = vectors[keep]
    queries = np.concatenate([vectors[sorted(gone)[:3]], random_embeddings(rng, 3)])
    for query, got in zip(queries, index.search(queries, top_k=8)):
        assert not {c.face_id for c in got} & {faces[i] for i in gone}
        _assert_matches(got, _brute_force(query, kept_faces, kept_owners, kept_vectors, 8))
    # Adding after compaction still works.
    extra = random_embeddings(rng, 1)[0]
    index.apply([Change(30_000, ChangeOp.ADD, "f" * 32, "a" * 32, extra, MODEL)])
    assert index.search(extra, top_k=1)[0][0] == IdentityCandidate("a" * 32, "f" * 32, 0.0)


def test_other_model_versions_are_stale_not_searchable() -> None:
    index = GalleryIndex(MODEL)
    vector = np.full(128, 0.05, dtype=np.float32)
    index.apply(
        [
            Change(1, ChangeOp.ADD, "1" * 32, "a" * 32, vector, "old-model"),
            Change(2, ChangeOp.ADD, "2" * 32, "a" * 32, vector, MODEL),
        ]
    )
    assert (index.size, index.stale, index.identities) == (1, 1, 1)
    assert [c.face_id for c in index.search(vector, top_k=5)[0]] == ["2" * 32]
    index.apply([Change(3, ChangeOp.REMOVE, "1" * 32, "a" * 32)])
    assert index.stale == 0


def test_apply_is_idempotent_and_empty_index_searches() -> None:
    index = GalleryIndex(MODEL)
    assert index.search(np.zeros((2, 128)), top_k=3) == [[], []]
    vector = np.full(128, 0.1, dtype=np.float32)
    add = Change(1, ChangeOp.ADD, "1" * 32, "a" * 32, vector, MODEL)
    index.apply([add, add])
    index.apply([add])
    assert index.size == 1
    index.apply([Change(2, ChangeOp.REMOVE, "9" * 32, "a" * 32)])  # absent: nothing happens
    assert index.size == 1
    index.apply([Change(3, ChangeOp.ADD, "3" * 32, "b" * 32, None, MODEL)])  # face deleted since: skipped
    assert index.size == 1


@pytest.mark.parametrize(
    "queries", [np.zeros((1, 127)), np.zeros((2, 2, 128)), np.full((1, 128), np.nan), [[0.0] * 129]]
)
def test_search_refuses_bad_queries(queries: object) -> None:
    index = GalleryIndex(MODEL)
    with pytest.raises(ValueError):
        index.search(queries, top_k=1)  # type: ignore[arg-type]


def test_search_refuses_top_k_below_one() -> None:
    with pytest.raises(ValueError):
        GalleryIndex(MODEL).search(np.zeros((1, 128)), top_k=0)


def test_searches_while_writing_see_consistent_snapshots() -> None:
    """Readers never see a removed face reappear or a face under the wrong identity while a writer adds,
    removes and compacts."""
    rng = np.random.default_rng(4)
    index = GalleryIndex(MODEL)
    owner_of: dict[str, str] = {}
    vectors = random_embeddings(rng, 4000)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            change_id = 0
            alive: list[str] = []
            for vector in vectors:
                change_id += 1
                face, owner = uuid.uuid4().hex, uuid.uuid4().hex[:8] * 4
                owner_of[face] = owner
                index.apply([Change(change_id, ChangeOp.ADD, face, owner, vector, MODEL)])
                alive.append(face)
                if len(alive) > 200:
                    change_id += 1
                    victim = alive.pop(0)
                    index.apply([Change(change_id, ChangeOp.REMOVE, victim, owner_of[victim])])
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)
        finally:
            done.set()

    def reader() -> None:
        try:
            while not done.is_set():
                for candidate in index.search(random_embeddings(rng, 2), top_k=5)[0]:
                    assert owner_of[candidate.face_id] == candidate.identity_id
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert index.size == 200
