"""`facegate db copy` end to end on the real models: a gallery enrolled through the API on SQLite (photos kept,
a calibrated threshold, API keys) is copied by the command to PostgreSQL and from there to a second SQLite file;
an app served on each copy answers identify, verify, the stored photo and the calibration exactly as the
original did, and honours the same keys.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from app.auth import store as keys
from app.auth.scopes import Scope
from app.cli import cli
from app.gallery import Gallery, copy, db
from tests.api.conftest import api_settings, running

pytestmark = [pytest.mark.model, pytest.mark.postgres]

Photo = Callable[[str], tuple[str, bytes, str]]
ENROL = {
    "bbt_amy": ["bbt_amy/face-api__amy1.png", "bbt_amy/face-api__amy2.png"],
    "bbt_raj": ["bbt_raj/face-api__raj1.png"],
    "bbt_howard": ["bbt_howard/face-api__howard1.png"],
}
PROBES = ["bbt_amy/face-api__amy3.png", "bbt_raj/face-api__raj2.png", "bbt_leonard/face-api__leonard1.png"]


def observe(client: TestClient, photo: Photo, headers: dict[str, str], people: dict[str, str]) -> dict[str, Any]:
    """What clients see of the gallery: identify and verify answers, the listing, a stored photo, the threshold."""
    amy = people["bbt_amy"]
    face_id = client.get(f"/identities/{amy}", headers=headers).json()["faces"][0]["id"]
    photo_reply = client.get(f"/identities/{amy}/faces/{face_id}/image", headers=headers)
    return {
        "identify": [
            client.post("/identify", files={"image": photo(p)}, data={"top_k": "3"}, headers=headers).json()
            for p in PROBES
        ],
        "verify": client.post("/verify", files={"image": photo(PROBES[0])}, data={"identity_id": amy}, headers=headers).json(),
        "identities": client.get("/identities", headers=headers).json(),
        "photo": (photo_reply.status_code, photo_reply.content),
        "calibration": client.get("/calibration", headers=headers).json(),
    }


def test_a_copied_gallery_serves_the_same_answers(
    models_dir: Path, photo: Photo, pg_schema_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source_url = f"sqlite:///{tmp_path / 'source.db'}"
    back_url = f"sqlite:///{tmp_path / 'back.db'}"
    db.upgrade(source_url)
    engine = db.make_engine(source_url)
    with db.make_session_factory(engine).begin() as session:
        admin = keys.create_key(session, name="admin", scope=Scope.admin).key
        reader = keys.create_key(session, name="door", scope=Scope.read).key
        revoked = keys.create_key(session, name="old", scope=Scope.write)
        keys.revoke_key(session, reference=revoked.record.prefix)
    engine.dispose()
    admin_headers = {"X-API-Key": admin}

    people: dict[str, str] = {}
    with running(api_settings(models_dir, source_url, store_images=True)) as client:
        for person, photos in ENROL.items():
            for i, path in enumerate(photos):
                form = {"name": person} if i == 0 else {"identity_id": people[person]}
                reply = client.post("/enroll", files={"image": photo(path)}, data=form, headers=admin_headers)
                assert reply.status_code == 201, reply.text
                people.setdefault(person, reply.json()["identity_id"])
        calibration = {"source": "pairs", "same": [0.1, 0.15, 0.2], "different": [0.5 + i / 200 for i in range(100)]}
        reply = client.post("/calibrate", json={**calibration, "target_far": 0.01, "apply": True}, headers=admin_headers)
        assert reply.status_code == 200, reply.text
        original = observe(client, photo, admin_headers, people)
    assert original["identify"][0]["faces"][0]["match"]["identity_id"] == people["bbt_amy"]
    assert original["identify"][2]["faces"][0]["match"] is None  # Leonard is a stranger
    assert original["photo"][0] == 200 and original["calibration"]["threshold_source"] == "deployment"

    password_url = make_url(pg_schema_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    runner = CliRunner()
    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(models_dir))
    for source, target, shown in ((source_url, password_url, "root:***@"), (pg_schema_url, back_url, back_url)):
        monkeypatch.setenv("FACEGATE_DATABASE_URL", source)
        result = runner.invoke(cli, ["db", "copy", "--to", target])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("copied 3 identities, 4 faces, 3 API keys and 1 setting to ")
        assert shown in result.output and "s3cret" not in result.output and result.output.count("\n") == 1

    for url in (pg_schema_url, back_url):
        with running(api_settings(models_dir, url, store_images=True)) as client:
            assert observe(client, photo, admin_headers, people) == original
            read = {"X-API-Key": reader}
            assert client.post("/identify", files={"image": photo(PROBES[1])}, headers=read).status_code == 200
            assert client.post("/enroll", files={"image": photo(PROBES[1])}, data={"name": "x"}, headers=read).status_code == 403
            assert client.get("/identities", headers={"X-API-Key": revoked.key}).status_code == 401
            assert client.get("/identities").status_code == 401


def test_cli_errors_are_one_line_without_the_password(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_schema_url: str
) -> None:
    source_url = f"sqlite:///{tmp_path / 'source.db'}"
    gallery = Gallery.open(source_url, "some-model")
    gallery.create_identity(name="Someone")
    gallery.close()
    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("FACEGATE_DATABASE_URL", source_url)
    runner = CliRunner()
    cases = {
        # Nothing listens on this port (the range this project's servers may use).
        "postgresql+psycopg://root:s3cret-pw@127.0.0.1:8139/test": "error: cannot use the target database "
        "(postgresql+psycopg://root:***@127.0.0.1:8139/test): connection failed",
        source_url: "error: the target is the source database itself",
        "not a url": "error: --to is not a database URL",
        # Drivers that are not installed (or not tested): the engine's import was a traceback, exit status 1.
        "postgresql+asyncpg://root:s3cret-pw@127.0.0.1/test": "error: --to: postgresql+asyncpg:// is not supported",
        "postgresql+psycopg2://root:s3cret-pw@127.0.0.1/test": "error: --to: postgresql+psycopg2:// is not supported",
    }
    for target, expected in cases.items():
        result = runner.invoke(cli, ["db", "copy", "--to", target])
        assert result.exit_code == 2, result.output
        assert result.output.startswith(expected) and result.output.count("\n") == 1, result.output
        assert "s3cret" not in result.output
    # A target that is not empty: refused, with what it holds.
    assert runner.invoke(cli, ["db", "copy", "--to", pg_schema_url]).exit_code == 0
    result = runner.invoke(cli, ["db", "copy", "--to", pg_schema_url])
    assert result.exit_code == 2, result.output
    assert result.output == "error: the target database is not empty (identities: 1): copy into a new database or " \
        "schema; nothing was written\n"  # fmt: skip


def test_ctrl_c_mid_copy_says_nothing_was_written(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while rows are being written (the interrupt raised where a SIGINT would land, between batches): exit
    status 130, one line saying so, and the target left empty."""
    source_url, target_url = f"sqlite:///{tmp_path / 'source.db'}", f"sqlite:///{tmp_path / 'target.db'}"
    gallery = Gallery.open(source_url, "some-model")
    for name in ("One", "Two", "Three"):
        gallery.create_identity(name=name)
    gallery.close()
    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("FACEGATE_DATABASE_URL", source_url)
    real_copy = copy.copy_gallery

    def interrupted(source: str, target: str) -> object:
        def ctrl_c(table: str, rows: int) -> None:
            if table == "identities" and rows >= 2:
                raise KeyboardInterrupt

        return real_copy(source, target, batch_rows=1, progress=ctrl_c)

    monkeypatch.setattr(copy, "copy_gallery", interrupted)
    result = CliRunner().invoke(cli, ["db", "copy", "--to", target_url])
    assert result.exit_code == 130, result.output
    assert result.output == f"interrupted: nothing was written to {target_url}\n"
    reopened = Gallery.open(target_url, "some-model")
    try:
        assert reopened.list_identities().total == 0
    finally:
        reopened.close()
