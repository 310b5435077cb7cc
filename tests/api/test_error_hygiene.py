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
