"""FACEGATE_STORE_IMAGES: the enrolled photo is kept only when asked, is served back as uploaded to admin keys, and
goes with its face."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.auth import Scope
from app.auth import store as keys_store
from app.gallery import store
from tests.api.conftest import api_settings, error_of, running

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
