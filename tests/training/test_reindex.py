"""`facegate reindex`: served embeddings recomputed from stored base embeddings when the head changes, in one
transaction, with every worker's index following through the change log (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import app.gallery.reindex
from app.cli import cli
from app.config import HeadSettings
from app.gallery import Gallery, store
from app.gallery.reindex import reindex, same_base
from app.training import Arch, TrainConfig, register_head, split_identities, train_head
from app.vision.head import EmbeddingHead, load_head
from app.vision.models import load_manifest
from app.vision.types import Box
from tests.gallery.conftest import MODEL, database_url, open_gallery, pg_schema_url, postgres_server, random_embeddings  # noqa: F401
from tests.interrupts import interrupted_on_call
from tests.training.conftest import synthetic_set


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> EmbeddingHead:
    """A small head trained on synthetic embeddings and registered for MODEL."""
    heads = tmp_path_factory.mktemp("heads")
    train, val = split_identities(synthetic_set(16, 5), val_fraction=0.25, seed=0)
    result = train_head(train, val, TrainConfig(epochs=2, p=4, k=3, arch=Arch.mlp, hidden=32, seed=0))
    register_head(result, name="h1", heads_dir=heads, base_model_version=MODEL, opset=17)
    loaded = load_head(HeadSettings(name="h1", dir=heads), Path("unused"), MODEL)
    assert loaded is not None
    return loaded


def _searchable(gallery: Gallery, queries: np.ndarray) -> list[str]:
    """The nearest identity of each query, after replaying the change log."""
    return [r[0].identity_id if r else "" for r in gallery.search(queries, top_k=1)]


def test_reindex_keeps_every_identity_searchable(open_gallery: Callable[..., Gallery], head: EmbeddingHead) -> None:
    target = f"{MODEL}+{head.version}"
    rng = np.random.default_rng(0)
    base = random_embeddings(rng, 8)
    writer = open_gallery(MODEL)
    ids = []
    for k in range(6):  # faces of the bare embedder: their embedding is the base one (no base column needed)
        ids.append(writer.enroll_face(embedding=base[k], box=Box(0, 0, 9, 9), score=1.0, name=f"p{k}").identity_id)
    ids.append(  # a face enrolled with base_embedding stored (as the service does since migration 0003)
        writer.enroll_face(
            embedding=base[6], base_embedding=base[6], box=Box(0, 0, 9, 9), score=1.0, name="p6"
        ).identity_id
    )
    served_elsewhere = open_gallery(target)  # a worker already serving the head: everything stale so far
    assert served_elsewhere.stats().size == 0 and served_elsewhere.stats().stale == 7
    old_worker = open_gallery(MODEL)
    assert _searchable(old_worker, base[:7]) == ids

    report = reindex(open_gallery(MODEL), target_version=target, base_version=MODEL, transform=head.apply)
    assert (report.updated, report.already_current, report.skipped) == (7, 0, 0)
    assert report.from_versions == {MODEL: 7}

    served = head.apply(base[:7])
    assert _searchable(served_elsewhere, served) == ids  # replayed: every identity found, by its new vector
    assert served_elsewhere.stats().size == 7 and served_elsewhere.stats().stale == 0
    hits = served_elsewhere.search(served, top_k=1)
    assert max(r[0].distance for r in hits) < 1e-6
    # the base worker now sees only faces of another version
    old_worker.refresh()
    assert old_worker.stats().size == 0 and old_worker.stats().stale == 7
    # a freshly started worker agrees
    assert _searchable(open_gallery(target), served) == ids

    # again: nothing to do; and back to the base, from the stored base embeddings
    assert reindex(served_elsewhere, target_version=target, base_version=MODEL, transform=head.apply).updated == 0
    back = reindex(served_elsewhere, target_version=MODEL, base_version=MODEL, transform=None)
    assert back.updated == 7 and back.from_versions == {target: 7}
    assert _searchable(old_worker, base[:7]) == ids
    with writer.session() as session:
        for identity_id, k in zip(ids, range(7), strict=True):
            _, vectors = store.face_embeddings(session, identity_id=identity_id)
            np.testing.assert_array_equal(vectors[0], base[k])


def test_faces_without_a_base_embedding_are_left_stale_and_counted(
    open_gallery: Callable[..., Gallery], head: EmbeddingHead
) -> None:
    rng = np.random.default_rng(1)
    older_head = open_gallery(f"{MODEL}+older-0123456789ab")  # made by a head before migration 0003: no base stored
    older_head.enroll_face(embedding=random_embeddings(rng, 1)[0], box=Box(0, 0, 9, 9), score=1.0, name="old")
    target = f"{MODEL}+{head.version}"
    report = reindex(open_gallery(MODEL), target_version=target, base_version=MODEL, transform=head.apply)
    assert (report.updated, report.skipped) == (0, 1)
    fresh = open_gallery(target)
    assert fresh.stats().stale == 1 and fresh.stats().size == 0


def test_a_failing_head_changes_nothing(open_gallery: Callable[..., Gallery]) -> None:
    gallery = open_gallery(MODEL)
    vector = random_embeddings(np.random.default_rng(2), 1)[0]
    identity = gallery.enroll_face(embedding=vector, box=Box(0, 0, 9, 9), score=1.0, name="a").identity_id

    def broken(x: np.ndarray) -> np.ndarray:
        return np.full_like(x, np.nan)

    with pytest.raises(ValueError):
        reindex(gallery, target_version=f"{MODEL}+broken", base_version=MODEL, transform=broken)
    with gallery.session() as session:
        assert store.last_change_id(session) == 1  # only the enrolment's 'add'
    assert _searchable(open_gallery(MODEL), vector[None]) == [identity]


def test_faces_of_an_earlier_build_of_the_base_are_reindexed(
    open_gallery: Callable[..., Gallery], head: EmbeddingHead
) -> None:
    """Faces stored under an earlier build's name of the same base (the manifest's `earlier_versions`, which the
    service adopts at start) hold the base's numbers: a reindex to a head serves them instead of leaving them stale."""
    rng = np.random.default_rng(5)
    earlier = "dlib-resnet-v1+onnx2-5d326777ddf3"
    base = random_embeddings(rng, 2)
    old_build = open_gallery(earlier)
    plain_id = old_build.enroll_face(embedding=base[0], box=Box(0, 0, 9, 9), score=1.0, name="plain").identity_id
    old_head = open_gallery(f"{earlier}+office-0123456789ab")
    headed_id = old_head.enroll_face(
        embedding=base[1] + 1, base_embedding=base[1], box=Box(0, 0, 9, 9), score=1.0, name="head"
    ).identity_id
    target = f"{MODEL}+{head.version}"
    report = reindex(
        open_gallery(MODEL), target_version=target, base_version=MODEL, transform=head.apply, earlier_bases=[earlier]
    )
    assert (report.updated, report.skipped) == (2, 0)
    assert _searchable(open_gallery(target), head.apply(base)) == [plain_id, headed_id]


def test_same_base_tells_heads_from_other_bases() -> None:
    assert same_base(MODEL, MODEL)
    assert same_base(f"{MODEL}+office-0123456789ab", MODEL)  # a head on this base
    assert not same_base(f"{MODEL}+flip", MODEL)  # the embedder applied otherwise
    assert not same_base(f"{MODEL}+flip+office-0123456789ab", MODEL)
    assert not same_base(MODEL, f"{MODEL}+flip")
    assert same_base(f"{MODEL}+flip+office-0123456789ab", f"{MODEL}+flip")
    assert not same_base("other-model", MODEL)


def test_faces_of_another_base_are_not_relabelled(open_gallery: Callable[..., Gallery]) -> None:
    """Switching the embedder's variant (e.g. mirror averaging, "+flip") changes every base number: a plain face's
    stored base must not be relabelled as the new base's; without a photo it stays stale."""
    rng = np.random.default_rng(3)
    plain = open_gallery(MODEL)
    plain.enroll_face(embedding=random_embeddings(rng, 1)[0], box=Box(0, 0, 9, 9), score=1.0, name="plain")
    flipped = open_gallery(f"{MODEL}+flip")
    report = reindex(flipped, target_version=f"{MODEL}+flip", base_version=f"{MODEL}+flip", transform=None)
    assert (report.updated, report.skipped) == (0, 1)
    assert flipped.stats().size == 0 and flipped.stats().stale == 1


def test_photos_serve_faces_the_stored_numbers_cannot(open_gallery: Callable[..., Gallery], head: EmbeddingHead) -> None:
    """With `photo_base`, a face made by a head before migration 0003 (no base stored) and a face of another base
    are embedded again from their stored photos (the function gets the photo's bytes and the stored box); a face
    without a photo stays stale, and a face whose stored base serves is not re-embedded."""
    rng = np.random.default_rng(4)
    target = f"{MODEL}+{head.version}"
    old_head = open_gallery(f"{MODEL}+older-0123456789ab")
    no_base = old_head.enroll_face(
        embedding=random_embeddings(rng, 1)[0], box=Box(1, 2, 30, 40), score=1.0, name="old head", image=b"photo 1"
    )
    flipped = open_gallery(f"{MODEL}+flip")
    other_base = flipped.enroll_face(
        embedding=random_embeddings(rng, 1)[0], box=Box(3, 4, 50, 60), score=1.0, name="flip", image=b"photo 2"
    )
    flipped.enroll_face(embedding=random_embeddings(rng, 1)[0], box=Box(0, 0, 9, 9), score=1.0, name="no photo")
    plain = open_gallery(MODEL)
    served = plain.enroll_face(embedding=random_embeddings(rng, 1)[0], box=Box(0, 0, 9, 9), score=1.0, name="plain")
    fresh = {b"photo 1": random_embeddings(rng, 1)[0], b"photo 2": random_embeddings(rng, 1)[0]}
    asked: list[tuple[bytes, Box]] = []

    def photo_base(photo: bytes, box: Box) -> np.ndarray | None:
        asked.append((photo, box))
        return fresh[photo]

    report = reindex(plain, target_version=target, base_version=MODEL, transform=head.apply, photo_base=photo_base)
    assert sorted(asked, key=lambda a: a[0]) == [(b"photo 1", Box(1, 2, 30, 40)), (b"photo 2", Box(3, 4, 50, 60))]
    assert (report.updated, report.from_photos, report.skipped) == (3, 2, 1)
    gallery = open_gallery(target)
    ids, distances = gallery.index.identity_distances(head.apply(fresh[b"photo 1"][None])[0], no_base.face.identity_id)
    assert ids == [no_base.face.id] and float(distances[0]) < 1e-6
    ids, distances = gallery.index.identity_distances(head.apply(fresh[b"photo 2"][None])[0], other_base.face.identity_id)
    assert ids == [other_base.face.id] and float(distances[0]) < 1e-6
    assert gallery.index.contains(served.face.id)


def test_ctrl_c_during_the_cli_reindex_says_whether_it_was_committed(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C ended `facegate reindex` with no word (exit status 130). One line now says what it left: nothing when
    the interrupt came inside the transaction (rolled back); the faces recomputed when it came after the commit,
    while the process's index was rebuilt."""
    base = load_manifest(models_dir, verify=False).model_version
    url = f"sqlite:///{tmp_path / 'gallery.db'}"
    vectors = random_embeddings(np.random.default_rng(5), 2)
    made_by_a_head = Gallery.open(url, f"{base}+office-0123456789ab")  # reindexed back to the base, no head needed
    for k in range(2):
        made_by_a_head.enroll_face(
            embedding=vectors[k], base_embedding=vectors[k], box=Box(0, 0, 9, 9), score=1.0, name=f"p{k}"
        )
    made_by_a_head.close()
    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("FACEGATE_DATABASE_URL", url)

    def at_base() -> int:
        gallery = Gallery.open(url, base)
        try:
            return gallery.face_counts().get(base, 0)
        finally:
            gallery.close()

    rewrite = app.gallery.reindex._reindex

    def ctrl_c_before_the_commit(*a: Any, **kw: Any) -> Any:  # every face rewritten, the transaction still open
        rewrite(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(app.gallery.reindex, "_reindex", ctrl_c_before_the_commit)
    result = CliRunner().invoke(cli, ["reindex"])
    assert result.exit_code == 130, result.output
    assert result.stderr == (
        "interrupted: no face was changed (the reindex is one transaction, rolled back); run `facegate reindex` again\n"
    )
    assert at_base() == 0
    monkeypatch.setattr(app.gallery.reindex, "_reindex", rewrite)

    load = Gallery.load
    # The index rebuilt after the commit (the first load: at open).
    monkeypatch.setattr(Gallery, "load", interrupted_on_call(2, load))
    result = CliRunner().invoke(cli, ["reindex"])
    assert result.exit_code == 130, result.output
    assert result.stderr == f"interrupted: the reindex had been committed: 2 faces are now at model version {base}\n"
    monkeypatch.setattr(Gallery, "load", load)
    assert at_base() == 2
