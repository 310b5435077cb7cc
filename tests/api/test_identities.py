"""Identity management through HTTP, on SQLite and on the real PostgreSQL (a fresh schema per test).

The round trip: enrol, list/page/filter, read, rename, add a face, identify, delete a face, delete the identity,
and check that the deletion is real: the rows are gone from the database, identify stops returning the person, a
second app on the same database (another worker) follows, and a restart finds only what is left.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text, update

from app.gallery.tables import Identity
from tests.api.conftest import api_settings, error_of, running
from tests.hostile_cases import nested_json

pytestmark = pytest.mark.model

Photo = Callable[[str], tuple[str, bytes, str]]

AMY = ["bbt_amy/face-api__amy1.png", "bbt_amy/face-api__amy2.png", "bbt_amy/face-api__amy3.png"]
RAJ = "bbt_raj/face-api__raj1.png"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gallery.db'}"
    url: str = request.getfixturevalue("pg_schema_url")
    return url


def _rows(database_url: str, sql: str, **params: str) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text(sql), params).scalar_one())
    finally:
        engine.dispose()


def _identify_names(client: TestClient, upload: tuple[str, bytes, str]) -> tuple[str | None, list[str]]:
    r = client.post("/identify", files={"image": upload})
    assert r.status_code == 200, r.text
    face = r.json()["faces"][0]
    return (face["match"]["name"] if face["match"] else None), [c["name"] for c in face["candidates"]]


def test_identity_round_trip(models_dir: Path, database_url: str, photo: Photo) -> None:
    settings = api_settings(models_dir, database_url)
    with running(settings) as api, running(settings) as other_worker:
        amy = api.post("/enroll", files={"image": photo(AMY[0])}, data={"name": "Amy", "metadata": '{"desk": 4}'})
        raj = api.post("/enroll", files={"image": photo(RAJ)}, data={"name": "Raj"})
        assert amy.status_code == raj.status_code == 201
        amy_id, amy_face1 = amy.json()["identity_id"], amy.json()["face_id"]
        raj_id = raj.json()["identity_id"]

        # list, page, filter
        page = api.get("/identities").json()
        assert page["total"] == 2 and [i["name"] for i in page["items"]] == ["Amy", "Raj"]
        assert page["items"][0]["metadata"] == {"desk": 4} and page["items"][0]["face_count"] == 1
        second = api.get("/identities", params={"offset": 1, "limit": 1}).json()
        assert second["total"] == 2 and [i["id"] for i in second["items"]] == [raj_id] and second["next"] is None
        first = api.get("/identities", params={"limit": 1}).json()
        assert [i["id"] for i in first["items"]] == [amy_id] and first["next"]
        by_cursor = api.get("/identities", params={"limit": 1, "after": first["next"]}).json()
        assert by_cursor == {**second, "offset": 0} and by_cursor["start"] == 1  # Raj is "2-2 of 2"
        assert [i["name"] for i in api.get("/identities", params={"name": "AM"}).json()["items"]] == ["Amy"]
        assert api.get("/identities", params={"name": "nobody"}).json() == {
            "items": [],
            "total": 0,
            "start": 0,
            "offset": 0,
            "limit": 50,
            "next": None,
        }

        # read
        one = api.get(f"/identities/{amy_id}").json()
        assert one["id"] == amy_id and [f["id"] for f in one["faces"]] == [amy_face1]
        assert one["faces"][0]["stale"] is False and one["faces"][0]["box"] == amy.json()["face"]["box"]

        # rename and replace metadata
        patched = api.patch(f"/identities/{amy_id}", json={"name": "Amy Farrah Fowler", "metadata": {"desk": 5}})
        assert patched.status_code == 200, patched.text
        assert patched.json()["name"] == "Amy Farrah Fowler" and patched.json()["metadata"] == {"desk": 5}
        only_name = api.patch(f"/identities/{amy_id}", json={"name": "Amy F. Fowler"}).json()
        assert only_name["metadata"] == {"desk": 5}  # untouched
        error_of(api.patch(f"/identities/{amy_id}", json={"nmae": "x"}), 422, "invalid_request")
        error_of(api.patch(f"/identities/{amy_id}", json={"name": ""}), 422, "invalid_request")
        error_of(api.patch(f"/identities/{amy_id}", json={"metadata": [1]}), 422, "invalid_request")
        error_of(api.patch(f"/identities/{'f' * 32}", json={"name": "x"}), 404, "unknown_identity")

        # add a face
        added = api.post(f"/identities/{amy_id}/faces", files={"image": photo(AMY[1])})
        assert added.status_code == 201, added.text
        assert added.json()["created"] is False and added.json()["name"] == "Amy F. Fowler"
        amy_face2 = added.json()["face_id"]
        assert api.get(f"/identities/{amy_id}").json()["face_count"] == 2

        # both workers find her (the second one never saw the enrolment request)
        for client in (api, other_worker):
            match, _ = _identify_names(client, photo(AMY[2]))
            assert match == "Amy F. Fowler"

        # delete one face: it is gone, the other still matches
        removed = api.delete(f"/identities/{amy_id}/faces/{amy_face1}")
        assert removed.status_code == 200, removed.text
        assert removed.json() == {"identity_id": amy_id, "identity_deleted": False, "deleted_face_ids": [amy_face1]}
        assert _rows(database_url, "SELECT count(*) FROM faces WHERE id = :f", f=amy_face1) == 0
        error_of(api.delete(f"/identities/{amy_id}/faces/{amy_face1}"), 404, "unknown_face")
        error_of(api.delete(f"/identities/{raj_id}/faces/{amy_face2}"), 404, "unknown_face")  # not Raj's face

        # delete the identity: every remaining face goes, and identify forgets her in both workers
        deleted = api.delete(f"/identities/{amy_id}")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {"identity_id": amy_id, "identity_deleted": True, "deleted_face_ids": [amy_face2]}
        assert _rows(database_url, "SELECT count(*) FROM faces WHERE identity_id = :i", i=amy_id) == 0
        assert _rows(database_url, "SELECT count(*) FROM identities WHERE id = :i", i=amy_id) == 0
        for client in (api, other_worker):
            match, names = _identify_names(client, photo(AMY[2]))
            assert match is None and names == ["Raj"]
            error_of(client.get(f"/identities/{amy_id}"), 404, "unknown_identity")
        error_of(api.delete(f"/identities/{amy_id}"), 404, "unknown_identity")
        error_of(
            api.post("/verify", files={"image": photo(AMY[2])}, data={"identity_id": amy_id}), 404, "unknown_identity"
        )
        error_of(api.post(f"/identities/{amy_id}/faces", files={"image": photo(AMY[2])}), 404, "unknown_identity")

    # a restart loads the index from the database: only Raj's face is left
    with running(settings) as restarted:
        ready = restarted.get("/readyz").json()
        assert ready["gallery_size"] == 1 and ready["identities"] == 1
        assert [i["id"] for i in restarted.get("/identities").json()["items"]] == [raj_id]


@pytest.mark.parametrize("bad_id", ["nope", "0" * 31, "G" * 32, "0" * 64])
def test_malformed_ids_are_unknown(client: TestClient, bad_id: str) -> None:
    error_of(client.get(f"/identities/{bad_id}"), 404, "unknown_identity")
    error_of(client.delete(f"/identities/{bad_id}"), 404, "unknown_identity")
    error_of(client.delete(f"/identities/{bad_id}/faces/{'0' * 32}"), 404, "unknown_identity")


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 501}, {"offset": -1}, {"limit": "ten"}, {"name": "x" * 201}]
)
def test_listing_parameters_are_validated(client: TestClient, params: dict[str, int | str]) -> None:
    error_of(client.get("/identities", params=params), 422, "invalid_request")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"after": "page2"}, "not a listing cursor"),
        ({"after": "1_" + "0" * 32 + "'; --"}, "not a listing cursor"),
        ({"after": "9" * 18 + "_" + "0" * 32}, "not a listing cursor"),  # past the year 9999
        ({"after": "1_" + "0" * 32, "offset": 3}, "give either offset or after"),
        ({"after": "1" * 65}, "at most 64 characters"),
    ],
)
def test_a_cursor_that_no_page_gave_is_refused(client: TestClient, params: dict[str, str | int], message: str) -> None:
    error = error_of(client.get("/identities", params=params), 422, "invalid_request")
    assert message in error["message"], error


def test_null_fields_of_a_patch_are_refused_not_ignored(client: TestClient) -> None:
    gallery = client.app.state.service.gallery  # type: ignore[attr-defined]
    identity_id = gallery.create_identity(name="Kept", metadata={"keep": 1}).id
    for body in ({"metadata": None}, {"name": None}):
        error = error_of(client.patch(f"/identities/{identity_id}", json=body), 422, "invalid_request")
        assert "null" in error["message"], error
    cleared = client.patch(f"/identities/{identity_id}", json={"metadata": {}})
    assert cleared.status_code == 200 and cleared.json()["metadata"] == {}, cleared.text


def test_metadata_depth_limit_and_rows_stored_before_it(client: TestClient) -> None:
    """Metadata 32 levels deep round-trips; 33 and 256 (which pydantic cannot serialise back: stored, then every
    read was a 500) are refused and change nothing; a row stored before the limit still reads and lists."""
    gallery = client.app.state.service.gallery  # type: ignore[attr-defined]
    identity_id = gallery.create_identity(name="Deep", metadata={"keep": 1}).id
    deepest = json.loads(nested_json(32))
    ok = client.patch(f"/identities/{identity_id}", json={"metadata": deepest})
    assert ok.status_code == 200, ok.text
    assert client.get(f"/identities/{identity_id}").json()["metadata"] == deepest
    for levels in (33, 256):
        body = '{"metadata": ' + nested_json(levels) + "}"
        error = error_of(
            client.patch(f"/identities/{identity_id}", content=body, headers={"content-type": "application/json"}),
            422,
            "invalid_request",
        )
        assert "nested more than 32 levels" in error["message"]
        assert error["details"] == {"field": "metadata"}  # as enrolment names it
    assert client.get(f"/identities/{identity_id}").json()["metadata"] == deepest  # unchanged

    engine = create_engine(client.app.state.settings.database_url)  # type: ignore[attr-defined]
    with engine.begin() as connection:  # as the bug stored it
        connection.execute(update(Identity).where(Identity.id == identity_id).values(meta=json.loads(nested_json(300))))
    engine.dispose()
    one = client.get(f"/identities/{identity_id}")
    page = client.get("/identities")
    assert one.status_code == page.status_code == 200, (one.text[:200], page.text[:200])
    assert page.json()["items"][0]["metadata"] == one.json()["metadata"]
    # levels 2-31 stay arrays, the 269 levels below are the JSON text of the array at level 32
    assert json.dumps(one.json()["metadata"]).endswith("]" * 269 + '"' + "]" * 30 + "}")
