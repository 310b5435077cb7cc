"""Error responses name nothing internal and echo nothing big: an unexpected database failure is a generic 500
(no SQL, table, path, traceback or parameter in the body, and the parameters stay out of the server log too);
validation errors and 404s do not send the client's huge input back."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import api_settings, error_of, running

SECRET = "Quentin Zygmunt"


def test_a_database_failure_is_a_generic_500_and_logs_no_parameters(
    models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "g.db"
    with running(api_settings(models_dir, f"sqlite:///{db}", preload_models=False)) as client:
        assert client.get("/identities", params={"name": SECRET}).status_code == 200
        with sqlite3.connect(db) as connection:  # the table disappears under the running service
            connection.execute("ALTER TABLE identities RENAME TO identities_gone")
        caplog.set_level(logging.ERROR)
        r = client.get("/identities", params={"name": SECRET})
    error = error_of(r, 500, "internal_error")
    assert set(error) == {"code", "message"}
    for leak in ("SELECT", "identities", "sqlite", "Traceback", "OperationalError", str(tmp_path), SECRET, ".py"):
        assert leak not in r.text, leak
    server_side = [r for r in caplog.records if not r.name.startswith("httpx")]  # not the test client's own log
    formatter = logging.Formatter()
    logged = "\n".join(formatter.format(r) for r in server_side)
    assert "no such table" in logged  # the server log has the cause ...
    assert SECRET not in logged and SECRET.split()[0] not in logged  # ... but not the statement's parameters


def test_a_body_of_the_wrong_kind_is_named(models_dir: Path, tmp_path: Path) -> None:
    """`curl -d '{...}'` without a Content-Type sends a form; JSON sent to a form endpoint reads as missing fields.
    The 422 says which kind the endpoint takes instead of only what is missing; a body of the right kind gets no
    such hint."""
    db = tmp_path / "g.db"
    with running(api_settings(models_dir, f"sqlite:///{db}", preload_models=False)) as client:
        form = {"content-type": "application/x-www-form-urlencoded"}
        for method, path in (("PATCH", f"/identities/{'0' * 32}"), ("POST", "/calibrate")):
            r = client.request(method, path, content=b'{"name": "Alice"}', headers=form)
            message = error_of(r, 422, "invalid_request")["message"]
            assert "takes a JSON body (Content-Type: application/json), not application/x-www-form-urlencoded" in (
                message
            ), (path, message)
        r = client.post("/identify", json={"image": "aGVsbG8="})
        message = error_of(r, 422, "invalid_request")["message"]
        assert message.endswith("(this endpoint takes multipart/form-data (curl -F), not application/json)")
        r = client.post("/calibrate", json={"source": "nowhere"})  # JSON, as the route wants, but wrong
        assert "this endpoint takes" not in error_of(r, 422, "invalid_request")["message"]
        r = client.post("/identify", files={"image": ("a.jpg", b"x", "image/jpeg")}, data={"top_k": "0"})
        assert "this endpoint takes" not in error_of(r, 422, "invalid_request")["message"]
        # A photo sent as a text field (curl -F image=photo.jpg, without the @): named as such, not by a Python class.
        for path, field in (("/identify", "image"), ("/embed", "images")):
            r = client.post(path, files={field: (None, b"photo.jpg")})
            error = error_of(r, 422, "invalid_request")
            expected = f"expected a file upload (curl -F '{field}=@photo.jpg'), not a text field"
            assert expected in error["message"] and "class" not in r.text, r.text
            assert error["details"]["errors"][0]["message"] == expected


@pytest.mark.model
class TestNoEcho:
    def test_a_huge_unknown_json_key_is_cut(self, shared_client: TestClient) -> None:
        key = "A" * 100_000
        r = shared_client.patch(f"/identities/{'0' * 32}", json={key: 1})
        error_of(r, 422, "invalid_request")
        assert len(r.content) < 2_000 and "A" * 100 not in r.text

    def test_many_errors_are_capped(self, shared_client: TestClient) -> None:
        r = shared_client.patch(f"/identities/{'0' * 32}", json={f"k{i}": 1 for i in range(20_000)})
        error = error_of(r, 422, "invalid_request")
        assert len(error["details"]["errors"]) == 20 and len(r.content) < 5_000
        assert error["details"]["n_errors"] == 20_000 and error["message"].endswith("; and 19995 more")

    def test_many_long_unknown_form_fields_are_cut_and_capped(self, shared_client: TestClient) -> None:
        """999 unknown fields with 4 kB names were an 8 MB reply, every name in full twice."""
        names = [f"{i:03d}" + "y" * 4000 for i in range(999)]
        image = {"image": ("a.jpg", b"x", "image/jpeg")}
        r = shared_client.post("/identify", data=dict.fromkeys(names, "x"), files=image)
        error = error_of(r, 422, "invalid_request")
        assert len(r.content) < 5_000
        details = error["details"]
        assert details["unknown_fields"] == [name[:64] + "..." for name in names[:20]]
        assert details["n_unknown_fields"] == 999 and details["allowed_fields"] == ["image", "top_k", "threshold"]
        assert f"'{names[19][:64]}...' and 979 more; this endpoint takes image" in error["message"]
        assert names[20][:64] not in r.text

    def test_a_few_short_unknown_form_fields_are_named_in_full(self, shared_client: TestClient) -> None:
        image = {"image": ("a.jpg", b"x", "image/jpeg")}
        error = error_of(shared_client.post("/identify", data={"topk": "3"}, files=image), 422, "invalid_request")
        assert error["message"] == "unknown field(s) 'topk'; this endpoint takes image, top_k, threshold"
        assert error["details"]["unknown_fields"] == ["topk"] and error["details"]["n_unknown_fields"] == 1

    def test_a_huge_file_name_is_cut(self, shared_client: TestClient) -> None:
        """Many-photo replies echo each file name (never stored): cut like any client text."""
        name = "C" * 4000 + ".jpg"  # a multipart header line holds at most 4 kB
        r = shared_client.post("/embed", files=[("images", (name, b"x", "image/jpeg"))])
        assert r.status_code == 200, r.text[:300]
        assert r.json()["images"][0]["filename"] == "C" * 64 + "..." and len(r.content) < 1_000

    def test_a_huge_path_is_not_echoed(self, shared_client: TestClient) -> None:
        r = shared_client.get("/" + "B" * 5_000)
        error_of(r, 404, "not_found")
        assert len(r.content) < 300
        r = shared_client.put("/identities")
        assert r.status_code == 405 and len(r.content) < 300

    def test_a_huge_text_value_is_not_echoed(self, shared_client: TestClient) -> None:
        image = {"image": ("a.jpg", b"x", "image/jpeg")}
        r = shared_client.post("/identify", data={"top_k": "9" * 50_000}, files=image)
        error_of(r, 422, "invalid_request")
        assert "9" * 100 not in r.text
