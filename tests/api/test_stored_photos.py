"""FACEGATE_STORE_IMAGES: the enrolled photo is kept only when asked, is served back as uploaded to admin keys, goes
with its face, and `facegate db purge-photos` deletes every kept photo while the faces stay."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.auth import Scope
from app.auth import store as keys_store
from app.cli import cli
from app.gallery import store
from tests.api.conftest import api_settings, error_of, running
from tests.gallery.conftest import pg_schema_url, postgres_server  # noqa: F401

pytestmark = pytest.mark.model

Photo = Callable[[str], tuple[str, bytes, str]]
AMY_PNG = "bbt_amy/face-api__amy1.png"
OBAMA_JPG = "barack_obama/face_recognition__obama.jpg"


def _image_url(enrolled: dict[str, str]) -> str:
    return f"/identities/{enrolled['identity_id']}/faces/{enrolled['face_id']}/image"


def test_stored_photo_comes_back_as_uploaded_and_goes_with_its_face(
    models_dir: Path, tmp_path: Path, photo: Photo
) -> None:
    with running(api_settings(models_dir, f"sqlite:///{tmp_path / 'g.db'}", store_images=True)) as client:
        urls = {}
        for name, relative, kind in (("Amy", AMY_PNG, "image/png"), ("Barack", OBAMA_JPG, "image/jpeg")):
            upload = photo(relative)
            r = client.post("/enroll", files={"image": upload}, data={"name": name})
            assert r.status_code == 201, r.text
            urls[name] = _image_url(r.json())
            got = client.get(urls[name])
            assert got.status_code == 200, got.text
            assert got.content == upload[1]  # the bytes as uploaded, not a re-encoding
            assert got.headers["content-type"] == kind
            assert got.headers["cache-control"] == "no-store"
        identity_id = urls["Amy"].split("/")[2]
        assert client.delete(f"/identities/{identity_id}").status_code == 200
        error_of(client.get(urls["Amy"]), 404, "unknown_face")
        assert client.get(urls["Barack"]).status_code == 200
        error_of(client.get(urls["Barack"].replace(urls["Barack"].split("/")[4], "0" * 32)), 404, "unknown_face")


def test_no_photo_is_kept_by_default(client: TestClient, photo: Photo) -> None:
    r = client.post("/enroll", files={"image": photo(AMY_PNG)}, data={"name": "Amy"})
    assert r.status_code == 201, r.text
    error_of(client.get(_image_url(r.json())), 404, "image_not_stored")
    with client.app.state.service.gallery.session() as session:  # type: ignore[attr-defined]
        assert store.face_image(session, identity_id=r.json()["identity_id"], face_id=r.json()["face_id"]) is None


def test_only_admin_keys_see_photos(models_dir: Path, tmp_path: Path, photo: Photo) -> None:
    settings = api_settings(models_dir, f"sqlite:///{tmp_path / 'g.db'}", store_images=True, auth={"cache_seconds": 0})
    with running(settings) as client:
        with client.app.state.service.gallery.session() as session:  # type: ignore[attr-defined]
            keys = {s: keys_store.create_key(session, name=s.value, scope=s).key for s in Scope}
        r = client.post(
            "/enroll", files={"image": photo(AMY_PNG)}, data={"name": "Amy"}, headers={"X-API-Key": keys[Scope.write]}
        )
        assert r.status_code == 201, r.text
        url = _image_url(r.json())
        error_of(client.get(url), 401, "unauthorized")
        for scope in (Scope.read, Scope.write):
            error_of(client.get(url, headers={"X-API-Key": keys[scope]}), 403, "forbidden")
        assert client.get(url, headers={"X-API-Key": keys[Scope.admin]}).status_code == 200


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_purge_photos_deletes_every_kept_photo_and_keeps_the_faces(
    backend: str, models_dir: Path, tmp_path: Path, photo: Photo, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}" if backend == "sqlite" else request.getfixturevalue("pg_schema_url")
    uploads = {name: photo(relative) for name, relative in (("Amy", AMY_PNG), ("Barack", OBAMA_JPG))}
    with running(api_settings(models_dir, url, store_images=True)) as client:
        enrolled = {}
        for name, upload in uploads.items():
            r = client.post("/enroll", files={"image": upload}, data={"name": name})
            assert r.status_code == 201, r.text
            enrolled[name] = r.json()
        assert all(client.get(_image_url(e)).status_code == 200 for e in enrolled.values())

    def kept(data: bytes) -> bool:  # a slice of the photo in the SQLite files (database and WAL)
        return data[1000:1064] in b"".join(p.read_bytes() for p in tmp_path.glob("g.db*"))

    if backend == "sqlite":
        assert all(kept(data) for _, data, _ in uploads.values())
    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("FACEGATE_DATABASE_URL", url)
    refused = CliRunner().invoke(cli, ["db", "purge-photos"], input="n\n")
    assert refused.exit_code == 1 and "Aborted" in refused.output, refused.output
    with running(api_settings(models_dir, url)) as client:
        assert client.get(_image_url(enrolled["Amy"])).status_code == 200  # a "no" keeps them

    result = CliRunner().invoke(cli, ["db", "purge-photos", "--yes"])
    assert result.exit_code == 0, result.output
    assert "2 photos deleted" in result.output
    assert ("VACUUM FULL faces" in result.output) == (backend == "postgres")
    again = CliRunner().invoke(cli, ["db", "purge-photos", "--yes"])
    assert again.exit_code == 0 and "0 photos deleted" in again.output, again.output

    with running(api_settings(models_dir, url)) as client:
        for name, e in enrolled.items():
            error_of(client.get(_image_url(e)), 404, "image_not_stored")
            r = client.post("/identify", files={"image": uploads[name]})
            assert r.status_code == 200, r.text
            assert r.json()["faces"][0]["match"]["identity_id"] == e["identity_id"]  # the faces are still searched
    if backend == "sqlite":  # secure_delete and the WAL checkpoint: the photos' bytes are gone from the files
        assert not any(kept(data) for _, data, _ in uploads.values())


def test_purge_photos_refuses_a_gallery_that_does_not_exist(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("FACEGATE_DATABASE_URL", f"sqlite:///{tmp_path / 'typo.db'}")
    result = CliRunner().invoke(cli, ["db", "purge-photos", "--yes"])
    assert result.exit_code == 2 and "does not exist" in result.output, result.output
    assert not (tmp_path / "typo.db").exists()
