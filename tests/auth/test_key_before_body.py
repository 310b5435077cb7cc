"""The API key is checked before a byte of the body is read: a client without a valid key of the route's scope
cannot make a worker read its upload, nor take a share of the worker's body budget (so crowd out authorised
uploads), nor learn from a 400/422 what the route's body should be.

Requests are driven through the real app's ASGI interface on its event loop (tests/api/test_body_budget.py's
`Upload`), whose receive() counts the app's calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from app.auth import Scope
from app.auth.keys import generate_key
from app.auth.store import ApiKeyRecord
from tests.api.conftest import error_of
from tests.api.test_body_budget import Upload, budget_of, calibrate_body, on_app_loop
from tests.auth.conftest import Keyed

pytestmark = pytest.mark.model  # the app loads the real models at start

Photo = Callable[[str], tuple[str, bytes, str]]
OBAMA = "barack_obama/face_recognition__obama.jpg"
OBAMA_2 = "barack_obama/face_recognition__obama2.jpg"
MULTIPART = {"content-type": "multipart/form-data; boundary=b"}
JSON = {"content-type": "application/json"}


def form(photo: tuple[str, bytes, str], **fields: str) -> tuple[bytes, dict[str, str]]:
    """A multipart body with the photo as `image`, and its Content-Type, as an HTTP client would send them."""
    request = httpx.Request("POST", "http://testserver", data=fields, files={"image": photo})
    return request.read(), {"content-type": request.headers["content-type"]}


def key_headers(keyed: Keyed, who: str) -> dict[str, str]:
    """`who`: none, unknown, revoked or a scope's name."""
    keys = {"none": None, "unknown": generate_key(), "revoked": keyed.revoked}
    key = keys[who] if who in keys else keyed.keys[Scope(who)]
    return {} if key is None else {"X-API-Key": key}


# (path, who calls, status): a write, a read and an admin route, each without a key, with an unknown or revoked one,
# and (but the read route) with a valid key too narrow for it.
REFUSALS = [
    ("/enroll", "none", 401),
    ("/enroll", "revoked", 401),
    ("/enroll", "read", 403),
    ("/verify", "none", 401),
    ("/verify", "unknown", 401),
    ("/calibrate", "none", 401),
    ("/calibrate", "revoked", 401),
    ("/calibrate", "write", 403),
]


@pytest.mark.parametrize(("path", "who", "status"), REFUSALS, ids=[f"{p}-{w}" for p, w, _ in REFUSALS])
def test_a_refused_caller_sends_no_byte_of_its_body(
    keyed: Keyed, photo: Photo, path: str, who: str, status: int
) -> None:
    """A whole upload (a photo; labelled distances for /calibrate) is refused without one receive(). Were it read,
    the upload would stop at its second chunk holding the first one's bytes of the budget."""
    body, content_type = (calibrate_body(3_000), JSON) if path == "/calibrate" else form(photo(OBAMA), name="X")
    upload = Upload(
        keyed.client.app, body, path=path, request_headers={**content_type, **key_headers(keyed, who)}, hold_at=1
    )
    budget = budget_of(keyed.client)

    async def scenario() -> int:
        upload.start()
        assert upload.task is not None
        parked = asyncio.create_task(upload.held.wait())
        await asyncio.wait([upload.task, parked], return_when=asyncio.FIRST_COMPLETED)
        held = budget.held  # while the request is answered or parked, not after its bytes were given back
        parked.cancel()
        upload.resume()
        await upload.finished()
        return held

    held = on_app_loop(keyed.client, scenario)
    assert upload.reads == 0 and held == 0 and budget.held == 0
    assert upload.error is None and upload.status == status, upload.sent
    assert upload.headers["connection"] == "close"  # the server does not read the upload to throw it away
    error = upload.json()["error"]
    if status == 401:
        assert error["code"] == "unauthorized" and "X-API-Key" in upload.headers["www-authenticate"]
    else:
        assert error["code"] == "forbidden" and error["details"]["key_scope"] == who


def test_a_refusal_without_a_body_keeps_the_connection(keyed: Keyed) -> None:
    for request in (keyed.client.build_request("GET", "/identities"), keyed.client.build_request("DELETE", "/identities/x")):
        refused = keyed.client.send(request)
        assert refused.status_code == 401 and "connection" not in refused.headers, request


def test_an_anonymous_upload_is_refused_401_whatever_length_it_declares(keyed: Keyed) -> None:
    """A declared Content-Length over the body limit was 413 without a key: the key comes first, so an anonymous
    client learns nothing of the limits, and holds nothing of the budget."""
    length = str(keyed.client.app.state.settings.image.max_upload_bytes + 1)  # type: ignore[attr-defined]
    upload = Upload(keyed.client.app, calibrate_body(3_000), declare=False, request_headers={"content-length": length})
    on_app_loop(keyed.client, lambda: upload.start().finished())
    assert upload.status == 401 and upload.json()["error"]["code"] == "unauthorized"
    assert upload.reads == 0


def test_a_malformed_body_without_a_key_gets_401_not_a_description_of_the_route(keyed: Keyed, photo: Photo) -> None:
    """Each body is refused 400/422 to a caller with the route's scope; without a valid key it is 401, with a
    narrower one 403."""
    client = keyed.client
    undecodable = b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\n\xff\r\n--b--\r\n'
    image, _ = form(photo(OBAMA))
    unknown_field, unknown_type = form(photo(OBAMA), nmae="typo")
    cases: list[tuple[str, bytes, dict[str, str], Scope, int]] = [
        ("/enroll", b"not multipart", MULTIPART, Scope.write, 400),
        ("/enroll", undecodable, MULTIPART, Scope.write, 400),  # a name that is not UTF-8
        ("/enroll", unknown_field, unknown_type, Scope.write, 422),
        ("/verify", image, JSON, Scope.read, 422),  # a form sent as JSON
        ("/calibrate", b'{"source": "pairs", "same": [0.1', JSON, Scope.admin, 422),
    ]
    for path, body, headers, scope, status in cases:
        case = (path, body[:40])
        error_of(client.post(path, content=body, headers=headers), 401, "unauthorized")
        revoked = {**headers, "X-API-Key": keyed.revoked}
        error_of(client.post(path, content=body, headers=revoked), 401, "unauthorized")
        if scope is not Scope.read:
            narrower = {**headers, **keyed.headers(Scope.read)}
            error_of(client.post(path, content=body, headers=narrower), 403, "forbidden")
        allowed = client.post(path, content=body, headers={**headers, **keyed.headers(scope)})
        assert allowed.status_code == status, (case, allowed.text)
        assert allowed.json()["error"]["code"] == "invalid_request", case


def test_a_valid_key_is_checked_once_before_the_body_and_the_work_is_done(
    keyed: Keyed, photo: Photo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key is looked up before the first receive(), once: the route's dependency reuses the middleware's
    answer. Then a real enrolment and verification."""
    client = keyed.client
    verifier = client.app.state.keys  # type: ignore[attr-defined]
    body, content_type = form(photo(OBAMA), name="Checked First")
    enrol = Upload(client.app, body, path="/enroll", request_headers={**content_type, **keyed.headers(Scope.write)})
    checks: list[tuple[str, int]] = []  # (check, receive() calls made before it)
    enabled, lookup = verifier.enabled, verifier.lookup

    def watched_enabled() -> bool:
        checks.append(("enabled", enrol.reads))
        return bool(enabled())

    def watched_lookup(key: str) -> ApiKeyRecord | None:
        checks.append(("lookup", enrol.reads))
        record: ApiKeyRecord | None = lookup(key)
        return record

    monkeypatch.setattr(verifier, "enabled", watched_enabled)
    monkeypatch.setattr(verifier, "lookup", watched_lookup)
    on_app_loop(client, lambda: enrol.start().finished())
    monkeypatch.undo()
    assert enrol.error is None and enrol.status == 201, enrol.sent
    assert checks == [("enabled", 0), ("lookup", 0)]
    assert enrol.reads == len(enrol.chunks) and budget_of(keyed.client).held == 0
    identity = enrol.json()["identity_id"]

    probe = {"image": photo(OBAMA_2)}
    r = client.post("/verify", files=probe, data={"identity_id": identity}, headers=keyed.headers(Scope.read))
    assert r.status_code == 200, r.text
    assert r.json()["match"] is True
    assert client.delete(f"/identities/{identity}", headers=keyed.headers(Scope.write)).status_code == 200
