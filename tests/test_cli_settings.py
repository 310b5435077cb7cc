"""The command line's answer to wrong settings and an unusable database: exit status 2 and one line naming the
FACEGATE_ variable, never a traceback (no models needed: these fail before any is loaded)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import cli
from tests.system.live import free_port


def run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr


@pytest.fixture
def sqlite_env(tmp_path: Path) -> dict[str, str]:
    return {"FACEGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'gallery.db'}"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"FACEGATE_THRESHOLD": "abc"}, "FACEGATE_THRESHOLD: Input should be a valid number"),
        ({"FACEGATE_THRESHOLD": ""}, "FACEGATE_THRESHOLD: Input should be a valid number"),  # empty is not unset
        ({"FACEGATE_PORT": "0"}, "FACEGATE_PORT: Input should be greater than or equal to 1"),
        ({"FACEGATE_DETECTOR__UPSAMPLE": "3"}, "FACEGATE_DETECTOR: detector upsample must be 'auto', 0, 1 or 2"),
        ({"FACEGATE_LOG__LEVEL": "verbose"}, "FACEGATE_LOG__LEVEL: Input should be 'DEBUG'"),
        ({"FACEGATE_RUNTIME__PROVIDERS": "CPUExecutionProvider"}, "FACEGATE_RUNTIME (or one of its FACEGATE_RUNTIME__"),
        # Database URLs SQLAlchemy cannot parse, other databases, and PostgreSQL without psycopg 3 (psycopg2's scheme)
        ({"FACEGATE_DATABASE_URL": ""}, "FACEGATE_DATABASE_URL: not a database URL"),
        ({"FACEGATE_DATABASE_URL": "gallery.db"}, "FACEGATE_DATABASE_URL: not a database URL"),
        ({"FACEGATE_DATABASE_URL": "mysql://u@host/db"}, "FACEGATE_DATABASE_URL: mysql:// is not supported"),
        ({"FACEGATE_DATABASE_URL": "postgresql://u:pw@host/db"}, "postgresql:// is not supported: facegate uses"),
        # NaN and infinity: where no bound is set they passed (no face ever found, or hundreds of false ones)
        ({"FACEGATE_DETECTOR__SCORE_THRESHOLD": "nan"}, "FACEGATE_DETECTOR__SCORE_THRESHOLD: Input should be a finite"),
        ({"FACEGATE_DETECTOR__SCORE_THRESHOLD": "-inf"}, "FACEGATE_DETECTOR__SCORE_THRESHOLD: Input should be a finite"),
        ({"FACEGATE_QUALITY__MIN_SCORE": "nan"}, "FACEGATE_QUALITY__MIN_SCORE: Input should be a finite number"),
        # Above ~1.1 no face is ever found; below -1 hundreds of false ones per photo, at seconds each
        ({"FACEGATE_DETECTOR__SCORE_THRESHOLD": "1e300"}, "FACEGATE_DETECTOR__SCORE_THRESHOLD: Input should be less"),
        ({"FACEGATE_DETECTOR__SCORE_THRESHOLD": "-5"}, "FACEGATE_DETECTOR__SCORE_THRESHOLD: Input should be greater"),
        ({"FACEGATE_QUALITY__MIN_SCORE": "3"}, "FACEGATE_QUALITY__MIN_SCORE: Input should be less than or equal to 2"),
        ({"FACEGATE_THRESHOLD": "nan"}, "FACEGATE_THRESHOLD: Input should be a finite number"),
        ({"FACEGATE_HOST": ""}, "FACEGATE_HOST: String should have at least 1 character"),  # uvicorn: every interface
        ({"FACEGATE_HEAD__NAME": ""}, "FACEGATE_HEAD__NAME: String should have at least 1 character"),
        ({"FACEGATE_RUNTIME__PROVIDERS": "[]"}, "FACEGATE_RUNTIME__PROVIDERS: List should have at least 1 item"),
        ({"FACEGATE_INDEX__BACKEND": "pgvector"}, "FACEGATE_INDEX__BACKEND=pgvector needs a PostgreSQL gallery"),
        # Path("") is the current folder: heads were looked for (and registered) there
        ({"FACEGATE_HEAD__DIR": ""}, "FACEGATE_HEAD__DIR: an empty path is not a folder"),
        ({"FACEGATE_MODELS_DIR": ""}, "FACEGATE_MODELS_DIR: an empty path is not a folder"),
        ({"FACEGATE_RUNTIME__INTRA_OP_THREADS": "100000"}, "FACEGATE_RUNTIME__INTRA_OP_THREADS: Input should be less"),
        # PostgreSQL's statement timeout (15 s) ended the lock wait long before this
        (
            {"FACEGATE_DATABASE_URL": "postgresql+psycopg://u@host/db", "FACEGATE_DATABASE_LOCK_TIMEOUT": "60"},
            "FACEGATE_DATABASE_LOCK_TIMEOUT (60) must not exceed FACEGATE_DATABASE_STATEMENT_TIMEOUT (15)",
        ),
    ],
)
def test_a_refused_setting_is_named_without_a_traceback(
    sqlite_env: dict[str, str], env: dict[str, str], expected: str
) -> None:
    code, err = run({**sqlite_env, **env}, "keys", "list")
    assert code == 2, err
    assert err.startswith("error: invalid settings: ") and expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("url", ["sqlite:///", "sqlite://", "sqlite:///:memory:"])
@pytest.mark.parametrize("command", [["keys", "list"], ["identify", "photo.jpg"], ["enroll", "."], ["serve"]])
def test_an_in_memory_sqlite_gallery_is_refused(url: str, command: list[str], tmp_path: Path) -> None:
    """`sqlite:///$UNSET_VARIABLE` reads `sqlite:///`, an in-memory database: `enroll` reported its people enrolled
    and stored them nowhere, `identify` answered from an empty gallery, `serve` lost every enrolment at its stop
    (and gave each worker a gallery of its own)."""
    (tmp_path / "photo.jpg").write_bytes(b"")
    code, err = run({"FACEGATE_DATABASE_URL": url}, *[str(tmp_path / a) if "." in a else a for a in command])
    assert code == 2, err
    assert err.startswith("error: invalid settings: FACEGATE_DATABASE_URL names an in-memory SQLite database"), err


def test_the_database_url_is_checked_with_the_settings() -> None:
    """The server refuses it at start-up too (it reads the same settings), before any connection is tried."""
    from pydantic import ValidationError

    from app.config import Settings

    for url in ("sqlite:///gallery.db", "sqlite://", "postgresql+psycopg://u:pw@127.0.0.1/db"):
        assert Settings(database_url=url).database_url == url
    with pytest.raises(ValidationError, match="is not supported") as refused:
        Settings(database_url="postgresql://u:secret-pw@127.0.0.1/db")
    assert "secret-pw" not in str(refused.value.errors()[0]["msg"])


def test_a_refused_secret_is_not_echoed(sqlite_env: dict[str, str]) -> None:
    code, err = run({**sqlite_env, "FACEGATE_AUTH__BOOTSTRAP_KEY": "hunter2-not-a-key"}, "serve")
    assert code == 2 and "FACEGATE_AUTH__BOOTSTRAP_KEY" in err
    assert "hunter2" not in err


@pytest.mark.parametrize("command", [["db", "upgrade"], ["keys", "create", "--name", "x", "--scope", "read"], ["serve"]])
def test_a_database_that_cannot_be_opened_is_one_line(tmp_path: Path, command: list[str]) -> None:
    env = {"FACEGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'no-such-folder' / 'gallery.db'}"}
    if command == ["serve"]:
        env["FACEGATE_AUTH__REQUIRED"] = "false"
        (tmp_path / "no-such-folder").mkdir()
        (tmp_path / "no-such-folder" / "gallery.db").mkdir()  # a folder where the database file should be
    code, err = run(env, *command)
    assert code == 2, err
    assert err.startswith("error: cannot ") and "(FACEGATE_DATABASE_URL): unable to open database file" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "command",
    [
        ["reindex"],
        ["identify", "photo.jpg"],
        ["keys", "revoke", "0badc0de"],
        ["keys", "list"],
        ["db", "purge-photos", "--yes"],
    ],
)
def test_a_command_on_an_existing_gallery_refuses_a_missing_sqlite_file(tmp_path: Path, command: list[str]) -> None:
    """These read or change what a gallery holds: opening a SQLite file that is not there created an empty gallery
    and answered from it ('0 faces recomputed', every face unknown). Refused before the models load (none here), and
    no file is created. (`keys create` may make the gallery: a set-up step before the first enrolment; `calibrate
    --apply`, which needs photos, is in tests/test_cli_eval.py.)"""
    (tmp_path / "photo.jpg").write_bytes(b"not looked at")
    gallery = tmp_path / "galery.db"
    env = {"FACEGATE_DATABASE_URL": f"sqlite:///{gallery}", "FACEGATE_MODELS_DIR": str(tmp_path / "no-models")}
    code, err = run(env, *[str(tmp_path / a) if a == "photo.jpg" else a for a in command])
    assert code == 2, err
    assert err == f"error: the SQLite database {gallery} (FACEGATE_DATABASE_URL) does not exist: this command needs " \
        "an existing gallery (`facegate enroll`, `db upgrade` or `serve` create one)\n"  # fmt: skip
    assert not gallery.exists()


def test_an_empty_setting_says_it_is_empty_and_how_to_take_the_default(sqlite_env: dict[str, str]) -> None:
    """`export FACEGATE_THRESHOLD=` is refused rather than read as unset (README, Settings), but the refusal only said
    "Input should be a valid number", as for a typo in the value."""
    code, err = run({**sqlite_env, "FACEGATE_THRESHOLD": "", "FACEGATE_PORT": ""}, "keys", "list")
    assert code == 2, err
    assert "FACEGATE_THRESHOLD: Input should be a valid number, unable to parse string as a number (the variable is " \
        "empty: unset it to take the default)" in err, err  # fmt: skip
    assert "FACEGATE_PORT: Input should be a valid integer, unable to parse string as an integer (the variable is " \
        "empty" in err, err  # fmt: skip
    code, err = run({**sqlite_env, "FACEGATE_THRESHOLD": "abc"}, "keys", "list")
    assert code == 2 and "empty" not in err, err


def test_a_missing_relative_sqlite_file_points_to_the_folder_not_to_a_new_gallery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default ./facegate.db is read from the current folder: `facegate keys list` (or identify) run outside the
    checkout where `make run` keeps its gallery was told to create one (`enroll`, `db upgrade` or `serve`), a second,
    empty gallery. The refusal names the folder it looked in and the fix."""
    monkeypatch.chdir(tmp_path)
    code, err = run({"FACEGATE_DATABASE_URL": "sqlite:///./facegate.db"}, "keys", "list")
    assert code == 2, err
    assert f"does not exist in the current folder ({tmp_path})" in err, err
    assert "run the command from the folder that holds the gallery" in err and "an absolute path" in err, err
    assert "create one" not in err, err
    assert not (tmp_path / "facegate.db").exists()


def test_a_database_migrated_by_a_newer_version_is_one_line(sqlite_env: dict[str, str]) -> None:
    from sqlalchemy import create_engine, text

    assert run(sqlite_env, "db", "upgrade")[0] == 0
    engine = create_engine(sqlite_env["FACEGATE_DATABASE_URL"])
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    code, err = run(sqlite_env, "keys", "list")
    assert code == 2 and err.startswith("error: cannot migrate the database") and "'9999'" in err, err


@pytest.mark.parametrize("command", [["serve"], ["keys", "list"]])
def test_heic_without_pi_heif_is_refused_at_start(
    sqlite_env: dict[str, str], command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """FACEGATE_IMAGE__HEIC=true where the `heic` extra is not installed: every upload would fail, so nothing starts,
    and the line says what to install. (serve is given a port in use: were the setting not checked, it would stop
    there rather than serve.)"""
    monkeypatch.setitem(sys.modules, "pi_heif", None)  # `import pi_heif` fails, as without the package
    env = {**sqlite_env, "FACEGATE_AUTH__REQUIRED": "true", "FACEGATE_IMAGE__HEIC": "true"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = ["--port", str(taken.getsockname()[1])] if command == ["serve"] else []
        code, err = run(env, *command, *port)
    assert code == 2, err
    assert err.startswith("error: invalid settings: FACEGATE_IMAGE__HEIC: HEIC decoding needs the pi-heif package")
    assert "facegate's `heic` extra" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_heic_is_checked_with_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """On with pi-heif installed; refused when its libheif does not load (pi-heif defers that error to first use)."""
    import pi_heif
    from pydantic import ValidationError

    from app.config import Settings

    assert Settings().image.heic is False
    assert Settings(image={"heic": True}).image.heic is True

    def broken() -> None:
        raise ImportError("libheif.so.1: cannot open shared object file")

    monkeypatch.setattr(pi_heif, "libheif_info", broken)
    with pytest.raises(ValidationError, match="pi-heif is installed but its libheif does not load: libheif.so.1"):
        Settings(image={"heic": True})


def test_serve_checks_the_models_and_database_before_starting_workers(tmp_path: Path) -> None:
    """Each uvicorn worker would print its own start-up traceback and uvicorn exit 3; serve says it once. Auth is
    required here, so the API-key check does not read the database first."""
    port = str(free_port())
    env = {"FACEGATE_AUTH__REQUIRED": "true", "FACEGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'gallery.db'}"}
    code, err = run({**env, "FACEGATE_MODELS_DIR": str(tmp_path / "no-models")}, "serve", "--port", port)
    assert code == 2 and err.strip() == f"error: no manifest.json in {tmp_path / 'no-models'}: build the models with `make models`"
    missing_folder = {**env, "FACEGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'no-folder' / 'gallery.db'}"}
    code, err = run(missing_folder, "serve", "--port", port)
    assert code == 2 and "cannot use the database (FACEGATE_DATABASE_URL): unable to open database file" in err


def test_serve_refuses_a_schema_migrated_by_a_newer_facegate(tmp_path: Path) -> None:
    """Each worker's migration failed with alembic's traceback ("Can't locate revision") and uvicorn exited 3."""
    import sqlite3

    from app.gallery import db

    path = tmp_path / "gallery.db"
    db.upgrade(f"sqlite:///{path}")
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    port = str(free_port())
    code, err = run({"FACEGATE_AUTH__REQUIRED": "true", "FACEGATE_DATABASE_URL": f"sqlite:///{path}"}, "serve", "--port", port)
    assert code == 2 and err.startswith("error: the database is at schema revision 9999, which this facegate"), err


def test_serve_refuses_a_database_with_anothers_tables_of_the_same_names(tmp_path: Path) -> None:
    """A database never migrated by facegate that already has a table it would create (another application's
    `identities`): every worker's first migration failed with "table identities already exists" and a traceback."""
    import sqlite3

    path = tmp_path / "shared.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE identities (id INTEGER)")
        connection.execute("CREATE TABLE api_keys (id INTEGER)")
    env = {"FACEGATE_AUTH__REQUIRED": "true", "FACEGATE_DATABASE_URL": f"sqlite:///{path}"}
    code, err = run(env, "serve", "--port", str(free_port()))
    assert code == 2 and err.strip() == (
        "error: the database has no facegate schema revision (no alembic_version table) but already has the table(s) "
        "api_keys, identities: another application's? Give facegate a database of its own"
    ), err
    with sqlite3.connect(path) as connection:  # left as it was
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"identities", "api_keys"}


def test_serve_in_json_log_mode_refuses_such_a_database_in_one_line(tmp_path: Path) -> None:
    """FACEGATE_LOG__FORMAT=json: the refusal is one JSON line as it is one text line. The checks' opening of the
    database was logged at INFO before it (alembic's "Context impl SQLiteImpl." and "Will assume non-transactional
    DDL."), lines text mode never shows, even with --log-level WARNING."""
    import sqlite3

    path = tmp_path / "shared.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE identities (id INTEGER)")
    env = {
        **os.environ,
        "FACEGATE_AUTH__REQUIRED": "true",
        "FACEGATE_DATABASE_URL": f"sqlite:///{path}",
        "FACEGATE_LOG__FORMAT": "json",
    }
    for level in ([], ["--log-level", "WARNING"]):
        serve = [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port()), *level]
        run = subprocess.run(serve, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr
        [line] = [json.loads(line) for line in run.stderr.splitlines()]
        assert (line["level"], line["logger"]) == ("ERROR", "facegate.cli"), line
        assert line["message"].startswith("the database has no facegate schema revision"), line


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "http://127.0.0.1", "no-such-host.invalid"])
def test_serve_refuses_a_host_that_does_not_resolve_before_anything_loads(tmp_path: Path, host: str) -> None:
    """uvicorn found it only after loading the models and the gallery: '[Errno -2] Name or service not known',
    naming neither the host nor the setting, and exit status 3."""
    env = {
        "FACEGATE_AUTH__REQUIRED": "true",
        "FACEGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'gallery.db'}",
        "FACEGATE_MODELS_DIR": str(tmp_path / "no-models"),
        "FACEGATE_HOST": host,
    }
    code, err = run(env, "serve", "--port", "18259")
    assert code == 2 and err.startswith(f"error: cannot listen on {host}:18259: "), err
    assert not (tmp_path / "gallery.db").exists()


@pytest.mark.parametrize(
    "manifest",
    ["{cut", "{}", '{"model_name": "m", "model_version": "v", "opset": 17, "models": {"embedder": {}}}'],
)
def test_a_broken_model_manifest_is_one_line(sqlite_env: dict[str, str], tmp_path: Path, manifest: str) -> None:
    """A cut or hand-edited manifest.json ended every command, `serve` included, with a traceback (exit status 1)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "manifest.json").write_text(manifest)
    env = {**sqlite_env, "FACEGATE_AUTH__REQUIRED": "true", "FACEGATE_MODELS_DIR": str(tmp_path / "models")}
    port = str(free_port())
    code, err = run(env, "serve", "--port", port)
    assert code == 2 and err.startswith(f"error: {tmp_path / 'models' / 'manifest.json'} is unreadable"), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("preload", ["true", "false"])
def test_serve_refuses_require_gpu_without_a_usable_cuda_provider(tmp_path: Path, preload: str) -> None:
    """Every worker's start-up failed with a traceback and uvicorn exited 3; with the models loaded on first use the
    server started, /readyz said ready and every photo was answered 503 model_unavailable."""
    env = {
        "FACEGATE_AUTH__REQUIRED": "true",
        "FACEGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'gallery.db'}",
        "FACEGATE_REQUIRE_GPU": "true",
        "FACEGATE_RUNTIME__PROVIDERS": '["CPUExecutionProvider"]',  # no CUDA whatever the machine
        "FACEGATE_PRELOAD_MODELS": preload,
    }
    port = str(free_port())
    code, err = run(env, "serve", "--port", port)
    assert code == 2 and err.startswith("error: FACEGATE_REQUIRE_GPU is set but the CUDA provider cannot be used"), err
    assert len(err.strip().splitlines()) == 1


def test_serve_refuses_a_port_in_use_before_anything_loads(tmp_path: Path) -> None:
    """uvicorn found the port taken only after loading everything, logged "address already in use" and exited 3.
    Refused first: the models folder here does not exist and the SQLite file is not created."""
    env = {
        "FACEGATE_AUTH__REQUIRED": "true",
        "FACEGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'gallery.db'}",
        "FACEGATE_MODELS_DIR": str(tmp_path / "no-models"),
    }
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run(env, "serve", "--port", str(port))
    assert code == 2 and err == f"error: cannot listen on 127.0.0.1:{port}: Address already in use: choose another " \
        "with --port or FACEGATE_PORT (FACEGATE_PORT=8001 make run)\n", err  # fmt: skip
    assert not (tmp_path / "gallery.db").exists()


def test_an_unknown_facegate_variable_is_reported(sqlite_env: dict[str, str]) -> None:
    """pydantic-settings ignores variables that name no setting: a typo left the default in force silently."""
    env = {**sqlite_env, "FACEGATE_TRESHOLD": "0.3", "FACEGATE_DETECTOR__UPSAMPL": "1", "FACEGATE_FOO": "1"}
    env |= {"FACEGATE_DETECTOR__UPSAMPLE": "1", "FACEGATE_FACES_DIR": "/faces"}  # a setting, the tests' own
    code, err = run(env, "db", "upgrade")
    assert code == 0, err
    lines = err.splitlines()
    assert {
        "warning: FACEGATE_DETECTOR__UPSAMPL is not a facegate setting and is ignored (did you mean "
        "FACEGATE_DETECTOR__UPSAMPLE?)",
        "warning: FACEGATE_FOO is not a facegate setting and is ignored",
        "warning: FACEGATE_TRESHOLD is not a facegate setting and is ignored (did you mean FACEGATE_THRESHOLD?)",
    } <= set(lines)
    assert not [line for line in lines if "FACEGATE_DETECTOR__UPSAMPLE " in line or "FACEGATE_FACES_DIR" in line]


@pytest.mark.parametrize("far", ["0", "1", "nan", "inf", "-0.001"])
def test_calibrate_refuses_a_target_far_at_its_ends_before_embedding(tmp_path: Path, far: str) -> None:
    """FAR 0 and 1 have no threshold; the refusal came after every photo had been embedded (here the models are
    missing: the refusal must come first). NaN was refused as 'less than or equal to 1'."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("img_a,img_b,same\na.jpg,b.jpg,1\n")
    env = {"FACEGATE_MODELS_DIR": str(tmp_path / "no-models")}
    code, err = run(env, "calibrate", "--pairs", str(pairs), "--images", str(tmp_path), "--far", far)
    assert code == 2, err
    expected = f"Invalid value for '--far': {float(far):g} is not in the range 0<x<1 (a share of different-person pairs)"
    assert expected in " ".join(err.replace("│", " ").split()), err


def test_python_m_app_cli_is_the_command(tmp_path: Path) -> None:
    """`python -m app.cli` runs the command where the installed `facegate` script is not the checkout's own."""
    env = {**os.environ, "FACEGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'gallery.db'}"}
    run = subprocess.run([sys.executable, "-m", "app.cli", "db", "upgrade"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("database at revision")


@pytest.mark.parametrize(
    "command", [["verify", "a.jpg", "b.jpg"], ["identify", "a.jpg"], ["cluster", "."], ["eval", "--pairs", "p.csv"]]
)
@pytest.mark.parametrize("threshold", ["0", "-0.1", "4.5"])
def test_a_threshold_outside_0_to_4_is_refused(sqlite_env: dict[str, str], command: list[str], threshold: str) -> None:
    """As in FACEGATE_THRESHOLD and the API's `threshold` field: above 0 (at 0 only a photo and itself match), at
    most 4 (the threshold range; dlib's raw embeddings are not unit vectors and lie well within it). Refused while the arguments are read."""
    code, err = run(sqlite_env, command[0], "--threshold", threshold, *command[1:])
    assert code == 2 and f"Invalid value for '--threshold': {float(threshold)} is not in the range 0<x<=4" in err, err


def test_every_facegate_variable_of_the_deployment_files_is_known() -> None:
    """Exporting a variable that docker compose reads (FACEGATE_BOOTSTRAP_KEY, as its comment suggests) must not
    make every command warn that it names no setting."""
    from app.config import REPO_ROOT, unknown_variables

    files = ["docker-compose.yml", "docker-compose.gpu.yml", "Dockerfile", "Makefile", "tests/docker/compose_roundtrip.sh"]
    named = {m for f in files for m in re.findall(r"FACEGATE_[A-Z0-9_]*[A-Z0-9]", (REPO_ROOT / f).read_text())}
    assert {"FACEGATE_BOOTSTRAP_KEY", "FACEGATE_AUTH__BOOTSTRAP_KEY"} <= named
    assert unknown_variables(dict.fromkeys(named, "x")) == []


def test_a_typo_inside_a_groups_json_is_reported(sqlite_env: dict[str, str]) -> None:
    """A whole group as JSON: its keys are read in any case, and one that names no setting was ignored silently."""
    env = {**sqlite_env, "FACEGATE_DETECTOR": '{"upsampel": 1, "SCORE_THRESHOLD": 0.1, "x": 2}'}
    code, err = run(env, "db", "upgrade")
    assert code == 0, err
    assert err.splitlines() == [
        "warning: FACEGATE_DETECTOR key 'upsampel' is not a facegate setting and is ignored (did you mean 'upsample'?)",
        "warning: FACEGATE_DETECTOR key 'x' is not a facegate setting and is ignored",
    ]


def test_a_compose_variable_without_its_setting_is_reported(sqlite_env: dict[str, str]) -> None:
    """FACEGATE_BOOTSTRAP_KEY is docker compose's: the README's compose line copied onto a facegate command started
    it without the key, silently."""
    code, err = run({**sqlite_env, "FACEGATE_BOOTSTRAP_KEY": "x", "FACEGATE_LOG_FORMAT": "json"}, "db", "upgrade")
    assert code == 0, err
    assert err.splitlines() == [
        "warning: FACEGATE_BOOTSTRAP_KEY is read by docker-compose.yml, which passes it on as "
        "FACEGATE_AUTH__BOOTSTRAP_KEY: facegate itself reads FACEGATE_AUTH__BOOTSTRAP_KEY",
        "warning: FACEGATE_LOG_FORMAT is read by docker-compose.yml, which passes it on as FACEGATE_LOG__FORMAT: "
        "facegate itself reads FACEGATE_LOG__FORMAT",
    ]
    code, err = run({**sqlite_env, "FACEGATE_LOG_FORMAT": "json", "FACEGATE_LOG__FORMAT": "json"}, "db", "upgrade")
    assert code == 0 and err == "", err


@pytest.mark.parametrize("command", [["--log-level", "verbose", "keys", "list"], ["serve", "--log-level", "verbose"]])
def test_an_unknown_log_level_is_refused_without_a_traceback(sqlite_env: dict[str, str], command: list[str]) -> None:
    """logging.basicConfig and uvicorn's logging.config raised ValueError on another word: a traceback."""
    code, err = run(sqlite_env, *command)
    assert code == 2 and "'verbose' is not one of DEBUG" in err, err


def test_a_log_level_is_any_case(sqlite_env: dict[str, str]) -> None:
    code, err = run(sqlite_env, "--log-level", "error", "db", "upgrade")
    assert code == 0, err


def test_load_synthetic_refuses_a_negative_seed(sqlite_env: dict[str, str]) -> None:
    """numpy's generator refuses it: a ValueError traceback after the database was opened."""
    code, err = run(sqlite_env, "db", "load-synthetic", "--faces", "3", "--seed", "-1")
    assert code == 2 and "Invalid value for '--seed'" in err, err


def test_load_synthetic_refuses_more_faces_than_it_can_draw(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    """--faces 10**12 was numpy's MemoryError traceback ("Unable to allocate 7.28 TiB"): the faces are drawn in
    memory first (~2.3 kB each). Refused while the arguments are read, before the database is opened."""
    code, err = run(sqlite_env, "db", "load-synthetic", "--faces", str(10**12))
    assert code == 2 and "Invalid value for '--faces'" in err and "5000000" in err, err
    assert not (tmp_path / "gallery.db").exists()


def test_a_refused_secret_is_not_in_the_settings_error() -> None:
    """`uvicorn --factory app.main:create_app` (no CLI to word the error) logs the ValidationError itself, whose
    text showed the refused value: most of a bootstrap key with a stray character, a database password."""
    from pydantic import ValidationError

    from app.auth.keys import generate_key
    from app.config import Settings

    key = generate_key()
    with pytest.raises(ValidationError) as refused:
        Settings(auth={"bootstrap_key": key + "\r"})  # a .env file written with CRLF line ends
    assert key[12:20] not in str(refused.value) and key[-8:] not in str(refused.value)
    with pytest.raises(ValidationError) as refused:
        Settings(database_url="postgresql://u:secret-pw@127.0.0.1/db")
    assert "secret-pw" not in str(refused.value)


def test_uvicorn_factory_refuses_a_setting_in_one_line() -> None:
    """README: run with `uvicorn --factory app.main:create_app`. A refused setting was pydantic's traceback, naming
    the model's field (`threshold`) and echoing the value, not the variable to fix."""
    env = {**os.environ, "FACEGATE_THRESHOLD": "abc"}
    command = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--port", str(free_port())]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert "facegate: invalid settings: FACEGATE_THRESHOLD: Input should be a valid number" in done.stderr
    assert "Traceback" not in done.stderr and "abc" not in done.stderr


def test_serve_in_json_log_mode_writes_its_warnings_and_refusals_as_json_lines(tmp_path: Path) -> None:
    """A log collector reading FACEGATE_LOG__FORMAT=json lines got serve's start-up warnings and its refusal as plain
    `warning:` / `error:` text (written before logging was configured). A subprocess: serve configures the process's
    logging for good."""
    env = {
        **os.environ,
        "FACEGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'gallery.db'}",
        "FACEGATE_LOG__FORMAT": "json",
        "FACEGATE_THRESHLD": "0.3",
        "FACEGATE_THRESHOLD": "abc",
    }
    serve = [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())]
    run = subprocess.run(serve, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = [json.loads(line) for line in run.stderr.splitlines()]
    assert [(line["level"], line["logger"]) for line in lines] == [("WARNING", "facegate.cli"), ("ERROR", "facegate.cli")]
    assert lines[0]["message"] == "FACEGATE_THRESHLD is not a facegate setting and is ignored (did you mean FACEGATE_THRESHOLD?)"
    assert lines[1]["message"].startswith("invalid settings: FACEGATE_THRESHOLD: Input should be a valid number")
    assert not (tmp_path / "gallery.db").exists()
    # A refused log format itself: the refusal is reported in text, the format serve could not read.
    run = subprocess.run(serve, env={**env, "FACEGATE_LOG__FORMAT": "xml"}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.splitlines()[-1].startswith("error: invalid settings: "), run.stderr
    assert "FACEGATE_LOG__FORMAT: Input should be 'text' or 'json'" in run.stderr
