"""`facegate serve`: the HTTP API under uvicorn (refuses to listen beyond loopback without API keys)."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import logging.config
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from app.cli.common import cli, fail, failing_on_errors, load_settings, log_level_name, report_as_log_records
from app.config import LogFormat, Settings, log_settings_alone
from app.vision.pipeline import Pipeline
from app.vision.runtime import usable_cores

log = logging.getLogger("facegate.serve")


def api_keys_configured(settings: Settings) -> bool:
    """Whether the server will ask clients for an API key: `auth.required`, a bootstrap key, or any key in the
    database (revoked ones count, as in app/auth/verifier.py). Reads the database; creates nothing."""
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from app.auth.store import key_count, keys_table_exists
    from app.gallery import db

    if settings.auth.required or settings.auth.bootstrap_key is not None:
        return True
    if db.missing_sqlite_file(settings.database_url) is not None:
        return False  # a gallery not created yet has no keys
    engine = db.make_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            if not keys_table_exists(connection):
                return False
        with Session(engine) as session:
            return key_count(session) > 0
    except SQLAlchemyError as error:
        fail(f"cannot read the API keys from the database (FACEGATE_DATABASE_URL): {db.driver_message(error)}")
    finally:
        engine.dispose()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@cli.command()
def serve(
    host: Annotated[
        str | None,
        typer.Option(
            help="Address to listen on (default FACEGATE_HOST, else 127.0.0.1: this machine only). 0.0.0.0 exposes "
            "the API to the network: do that only with API keys or behind an authenticating proxy.",
        ),
    ] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="TCP port (default FACEGATE_PORT, 8000).")] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes. More serve more requests at once on more cores, but each loads its own copy of "
            "the models (~150 MB) and search index; on a GPU one or two are usually enough.",
        ),
    ] = 1,
    log_level: Annotated[
        str | None,
        typer.Option(
            callback=log_level_name,
            help="Log level (default FACEGATE_LOG__LEVEL, INFO: one access line per request).",
        ),
    ] = None,
    allow_no_auth: Annotated[
        bool,
        typer.Option(
            "--allow-no-auth",
            help="Listen on a non-loopback address although no API key exists (every route open to the network): "
            "only behind a proxy that authenticates. Without it such a start is refused.",
        ),
    ] = False,
) -> None:
    """Run the HTTP API (uvicorn, app.main:create_app).

    Without any API key (and FACEGATE_AUTH__REQUIRED off) every route is open, so facegate listens on 127.0.0.1 only
    and refuses another address unless --allow-no-auth is given.
    """
    import uvicorn

    from app.cli.supervisor import run_server
    from app.logs import uvicorn_log_config

    early = log_settings_alone()
    if early.format is LogFormat.json:  # the refusals below, and load_settings' warnings, as JSON lines too
        # Those alone until the server's own configuration below, as in text mode: at INFO the checks' database
        # opening (alembic's "Context impl ..." lines) made a one-line refusal three, and --log-level went unheard.
        quiet = early.model_copy(update={"level": max(log_level or early.level, "WARNING", key=_rank)})
        logging.config.dictConfig(uvicorn_log_config(quiet))
        report_as_log_records()
    settings = load_settings()
    bind = host or settings.host  # an explicit --host or FACEGATE_HOST is honoured; the default is 127.0.0.1
    keys = api_keys_configured(settings)
    if not keys and not _is_loopback(bind) and not allow_no_auth:
        fail(
            f"refusing to listen on {bind} without API keys: every route would be open to the network. Create a key "
            "(facegate keys create --name NAME --scope admin), set FACEGATE_AUTH__REQUIRED=true, listen on "
            "127.0.0.1, or pass --allow-no-auth behind an authenticating proxy."
        )
    listen_port = port or settings.port
    problem = _port_problem(bind, listen_port)
    if problem is not None:  # before preflight and the workers: uvicorn found it after loading everything, exit 3
        fail(f"cannot listen on {bind}:{listen_port}: {problem}")
    _preflight(settings)  # after the refusals: a refused start creates no SQLite file
    level = (log_level or settings.log.level).upper()
    log_config = uvicorn_log_config(settings.log.model_copy(update={"level": level}))
    # The start-up lines go through the server's own log format: with FACEGATE_LOG__FORMAT=json, plain text on
    # stdout was the one line a log collector could not parse.
    logging.config.dictConfig(log_config)
    if keys:
        log.info("API keys are required (X-API-Key header); listening on %s.", bind)
    elif _is_loopback(bind):
        log.info(
            "No API key exists and FACEGATE_AUTH__REQUIRED is off: every route is open, so facegate listens on %s "
            "only (this machine). `facegate keys create` turns authentication on.",
            bind,
        )
    else:
        log.warning(
            "no API key exists and host %s exposes every route to the network without authentication "
            "(--allow-no-auth).",
            bind,
        )
    cores = usable_cores()
    shared = share_cores(settings, workers, cores)
    if shared:
        os.environ.update(shared)  # the worker processes read their settings from the environment
        log.info("%d workers share %d cores: %s", workers, cores, ", ".join(f"{k}={v}" for k, v in shared.items()))
    config = uvicorn.Config(
        "app.main:create_app",
        factory=True,
        host=bind,
        port=listen_port,
        workers=workers,
        log_config=log_config,
        log_level=level.lower(),
        access_log=False,  # app/api/access_log.py logs each request (route template, no client address)
        timeout_graceful_shutdown=settings.shutdown_timeout,
        # uvicorn's HTTP/1.1 with time limits on a request's arrival (FACEGATE_REQUEST_TIMEOUT and
        # FACEGATE_REQUEST_IDLE_TIMEOUT); by name, as each worker process imports it.
        http="app.api.request_timeouts:TimedH11Protocol",
    )
    with _sigterm_ends_cleanly(), shared_metrics(workers):
        run_server(config)


def _rank(level: str) -> int:
    return logging.getLevelNamesMapping()[level.upper()]


@contextmanager
def _sigterm_ends_cleanly() -> Iterator[None]:
    """SIGTERM is how Docker, Kubernetes and systemd ask a service to stop. uvicorn catches it (stops accepting,
    lets the requests in flight finish within FACEGATE_SHUTDOWN_TIMEOUT, runs the app's shutdown), then raises it
    again under the handler it found: with Python's default one, that killed the process after its clean stop (exit
    status 143, which an orchestrator reports as a failure). Under this one, which does nothing, uvicorn returns and
    `facegate serve` exits 0. (With --workers N uvicorn's supervisor handles the signal and already returned.)"""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # app/api/multiprocess.py
METRICS_PREFIX = "facegate-metrics-"
ABANDONED_AFTER_SECONDS = 60  # a directory younger than this may be a server's that is starting, not locked yet


@contextmanager
def shared_metrics(workers: int) -> Iterator[str | None]:
    """With several workers, a fresh private directory for their shared metrics (prometheus_client's multiprocess
    mode), made here before the workers start (they inherit PROMETHEUS_MULTIPROC_DIR) and removed when the server
    stops: the next start begins from zero, and two servers never share one. It is made inside
    $PROMETHEUS_MULTIPROC_DIR when that is set (say, a tmpfs), else in the temporary directory. One worker keeps its
    metrics in memory, as any single process: the variable is cleared for it, or its metrics would be read from files
    another run could have left there.

    The server holds a lock on its directory while it runs; a start removes the directories of servers that were
    killed before they could (SIGKILL, the OOM killer): a few hundred kB of memory-mapped files each, which a crash
    loop would pile up in a tmpfs."""
    previous = os.environ.pop(METRICS_ENV, None)
    path = tempfile.mkdtemp(prefix=METRICS_PREFIX, dir=previous or None) if workers > 1 else None
    lock = None
    if path is not None:
        lock = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(lock, fcntl.LOCK_EX)
        remove_abandoned_metrics(os.path.dirname(path))
        os.environ[METRICS_ENV] = path
    try:
        yield path
    finally:
        os.environ.pop(METRICS_ENV, None)
        if previous is not None:
            os.environ[METRICS_ENV] = previous
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def remove_abandoned_metrics(parent: str) -> list[str]:
    """Remove the metrics directories in `parent` that no running server holds (flock works across processes,
    containers sharing the folder included, where a pid would not tell), leaving those of the last minute alone;
    returns what it removed."""
    removed = []
    for entry in sorted(os.scandir(parent), key=lambda e: e.name):
        if not entry.name.startswith(METRICS_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if time.time() - entry.stat(follow_symlinks=False).st_mtime < ABANDONED_AFTER_SECONDS:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, or not ours to read
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a running server's
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        finally:
            os.close(fd)
    return removed


def _port_problem(host: str, port: int) -> str | None:
    """Why uvicorn could not bind `host:port` (a port in use, a privileged one), found by binding every address of
    `host` as uvicorn does (SO_REUSEADDR) and letting go at once; None when it can, or when only uvicorn can tell
    (an address family this machine lacks: asyncio skips those). A name that does not resolve is a problem."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:  # uvicorn fails the same way, but only after loading everything (exit 3)
        return f"{error.strerror or error} (an address or host name, without scheme or port)"
    except OSError:
        return None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio: IPv4 is bound apart
                probe.bind(address)
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                # With the way out: nothing said that `make run` (which runs `facegate serve`) takes another port.
                return f"{error.strerror or error}: choose another with --port or FACEGATE_PORT (FACEGATE_PORT=8001 make run)"
    return None


def _preflight(settings: Settings) -> None:
    """What would fail every worker's start-up, checked once before uvicorn starts: each worker would otherwise
    print its own traceback and uvicorn exit 3. The models' manifests (the networks load in the workers) and a
    connection to the database (a SQLite file is created, as the first worker would)."""
    from app.config import IndexBackend, Provider
    from app.gallery import db
    from app.gallery.pgvector import enable_extension
    from app.vision.runtime import requested_providers

    with failing_on_errors():
        Pipeline.from_settings(settings)
    if settings.require_gpu and requested_providers(settings.runtime)[0][0] != Provider.CUDA.value:
        # The sessions would fall back to CPU: every worker's start-up failed (or, with FACEGATE_PRELOAD_MODELS off,
        # the server started and answered every photo 503).
        fail(
            "FACEGATE_REQUIRE_GPU is set but the CUDA provider cannot be used here (no NVIDIA GPU device visible, "
            "this ONNX Runtime build has none, or FACEGATE_RUNTIME__PROVIDERS leaves it out)"
        )
    if settings.index.backend is IndexBackend.APPROXIMATE:
        try:
            import app.gallery.ann  # noqa: F401  (faiss, the `ann` extra)
        except ImportError as error:
            fail(str(error))
    engine = db.make_engine(settings.database_url)
    try:
        # A SQLAlchemyError (or PgvectorUnavailable) ends the command in one line (app/cli/common.py).
        with engine.connect() as connection:
            if settings.index.backend is IndexBackend.PGVECTOR:
                # Installed on the server is not enough: a role that may not enable it failed in every worker.
                # Tried and rolled back: the first worker enables it.
                with connection.begin() as transaction:
                    enable_extension(connection)
                    transaction.rollback()
        # A schema migrated by a newer facegate: every worker's migration would fail with alembic's traceback.
        revision = db.schema_revision(engine)
        clash = db.clashing_tables(engine) if revision is None else []
        if clash:  # every worker's first migration failed with "relation ... already exists" and a traceback
            fail(
                f"the database has no facegate schema revision (no alembic_version table) but already has the table(s) "
                f"{', '.join(clash)}: another application's? Give facegate a database of its own"
            )
        if revision is not None and not db.known_revision(revision):
            fail(
                f"the database is at schema revision {revision}, which this facegate (head {db.head_revision()}) does "
                "not know: migrated by a newer facegate? Serve it with that one"
            )
    finally:
        engine.dispose()


def share_cores(settings: Settings, workers: int, cores: int) -> dict[str, str]:
    """Thread settings for `workers` processes on `cores` cores, where left at "one per core": each process's
    ONNX Runtime threads and micro-batcher calls get its share, so that N workers do not each ask for every core."""
    if workers <= 1:
        return {}
    share = str(max(1, cores // workers))
    out = {}
    if settings.runtime.intra_op_threads == 0 and "FACEGATE_RUNTIME__INTRA_OP_THREADS" not in os.environ:
        out["FACEGATE_RUNTIME__INTRA_OP_THREADS"] = share
    if settings.batching.workers == 0 and "FACEGATE_BATCHING__WORKERS" not in os.environ:
        out["FACEGATE_BATCHING__WORKERS"] = share
    return out
