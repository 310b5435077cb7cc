"""`facegate keys create|list|revoke|generate` and `facegate serve`'s refusal to open an unauthenticated API to
the network: through the real CLI (typer's runner, and one real `facegate serve` process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from app.auth.keys import hash_key, key_prefix
from app.cli import api_keys_configured, cli
from app.config import REPO_ROOT, Settings
from tests.system.live import free_port

runner = CliRunner()


def _run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = runner.invoke(cli, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'gallery.db'}"
    else:
        url = request.getfixturevalue("pg_schema_url")
    return {"FACEGATE_DATABASE_URL": url}


def test_create_list_revoke(db_env: dict[str, str]) -> None:
    code, out, err = _run(db_env, "keys", "create", "--name", "door 3", "--scope", "write")
    assert code == 0, err
    key = out.strip()
    prefix = key_prefix(key)
    assert prefix is not None and "not shown again" in err
    code, out, _ = _run(db_env, "keys", "create", "--name", "ops", "--scope", "admin")
    other = out.strip()

    engine = create_engine(db_env["FACEGATE_DATABASE_URL"])
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT prefix, key_hash, scopes FROM api_keys ORDER BY created_at")).all()
    engine.dispose()
    assert [(r.prefix, r.key_hash) for r in rows][0] == (prefix, hash_key(key))
    assert not any(key in str(value) or other in str(value) for row in rows for value in row)

    code, out, _ = _run(db_env, "keys", "list")
    assert code == 0 and prefix in out and "door 3" in out and "write" in out
    assert key not in out and hash_key(key) not in out and hash_key(other) not in out
    code, out, _ = _run(db_env, "keys", "list", "--json")
    listed = json.loads(out)
    assert [(k["prefix"], k["scope"], k["revoked_at"]) for k in listed] == [
        (prefix, "write", None),
        (other[3:11], "admin", None),
    ]
    assert all(set(k) == {"id", "prefix", "name", "scope", "created_at", "last_used_at", "revoked_at"} for k in listed)

    code, out, _ = _run(db_env, "keys", "revoke", prefix)
    assert code == 0 and out == f"revoked key {prefix} (write, 'door 3')\n"
    # again: it said "revoked" as if it had just happened; it says when it was, and changes nothing
    code, out, _ = _run(db_env, "keys", "list", "--all", "--json")
    revoked_at = datetime.fromisoformat(json.loads(out)[0]["revoked_at"])
    code, out, _ = _run(db_env, "keys", "revoke", key)
    assert code == 0 and out == (
        f"key {prefix} (write, 'door 3') was already revoked at {revoked_at:%Y-%m-%d %H:%M:%S}Z: nothing changed\n"
    )
    code, out, _ = _run(db_env, "keys", "list", "--all", "--json")
    assert datetime.fromisoformat(json.loads(out)[0]["revoked_at"]) == revoked_at
    code, out, _ = _run(db_env, "keys", "list", "--json")
    assert [k["prefix"] for k in json.loads(out)] == [other[3:11]]  # active keys only
    code, out, _ = _run(db_env, "keys", "list", "--all", "--json")
    assert [k["revoked_at"] is not None for k in json.loads(out)] == [True, False]

    code, _, err = _run(db_env, "keys", "revoke", "0badc0de")
    assert code == 2 and "unknown_api_key" in err
    code, _, err = _run(db_env, "keys", "create", "--name", "x", "--scope", "root")
    assert code == 2  # not a scope


def test_generate_prints_a_fresh_key_and_stores_nothing(tmp_path: Path) -> None:
    env = {"FACEGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'g.db'}"}
    code, out, _ = _run(env, "keys", "generate")
    assert code == 0 and key_prefix(out.strip()) is not None
    assert not (tmp_path / "g.db").exists()
    assert Settings(auth={"bootstrap_key": out.strip()}).auth.bootstrap_key is not None


def test_auth_is_configured_by_keys_or_settings(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    assert not api_keys_configured(Settings(database_url=url))
    assert not (tmp_path / "g.db").exists()  # the check creates nothing
    assert api_keys_configured(Settings(database_url=url, auth={"required": True}))
    code, out, _ = _run({"FACEGATE_DATABASE_URL": url}, "keys", "create", "--name", "k")
    assert code == 0
    assert api_keys_configured(Settings(database_url=url))
    _run({"FACEGATE_DATABASE_URL": url}, "keys", "revoke", out.strip())
    assert api_keys_configured(Settings(database_url=url))  # revoked keys keep auth on


def test_serve_refuses_the_network_without_keys(tmp_path: Path) -> None:
    env = {"FACEGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'g.db'}"}
    code, _, err = _run(env, "serve", "--host", "0.0.0.0", "--port", "1")
    assert code == 2 and "refusing to listen on 0.0.0.0 without API keys" in " ".join(err.split())
    code, _, err = _run({**env, "FACEGATE_HOST": "0.0.0.0"}, "serve", "--port", "1")
    assert code == 2 and "refusing" in err
    assert not (tmp_path / "g.db").exists()  # refused before the start-up checks, which create the SQLite file


@pytest.mark.slow
@pytest.mark.model
def test_serve_without_keys_listens_on_loopback_and_logs_json(tmp_path: Path, models_dir: Path) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")},
        "FACEGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'g.db'}",
        "FACEGATE_MODELS_DIR": str(models_dir),
        "FACEGATE_PRELOAD_MODELS": "false",
        "FACEGATE_RUNTIME__PROVIDERS": '["CPUExecutionProvider"]',
        "FACEGATE_LOG__FORMAT": "json",
    }
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    with out_path.open("w") as out, err_path.open("w") as err:
        server = subprocess.Popen(
            [sys.executable, "-c", "from app.cli import main; main()", "serve", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 90
            while "Application startup complete" not in err_path.read_text():
                assert server.poll() is None, err_path.read_text()
                assert time.monotonic() < deadline, err_path.read_text()
                time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
                assert response.status == 200
            time.sleep(0.5)  # the access line is written after the response is sent
        finally:
            server.terminate()
            server.wait(timeout=30)
    assert out_path.read_text() == ""  # every start-up line is a JSON log record, on stderr
    lines = [json.loads(line) for line in err_path.read_text().splitlines() if line.strip()]
    assert any(
        line["logger"] == "facegate.serve" and "every route is open, so facegate listens on 127.0.0.1 only" in line["message"]
        for line in lines
    )
    assert any(f"http://127.0.0.1:{port}" in line["message"] for line in lines)  # uvicorn's "running on"
    access = [line for line in lines if line["logger"] == "facegate.access"]
    assert [(a["method"], a["route"], a["status"]) for a in access] == [("GET", "/healthz", 200)]
    assert any(line["logger"] == "app.auth.verifier" and "auth: off" in line["message"] for line in lines)
