"""Issue 6: the hostile-input corpus (tests/hostile_cases.py) against every endpoint that takes input.

For every refused request: the exact status and stable error code in the error JSON, nothing internal in it, the
worker still answers, and the gallery (identities, faces, search index, deployment threshold) is exactly as before.
Supported photo formats must give the face (2xx). One app for the corpus (the models load once); the 413 cases run on
a second app whose body limit is 64 kB (models not loaded: nothing there reaches them); the delete race runs on SQLite
and on PostgreSQL.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import REPO_ROOT
from tests.api.conftest import api_settings, error_of, running
from tests.gallery.conftest import database_url  # noqa: F401 - SQLite and PostgreSQL, for the delete race
from tests.hostile_cases import CASES, MULTIPART, Case, Ctx, raw_multipart

pytestmark = pytest.mark.model

Photo = Callable[[str], tuple[str, bytes, str]]
COLIN = "colin_powell/krasserm__Colin_Powell_0001.jpg"  # 250 x 250 colour JPEG, one frontal face
COLIN_AGAIN = "colin_powell/krasserm__Colin_Powell_0002.jpg"  # another photo of him (the same one adds no face)
AMY = "bbt_amy/face-api__amy1.png"  # 150 x 150 greyscale PNG


@pytest.fixture(scope="module")
def hostile(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory, photo: Photo
) -> Iterator[tuple[TestClient, Ctx]]:
    """The app under attack, with two enrolled identities (Colin: colour JPEG, Amy: greyscale PNG)."""
    db = tmp_path_factory.mktemp("hostile") / "gallery.db"
    with running(api_settings(models_dir, f"sqlite:///{db}")) as client:
        ids = {}
        for key, relative in (("colin", COLIN), ("amy", AMY)):
            r = client.post("/enroll", files={"image": photo(relative)}, data={"name": key.title()})
            assert r.status_code == 201, r.text
            ids[key], ids[f"{key}_face"] = r.json()["identity_id"], r.json()["face_id"]
        yield client, Ctx(colin=photo(COLIN)[1], amy=photo(AMY)[1], ids=ids)


@pytest.fixture(scope="module")
def small_limit(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """An app whose body limit (FACEGATE_IMAGE__MAX_UPLOAD_BYTES) is 64 kB; its models are never loaded."""
    db = tmp_path_factory.mktemp("hostile-limit") / "gallery.db"
    settings = api_settings(models_dir, f"sqlite:///{db}", image={"max_upload_bytes": 64_000}, preload_models=False)
    with running(settings) as client:
        yield client


def snapshot(client: TestClient) -> tuple[Any, ...]:
    """Everything a failed request must leave alone: every identity (name, metadata, face ids), the search index's
    size and the deployment threshold."""
    page = client.get("/identities", params={"limit": 500})
    assert page.status_code == 200, page.text
    identities = []
    for item in page.json()["items"]:
        full = client.get(f"/identities/{item['id']}").json()
        faces = tuple(sorted(f["id"] for f in full["faces"]))
        identities.append((item["id"], item["name"], json.dumps(item["metadata"], sort_keys=True), faces))
    stats = client.app.state.service.gallery.stats()  # type: ignore[attr-defined]
    calibration = client.get("/calibration").json()
    return tuple(sorted(identities)), stats.size, stats.identities, calibration["threshold_source"]


def send(client: TestClient, case: Case, ctx: Ctx) -> Any:
    method, path, kwargs = case.request(ctx)
    return client.request(method, path, **kwargs)


def test_the_corpus_is_large_and_distinct() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be distinct"
    assert len(CASES) >= 60
    assert sum(1 for c in CASES if c.status >= 400) >= 60


def test_every_endpoint_with_input_is_attacked(hostile: tuple[TestClient, Ctx]) -> None:
    """Every operation of the OpenAPI document that takes parameters or a body has hostile cases (an endpoint added
    later fails this until it gets its own)."""
    client, ctx = hostile
    document = client.get("/openapi.json").json()
    operations = {
        (method.upper(), path): re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$")
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if operation.get("parameters") or operation.get("requestBody")
    }
    hit = {
        (method, template)
        for case in CASES
        for (method, template), regex in operations.items()
        if method == case.method and regex.match(case.path.format(**ctx.ids))
    }
    assert set(operations) - hit == set(), "operations without a hostile case"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request(case: Case, hostile: tuple[TestClient, Ctx], request: pytest.FixtureRequest) -> None:
    main, ctx = hostile
    client = request.getfixturevalue("small_limit") if case.app == "small_limit" else main
    before = snapshot(client)
    r = send(client, case, ctx)
    if case.status < 400:
        assert r.status_code == case.status, r.text
        assert case.check is not None
        case.check(r, ctx)
    else:
        assert case.code is not None
        error = error_of(r, case.status, case.code)
        text = r.text
        for leak in ("Traceback", "File \"", str(REPO_ROOT), "site-packages", "sqlalchemy", "SELECT ", "embedding\":"):
            assert leak not in text, (leak, text[:500])
        assert len(text) < 20_000, "the error echoes the input"
        assert error["message"].isprintable()
    assert client.get("/healthz").status_code == 200  # the worker still answers
    assert snapshot(client) == before  # nothing stored, nothing lost


def _race(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls in threads released at the same moment; their responses."""
    barrier = threading.Barrier(len(calls))
    answers: list[Any] = []

    def run(call: Callable[[], Any]) -> None:
        barrier.wait()
        answers.append(call())

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(answers) == len(calls)
    return answers


def test_concurrent_delete_of_one_identity(models_dir: Path, database_url: str, photo: Photo) -> None:
    """Four clients delete the same identity (then the same face) at the same moment, on SQLite and PostgreSQL:
    exactly one 200 naming the face, the others 404, never a 500; the rows and the index entry go exactly once."""
    with running(api_settings(models_dir, database_url)) as client:
        colin = photo(COLIN)
        for round_ in range(3):
            r = client.post("/enroll", files={"image": colin}, data={"name": f"Twin {round_}", "allow_duplicate": "1"})
            assert r.status_code == 201, r.text
            identity_id, face_id = r.json()["identity_id"], r.json()["face_id"]
            second = client.post(f"/identities/{identity_id}/faces", files={"image": photo(COLIN_AGAIN)})
            assert second.status_code == 201, second.text

            answers = _race([partial(client.delete, f"/identities/{identity_id}/faces/{face_id}")] * 4)
            assert sorted(a.status_code for a in answers) == [200, 404, 404, 404], [a.text for a in answers]
            for a in answers:
                if a.status_code == 404:
                    error_of(a, 404, "unknown_face")
            assert [f["id"] for f in client.get(f"/identities/{identity_id}").json()["faces"]] == [
                second.json()["face_id"]
            ]

            answers = _race([partial(client.delete, f"/identities/{identity_id}")] * 4)
            assert sorted(a.status_code for a in answers) == [200, 404, 404, 404], [a.text for a in answers]
            ok = next(a for a in answers if a.status_code == 200)
            assert ok.json() == {
                "identity_id": identity_id,
                "identity_deleted": True,
                "deleted_face_ids": [second.json()["face_id"]],
            }
            for a in answers:
                if a.status_code == 404:
                    error_of(a, 404, "unknown_identity")
            error_of(client.get(f"/identities/{identity_id}"), 404, "unknown_identity")
        assert client.get("/identities").json()["total"] == 0
        assert client.app.state.service.gallery.stats().size == 0  # type: ignore[attr-defined]


def test_names_in_any_script_survive_intact(hostile: tuple[TestClient, Ctx]) -> None:
    """The strict form parsing refuses bytes that are not text, not names outside ASCII: UTF-8 (the default) and a
    charset the request declares both arrive exactly."""
    client, ctx = hostile
    for raw, charset, expected in (
        ("Zoë Ÿsolde 李小龍 Ольга".encode(), None, "Zoë Ÿsolde 李小龍 Ольга"),
        ("Zoë Müller".encode("latin-1"), "iso-8859-1", "Zoë Müller"),
    ):
        content_type = MULTIPART["content-type"] + (f"; charset={charset}" if charset else "")
        body = raw_multipart([(b"image", b"c.jpg", ctx.colin), (b"name", None, raw), (b"allow_duplicate", None, b"1")])
        r = client.post("/enroll", content=body, headers={"content-type": content_type})
        assert r.status_code == 201, r.text
        assert r.json()["name"] == expected
        assert client.get(f"/identities/{r.json()['identity_id']}").json()["name"] == expected
        assert client.delete(f"/identities/{r.json()['identity_id']}").status_code == 200


@pytest.mark.parametrize(
    "name",
    [
        "\U0001f469\u200d\U0001f4bb Ada",  # ZWJ: an emoji sequence (woman technologist)
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # ZWNJ: Persian spelling
        "\u0915\u094d\u200d\u0937",  # ZWJ in Devanagari (half form)
        "\u845b\U000e0100\u98fe",  # an ideographic variation selector (a Japanese family name's glyph)
        "\u05e9\u05e8\u05d4 Sara 2",  # Hebrew and Latin without any bidi character
    ],
)
def test_names_with_joiners_and_selectors_are_kept(hostile: tuple[TestClient, Ctx], name: str) -> None:
    """Refusing invisible bidi controls, marks, tags and noncharacters leaves the invisible characters that are part
    of a spelling alone."""
    client, ctx = hostile
    r = client.post("/enroll", files={"image": ("c.jpg", ctx.colin)}, data={"name": name, "allow_duplicate": "1"})
    assert r.status_code == 201, r.text
    identity_id = r.json()["identity_id"]
    assert client.get(f"/identities/{identity_id}").json()["name"] == name
    renamed = client.patch(f"/identities/{identity_id}", json={"name": name + " B"})
    assert renamed.status_code == 200 and renamed.json()["name"] == name + " B"
    assert client.delete(f"/identities/{identity_id}").status_code == 200


def test_a_refused_name_says_which_character(hostile: tuple[TestClient, Ctx]) -> None:
    client, ctx = hostile
    r = client.post("/enroll", files={"image": ("c.jpg", ctx.colin)}, data={"name": "Alice\u202egnp.exe"})
    error = error_of(r, 422, "invalid_request")
    assert error["message"].endswith("(U+202E at index 5)") and error["details"] == {"field": "name"}
