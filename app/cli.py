"""`facegate`: the command line. Commands call the same core functions as the HTTP routes (`app.service`, and
`app.evaluate` / `app.grouping` for the commands that need no gallery: eval, cluster, calibrate without --apply).

Settings come from the environment (FACEGATE_*), as for the server. Only the commands print; the core logs.
Exit status: 0 success (for `verify`: a match), 1 a negative answer (`verify`: no match) or some photos failed
(`enroll`), 2 an error.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import numpy as np
import typer

from app import evaluate as evaluation
from app.config import Settings
from app.auth.scopes import Scope
from app.errors import FacegateError
from app.grouping import ClusterMember, ClusterReport, cluster_files
from app.service import (
    CalibrationSource,
    FacePolicy,
    FaceService,
    IdentifyResult,
    VerifyResult,
)
from app.vision.pipeline import Pipeline

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from app.auth.store import ApiKeyRecord

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

cli = typer.Typer(
    name="facegate",
    help="Face verification service: enrol people from photos, verify and identify faces, run the HTTP API.",
    no_args_is_help=True,
    add_completion=False,
)
db_cli = typer.Typer(help="Gallery database maintenance.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")

ThresholdOption = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=4.0,
        help="Squared L2 distance at or below which two faces are the same person (default: the deployment's "
        "calibrated threshold, else FACEGATE_THRESHOLD, 0.36). Lower it for fewer false accepts (strangers taken for "
        "someone) at the cost of more false rejects; raise it for the opposite.",
    ),
]
FaceOption = Annotated[
    FacePolicy,
    typer.Option(
        "--face",
        help="Photos with several faces: 'single' refuses them, 'largest' uses the largest face.",
    ),
]


class PhotoSelection(StrEnum):
    first = "first"
    all = "all"


@cli.callback()
def main_callback(
    log_level: Annotated[
        str, typer.Option(help="Logging level of the core (DEBUG shows provider choices).")
    ] = "WARNING",
) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _settings() -> Settings:
    """Settings from the environment, read when a command runs (not cached: one command per process anyway)."""
    return Settings()


def _open_service(settings: Settings) -> FaceService:
    with _failing_on_errors():
        return FaceService.open(settings, load_models=True)


@contextmanager
def _service_call() -> Iterator[FaceService]:
    """A service for one command; a FacegateError inside becomes `code: message` and exit status 2."""
    service = _open_service(_settings())
    try:
        with _failing_on_errors(with_code=True):
            yield service
    finally:
        service.close()


def _open_pipeline(settings: Settings) -> Pipeline:
    """The models alone (no gallery database) for commands that only embed photos."""
    with _failing_on_errors():
        pipeline = Pipeline.from_settings(settings)
        pipeline.load()
    return pipeline


def _default_threshold(settings: Settings, pipeline: Pipeline) -> float:
    """FACEGATE_THRESHOLD, or the served head's calibrated threshold when one is active and it is not set."""
    if pipeline.head is not None and "threshold" not in settings.model_fields_set:
        return pipeline.head.threshold
    return settings.threshold


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextmanager
def _failing_on_errors(*, with_code: bool = False) -> Iterator[None]:
    """A FacegateError inside ends the command with exit status 2 and its message (`code: message` if asked)."""
    try:
        yield
    except FacegateError as error:
        _fail(f"{error.code}: {error.message}" if with_code else error.message)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        _fail(f"cannot read {path}: {error.strerror}")


# -------------------------------------------------------------------------------------------------- serve


def api_keys_configured(settings: Settings) -> bool:
    """Whether the server will ask clients for an API key: `auth.required`, a bootstrap key, or any key in the
    database (revoked ones count, as in app/auth/verifier.py). Reads the database; creates nothing."""
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from app.auth.store import key_count, keys_table_exists
    from app.gallery import db

    if settings.auth.required or settings.auth.bootstrap_key is not None:
        return True
    path = db.sqlite_path(settings.database_url)
    if path is not None and not path.exists():
        return False  # a gallery not created yet has no keys
    engine = db.make_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            if not keys_table_exists(connection):
                return False
        with Session(engine) as session:
            return key_count(session) > 0
    except SQLAlchemyError as error:
        _fail(f"cannot read the API keys from the database: {type(error).__name__}")
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
        str | None, typer.Option(help="Log level (default FACEGATE_LOG__LEVEL, INFO: one access line per request).")
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

    from app.logs import uvicorn_log_config

    settings = _settings()
    bind = host or settings.host  # an explicit --host or FACEGATE_HOST is honoured; the default is 127.0.0.1
    if api_keys_configured(settings):
        typer.echo(f"API keys are required (X-API-Key header); listening on {bind}.")
    elif _is_loopback(bind):
        typer.echo(
            f"No API key exists and FACEGATE_AUTH__REQUIRED is off: every route is open, so facegate listens on {bind} "
            "only (this machine). `facegate keys create` turns authentication on."
        )
    elif allow_no_auth:
        typer.secho(
            f"warning: no API key exists and host {bind} exposes every route to the network without authentication "
            "(--allow-no-auth).",
            fg=typer.colors.YELLOW,
            err=True,
        )
    else:
        _fail(
            f"refusing to listen on {bind} without API keys: every route would be open to the network. Create a key "
            "(facegate keys create --name NAME --scope admin), set FACEGATE_AUTH__REQUIRED=true, listen on "
            "127.0.0.1, or pass --allow-no-auth behind an authenticating proxy."
        )
    shared = share_cores(settings, workers, os.cpu_count() or 1)
    if shared:
        os.environ.update(shared)  # the worker processes read their settings from the environment
        typer.echo(f"{workers} workers share {os.cpu_count()} cores: " + ", ".join(f"{k}={v}" for k, v in shared.items()))
    level = (log_level or settings.log.level).upper()
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=bind,
        port=port or settings.port,
        workers=workers,
        log_config=uvicorn_log_config(settings.log.model_copy(update={"level": level})),
        log_level=level.lower(),
        access_log=False,  # app/api/access_log.py logs each request (route template, no client address)
    )


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


# --------------------------------------------------------------------------------------------------- keys

keys_cli = typer.Typer(
    help="API keys: clients send one in the X-API-Key header. Stored hashed in the gallery database "
    "(FACEGATE_DATABASE_URL); once a key exists, every protected route needs one.",
    no_args_is_help=True,
)
cli.add_typer(keys_cli, name="keys")


@contextmanager
def _keys_session() -> Iterator[Session]:
    """One transaction on the gallery database (migrated first: the keys table comes with the migrations)."""
    from app.gallery import db

    settings = _settings()
    db.upgrade(settings.database_url)
    engine = db.make_engine(settings.database_url)
    try:
        with _failing_on_errors(with_code=True), db.make_session_factory(engine)() as session, session.begin():
            yield session
    finally:
        engine.dispose()


def _key_line(key: ApiKeyRecord) -> str:
    def when(value: datetime | None) -> str:
        return value.strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else "-"

    state = f"revoked {when(key.revoked_at)}" if key.revoked_at is not None else "active"
    return (
        f"{key.prefix}  {key.id}  {key.scope.value:<5}  {when(key.created_at):<20}  {when(key.last_used_at):<20}  "
        f"{state:<28}  {key.name}"
    )


@keys_cli.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for (shown by `keys list`).")],
    scope: Annotated[
        Scope,
        typer.Option(
            help="read: verify, identify, list identities; write: also enrol and delete; admin: also calibrate and "
            "evaluate. Give each client the narrowest scope it needs.",
        ),
    ] = Scope.read,
) -> None:
    """Create a key and print it (stdout, alone on its line). It is shown this once: only its hash is stored."""
    from app.auth.store import create_key

    with _keys_session() as session:
        created = create_key(session, name=name, scope=scope)
    typer.echo(created.key)
    record = created.record
    typer.echo(
        f"created key {record.prefix} ({record.scope.value}, '{record.name}'): store it now, it is not shown again",
        err=True,
    )


@keys_cli.command("list")
def keys_list(
    include_revoked: Annotated[bool, typer.Option("--all", help="Also list revoked keys.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the keys as JSON.")] = False,
) -> None:
    """List keys: prefix, id, scope, created, last used (to the minute), state, name. Never a key or a hash."""
    from app.auth.store import list_keys

    with _keys_session() as session:
        keys = list_keys(session, include_revoked=include_revoked)
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "id": k.id,
                        "prefix": k.prefix,
                        "name": k.name,
                        "scope": k.scope.value,
                        "created_at": k.created_at.isoformat(),
                        "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None,
                        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                    }
                    for k in keys
                ]
            )
        )
        return
    if not keys:
        typer.echo("no API keys" + ("" if include_revoked else " (active; --all lists revoked ones)"))
        return
    typer.echo(f"{'prefix':<8}  {'id':<32}  scope  {'created':<20}  {'last used':<20}  {'state':<28}  name")
    for key in keys:
        typer.echo(_key_line(key))


@keys_cli.command("revoke")
def keys_revoke(
    reference: Annotated[str, typer.Argument(help="The key's prefix (8 hex characters), its id, or the key itself.")],
) -> None:
    """Revoke a key: every worker refuses it within FACEGATE_AUTH__CACHE_SECONDS (5 s). Auth stays on."""
    from app.auth.store import revoke_key

    with _keys_session() as session:
        record = revoke_key(session, reference=reference)
    typer.echo(f"revoked key {record.prefix} ({record.scope.value}, '{record.name}')")


@keys_cli.command("generate")
def keys_generate() -> None:
    """Print a new random key without storing it: a value for FACEGATE_AUTH__BOOTSTRAP_KEY (stored hashed, with the
    admin scope, when the server starts)."""
    from app.auth.keys import generate_key

    typer.echo(generate_key())


# ------------------------------------------------------------------------------------------------- enroll


@dataclass(frozen=True)
class _Failure:
    path: Path
    code: str
    message: str


def _people(directory: Path, selection: PhotoSelection) -> Iterator[tuple[str, list[Path]]]:
    for person in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos = sorted(p for p in person.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
        if photos:
            yield person.name, photos[:1] if selection is PhotoSelection.first else photos


@cli.command()
def enroll(
    directory: Annotated[
        Path,
        typer.Argument(
            exists=True, file_okay=False, dir_okay=True, help="One sub-folder per person, named after them."
        ),
    ],
    photos: Annotated[
        PhotoSelection,
        typer.Option(
            help="'first': one photo per person (the first by file name; one is enough to enrol); 'all': every photo "
            "(more faces per identity make verification more tolerant of pose and age, and enrolment slower).",
        ),
    ] = PhotoSelection.first,
    face: FaceOption = FacePolicy.single,
    allow_low_quality: Annotated[
        bool,
        typer.Option(
            help="Enrol faces that fail a quality limit (FACEGATE_QUALITY__*: too small, blurred, too dark or "
            "bright, cut off). Without it they are reported as low_quality and skipped.",
        ),
    ] = False,
    allow_duplicate: Annotated[
        bool,
        typer.Option(
            help="Create a person's identity even if their first face matches another enrolled identity within the "
            "threshold. Without it such a folder is reported as possible_duplicate and skipped.",
        ),
    ] = False,
) -> None:
    """Enrol every person of DIRECTORY. A folder whose name is already an identity's name adds faces to it."""
    people = list(_people(directory, photos))
    if not people:
        _fail(f"no photos in sub-folders of {directory}")
    service = _open_service(_settings())
    failures: list[_Failure] = []
    created = added = 0
    try:
        total = sum(len(p) for _, p in people)
        with typer.progressbar(length=total, label="Enrolling", show_pos=True) as bar:
            for name, paths in people:
                identity_id = _existing_identity(service, name)
                for path in paths:
                    try:
                        if identity_id is None:
                            result = service.enroll(
                                _read(path),
                                name=name,
                                face=face,
                                allow_low_quality=allow_low_quality,
                                allow_duplicate=allow_duplicate,
                            )
                            identity_id = result.identity_id
                            created += 1
                        else:
                            service.enroll(
                                _read(path), identity_id=identity_id, face=face, allow_low_quality=allow_low_quality
                            )
                            added += 1
                    except FacegateError as error:
                        failures.append(_Failure(path, error.code, error.message))
                    bar.update(1)
    finally:
        service.close()
    typer.echo(f"{created} identities created, {added} faces added to existing ones, {len(failures)} photos failed.")
    for failure in failures:
        typer.echo(f"  {failure.path}: {failure.code}: {failure.message}")
    if failures:
        raise typer.Exit(1)


def _existing_identity(service: FaceService, name: str) -> str | None:
    offset = 0
    while True:
        page = service.list_identities(offset=offset, limit=500, name=name)
        for identity in page.items:
            if identity.name == name:
                return identity.id
        offset += len(page.items)
        if not page.items or offset >= page.total:
            return None


# ------------------------------------------------------------------------------------------ verify / identify


def _decision_line(result: VerifyResult | IdentifyResult) -> str:
    far = f", estimated FAR {result.far_estimate:.2g}" if result.far_estimate is not None else ""
    return f"threshold {result.threshold.value:.4f} ({result.threshold.source.value}{far})"


@cli.command()
def verify(
    photo_a: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="First photo.")],
    photo_b: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Second photo.")],
    threshold: ThresholdOption = None,
    face: FaceOption = FacePolicy.single,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Are the faces of two photos the same person? Exit status 0: match, 1: no match, 2: error."""
    with _service_call() as service:
        result = service.verify_photos(_read(photo_a), _read(photo_b), threshold=threshold, face=face)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "match": result.match,
                    "distance": result.distance,
                    "threshold": result.threshold.value,
                    "threshold_source": result.threshold.source.value,
                    "far_estimate": result.far_estimate,
                }
            )
        )
    else:
        verdict = "MATCH" if result.match else "NO MATCH"
        typer.echo(f"{verdict}: distance {result.distance:.4f}, {_decision_line(result)}")
    raise typer.Exit(0 if result.match else 1)


@cli.command()
def identify(
    image: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="The photo; every face in it is searched.")
    ],
    top_k: Annotated[
        int,
        typer.Option(
            min=1, max=100, help="Candidates listed per face. Only the list grows; the decision uses the best."
        ),
    ] = 5,
    threshold: ThresholdOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Who is in IMAGE? Each face: the best enrolled identity if within the threshold, else unknown."""
    with _service_call() as service:
        result = service.identify(_read(image), top_k=top_k, threshold=threshold)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "threshold": result.threshold.value,
                    "threshold_source": result.threshold.source.value,
                    "faces": [
                        {
                            "box": f.face.box.as_dict(),
                            "match": f.match.identity_id if f.match else None,
                            "reason": f.reason.value,
                            "candidates": [
                                {"identity_id": c.identity_id, "name": c.name, "distance": c.distance}
                                for c in f.candidates
                            ],
                        }
                        for f in result.faces
                    ],
                }
            )
        )
        return
    typer.echo(f"{len(result.faces)} face(s), gallery of {result.gallery_size} faces, {_decision_line(result)}")
    for i, f in enumerate(result.faces, 1):
        b = f.face.box
        who = f"{f.match.name} ({f.match.identity_id}), distance {f.match.distance:.4f}" if f.match else f.reason.value
        typer.echo(f"face {i} at ({b.left},{b.top})-({b.right},{b.bottom}): {who}")
        for c in f.candidates:
            typer.echo(f"    {c.distance:.4f}  {c.name}  {c.identity_id}")


# ------------------------------------------------------------------------------------------- eval / calibrate

PairsOption = Annotated[
    Path,
    typer.Option(
        "--pairs",
        exists=True,
        dir_okay=False,
        help="CSV of labelled pairs with the header img_a,img_b,same (same: 1 or 0), paths relative to --images "
        "(the format of the dev set's pairs.csv).",
    ),
]
ImagesOption = Annotated[
    Path, typer.Option("--images", exists=True, file_okay=False, help="Folder the pair paths are relative to.")
]
CacheOption = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        dir_okay=False,
        help="An .npz file of embeddings kept between runs: photos already embedded with the same model and "
        "detection settings (and unchanged on disk) are not embedded again. Created if missing.",
    ),
]


def _pair_distances(
    pipeline: Pipeline, pairs: list[evaluation.Pair], images: Path, cache_path: Path | None
) -> tuple[np.ndarray, dict[str, evaluation.Embedded]]:
    cache = (
        evaluation.EmbeddingCache.load(
            cache_path, evaluation.pipeline_signature(pipeline.model_version, pipeline.settings.detector)
        )
        if cache_path is not None
        else None
    )
    photos = list(dict.fromkeys(p for pair in pairs for p in (pair.img_a, pair.img_b)))
    try:
        with typer.progressbar(length=len(photos), label="Embedding", show_pos=True, file=sys.stderr) as bar:
            embedded = evaluation.embed_photos(pipeline, images, photos, cache=cache, progress=bar.update)
    finally:
        if cache is not None and cache_path is not None:
            cache.save(cache_path)
    return evaluation.pair_distances(pairs, embedded), embedded


@cli.command("eval")
def eval_pairs(
    pairs: PairsOption,
    images: ImagesOption,
    threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=4.0,
            help="Distance at which accuracy, TAR and FAR are reported and the histograms are marked (default "
            "FACEGATE_THRESHOLD, 0.36). The ROC, AUC, EER, 10-fold accuracy and VAL@FAR do not depend on it.",
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(file_okay=False, help="Folder for eval.json (every number) and eval.png (ROC + histograms)."),
    ] = Path("facegate-eval"),
    cache: CacheOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of the table.")] = False,
) -> None:
    """1:1 accuracy on labelled photo pairs (ROC, AUC, EER, 10-fold accuracy, VAL@FAR), as a table, JSON and PNG.

    Accuracy at the threshold, 10-fold accuracy with the threshold chosen on 9 folds (the LFW protocol), VAL at FAR
    1e-3 and 1e-2, same/different distance histograms. Photos without a face are counted and listed, not dropped.
    """
    settings = _settings()
    with _failing_on_errors():
        pair_list = evaluation.read_pairs(pairs)
    pipeline = _open_pipeline(settings)
    distances, embedded = _pair_distances(pipeline, pair_list, images, cache)
    with _failing_on_errors():
        result = evaluation.evaluate_distances(
            distances,
            [p.same for p in pair_list],
            threshold=_default_threshold(settings, pipeline) if threshold is None else threshold,
            model_version=pipeline.model_version,
            n_photos=len(embedded),
            missing_photos={path: e.error for path, e in embedded.items() if e.error},
            pairs_file=str(pairs),
        )
    json_path, png_path = evaluation.write_report(result, out, title=f"facegate 1:1 on {pairs.name}")
    if as_json:
        typer.echo(json_path.read_text(), nl=False)
        return
    typer.echo(evaluation.format_table(result))
    for path, code in sorted(result.missing_photos.items()):
        typer.echo(f"  no face: {path} ({code})")
    if png_path is None:
        typer.echo(f"report: {json_path}; no plot: matplotlib is not installed (pip install 'facegate[report]')")
    else:
        typer.echo(f"report: {json_path}, plot: {png_path}")


@cli.command("eval-identify")
def eval_identify(
    images: Annotated[
        Path, typer.Option("--images", exists=True, file_okay=False, help="Folder with one sub-folder of photos per person.")
    ],
    out: Annotated[
        Path,
        typer.Option(file_okay=False, help="Folder for eval-identify.json (every number) and eval-identify.png (DIR vs FPIR)."),
    ] = Path("facegate-eval"),
    cache: CacheOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of the table.")] = False,
) -> None:
    """1:N open-set accuracy: DIR / FNIR at FPIR 1 %, 5 %, 10 % for the raw-distance rule and facegate's rule.

    Protocol: people sorted by folder name; every other person is enrolled with their first photo (sorted file
    names), their other photos are probes, every photo of the others is a stranger. FPIR = share of strangers
    named as someone; DIR = share of probes named correctly; FNIR = 1 - DIR.
    """
    from app.identify_eval import format_identify_table, person_photos, run_identify_eval

    settings = _settings()
    pipeline = _open_pipeline(settings)
    with _failing_on_errors():
        n_photos = len(person_photos(images))
        with typer.progressbar(length=n_photos, label="Embedding", show_pos=True, file=sys.stderr) as bar:
            result = run_identify_eval(
                images, settings=settings, out_dir=out, cache=cache, pipeline=pipeline, progress=bar.update
            )
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1))
        return
    typer.echo(format_identify_table(result))
    for path, code in sorted(result.missing_photos.items()):
        typer.echo(f"  no face: {path} ({code})")
    typer.echo(f"report: {', '.join(str(f) for f in result.files)}")


@cli.command()
def calibrate(
    pairs: PairsOption,
    images: ImagesOption,
    far: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Target false-accept rate: the share of different-person pairs the threshold may accept. Lower it "
            "for a stricter threshold (fewer strangers accepted, more genuine users refused); it needs many "
            "different-person pairs (well over 1/FAR) to be measured.",
        ),
    ] = 1e-3,
    apply: Annotated[
        bool,
        typer.Option(
            help="Store the threshold as the deployment threshold in the gallery database (FACEGATE_DATABASE_URL); "
            "verify and identify then use it when a request gives none.",
        ),
    ] = False,
    cache: CacheOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """The threshold for a target FAR on labelled photo pairs, with the VAL it gives and confidence intervals."""
    settings = _settings()
    with _failing_on_errors():
        pair_list = evaluation.read_pairs(pairs)
    service = _open_service(settings) if apply else None
    pipeline = service.pipeline if service is not None else _open_pipeline(settings)
    try:
        distances, embedded = _pair_distances(pipeline, pair_list, images, cache)
        same = np.array([p.same for p in pair_list], bool)
        found = ~np.isnan(distances)
        with _failing_on_errors(with_code=True):
            if service is not None:
                result = service.calibrate(
                    CalibrationSource.pairs,
                    target_far=far,
                    same=distances[found & same].tolist(),
                    different=distances[found & ~same].tolist(),
                    apply=True,
                    note=f"facegate calibrate --pairs {pairs}",
                )
                c = result.calibration
            else:
                c = evaluation.calibrate(distances, same, far)
    finally:
        if service is not None:
            service.close()
    missing = sorted(path for path, e in embedded.items() if e.error)
    if as_json:
        extra = {"applied": apply, "missing_photos": missing, "n_missing_pairs": int((~found).sum())}
        typer.echo(json.dumps({**c.to_dict(), **extra}))
        return
    typer.echo(f"threshold {c.threshold:.4f} for target FAR {c.target_far:g}")
    typer.echo(
        f"  FAR {c.far:.4%} ({c.false_accepts}/{c.n_different} different pairs), {c.confidence:.0%} interval "
        f"[{c.far_interval[0]:.4%}, {c.far_interval[1]:.4%}]"
    )
    typer.echo(
        f"  VAL {c.val:.2%} ({c.true_accepts}/{c.n_same} same pairs), {c.confidence:.0%} interval "
        f"[{c.val_interval[0]:.2%}, {c.val_interval[1]:.2%}]"
    )
    typer.echo(f"  {int((~found).sum())} pairs left out: no face in {len(missing)} photos")
    if apply:
        typer.echo("stored as the deployment threshold.")
    else:
        typer.echo("not stored (use --apply to make it the deployment threshold).")


# ------------------------------------------------------------------------------------------------- cluster


def _photos_under(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.suffix.lower() in PHOTO_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _member_text(m: ClusterMember) -> str:
    b = m.box
    return f"{m.photo} ({b.left},{b.top})-({b.right},{b.bottom})"


def _cluster_json(report: ClusterReport) -> dict[str, object]:
    def member(m: ClusterMember) -> dict[str, object]:
        return {"photo": m.photo, "box": m.box.as_dict(), "score": m.score}

    return {
        "threshold": report.threshold,
        "n_photos": report.n_photos,
        "n_faces": report.n_faces,
        "sizes": report.sizes,
        "clusters": [[member(m) for m in c] for c in report.clusters],
        "unclustered": [member(m) for m in report.unclustered],
        "problems": [{"photo": p.photo, "code": p.code, "message": p.message} for p in report.problems],
    }


@cli.command()
def cluster(
    directory: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="Folder of photos (sub-folders included).")
    ],
    threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=4.0,
            help="Faces within this squared distance are linked (default FACEGATE_CLUSTER__THRESHOLD, 0.25: stricter "
            "than the 1:1 threshold, as clusters grow along chains of links). Lower it for purer clusters and more "
            "faces left unclustered; raise it for fewer, larger clusters that may merge different people.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the clusters as JSON.")] = False,
) -> None:
    """Group the faces of every photo under DIRECTORY by person (chinese whispers, as dlib)."""
    files = _photos_under(directory)
    if not files:
        _fail(f"no photos under {directory}")
    settings = _settings()
    pipeline = _open_pipeline(settings)
    with typer.progressbar(length=len(files), label="Finding faces", show_pos=True, file=sys.stderr) as bar:
        report = cluster_files(
            pipeline,
            directory,
            files,
            settings.cluster.threshold if threshold is None else threshold,
            progress=bar.update,
        )
    if as_json:
        typer.echo(json.dumps(_cluster_json(report)))
        return
    typer.echo(
        f"{report.n_photos} photos, {report.n_faces} faces: {len(report.clusters)} clusters, "
        f"{len(report.unclustered)} unclustered faces, {len(report.problems)} photos without a face "
        f"(threshold {report.threshold:g})"
    )
    for i, members in enumerate(report.clusters, 1):
        typer.echo(f"cluster {i}: {len(members)} faces")
        for m in members:
            typer.echo(f"    {_member_text(m)}")
    if report.unclustered:
        typer.echo("unclustered:")
        for m in report.unclustered:
            typer.echo(f"    {_member_text(m)}")
    for p in report.problems:
        typer.echo(f"  {p.photo}: {p.code}: {p.message}")


# --------------------------------------------------------------------------------------- train / reindex


@cli.command("train")
def train(
    images: Annotated[
        Path,
        typer.Option("--images", exists=True, file_okay=False, help="Folder with one sub-folder of photos per person."),
    ],
    name: Annotated[
        str, typer.Option(help="Name to register the head under (<heads dir>/<name>/; replaces a head of that name).")
    ] = "head",
    loss: Annotated[
        str, typer.Option(help="triplet, contrastive, or none (center loss alone: give --center-weight).")
    ] = "triplet",
    mining: Annotated[
        str,
        typer.Option(
            help="Triplet mining in each batch: semi_hard (FaceNet: the nearest negative farther than the positive), "
            "batch_hard (each anchor's farthest positive and nearest negative) or batch_all."
        ),
    ] = "semi_hard",
    margin: Annotated[
        float, typer.Option(min=0.0, help="Triplet margin alpha on squared distances (FaceNet: 0.2).")
    ] = 0.2,
    contrastive_margin: Annotated[
        float, typer.Option(min=0.0, help="Contrastive loss: different faces are pushed this far apart (Euclidean).")
    ] = 1.0,
    center_weight: Annotated[
        float, typer.Option(min=0.0, help="Weight of center loss added to the loss (0 = off).")
    ] = 0.0,
    arch: Annotated[str, typer.Option(help="linear (128x128 map) or mlp (residual 2-layer map).")] = "linear",
    p: Annotated[int, typer.Option("--p", min=2, help="Identities per batch (P of PK sampling).")] = 16,
    k: Annotated[int, typer.Option("--k", min=2, help="Faces per identity in a batch (K of PK sampling).")] = 4,
    epochs: Annotated[int, typer.Option(min=1, help="Most epochs (each visits every training identity once).")] = 60,
    patience: Annotated[
        int, typer.Option(min=1, help="Stop after this many epochs without a better validation VAL@FAR.")
    ] = 10,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 1e-4,
    val_fraction: Annotated[
        float, typer.Option(min=0.01, max=0.99, help="Share of the identities held out for validation.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split, the batches and the initial weights.")] = 0,
    cache: CacheOption = None,
) -> None:
    """Train an embedding head on labelled photos (metric learning on dlib's embeddings) and register it.

    The photos are embedded once (--cache keeps the embeddings between runs); the head trains on the embeddings,
    choosing the epoch by VAL@FAR 1e-3 on identities it never trains on. Needs the `train` extra (PyTorch).
    Serve it with FACEGATE_HEAD__NAME=<name>, then run `facegate reindex`.
    """
    try:
        from tqdm import tqdm

        from app.training import (
            EpochLog,
            TrainConfig,
            embed_folder,
            folder_photos,
            register_head,
            split_identities,
            train_head,
        )
    except ModuleNotFoundError as error:
        _fail(f"{error.name} is missing: install the training extra (pip install 'facegate[train]')")
    from app.config import HeadSettings
    from app.vision.head import heads_dir

    # Training starts from the embedder's own output, whatever head is being served.
    configured = _settings()
    settings = configured.model_copy(update={"head": HeadSettings(dir=configured.head.dir)})
    try:
        config = TrainConfig(
            loss=loss,  # type: ignore[arg-type]
            mining=mining,  # type: ignore[arg-type]
            margin=margin,
            contrastive_margin=contrastive_margin,
            center_weight=center_weight,
            arch=arch,  # type: ignore[arg-type]
            p=p,
            k=k,
            epochs=epochs,
            patience=patience,
            lr=lr,
            seed=seed,
        )
        pipeline = _open_pipeline(settings)
        count = len(folder_photos(images))
        with typer.progressbar(length=count, label="Embedding", show_pos=True, file=sys.stderr) as bar:
            data = embed_folder(pipeline, images, cache_path=cache, progress=bar.update)
        train_set, val_set = split_identities(data, val_fraction=val_fraction, seed=seed)
        with tqdm(total=epochs + 1, desc="Training", unit="epoch", file=sys.stderr) as epochs_bar:

            def progress(log: EpochLog) -> None:
                epochs_bar.set_postfix(val_loss=f"{log.val_loss:.4f}", val_at_far=f"{log.val_at_far:.3f}")
                epochs_bar.update(1)

            result = train_head(train_set, val_set, config, progress=progress)
        folder = register_head(
            result,
            name=name,
            heads_dir=heads_dir(settings.head, settings.models_dir),
            base_model_version=pipeline.base_model_version,
            opset=pipeline.manifest.opset,
            extra={"data": {"photos": count, "faces": len(data), "no_face": data.missing}},
        )
    except FacegateError as error:
        _fail(f"{error.code}: {error.message}")
    except ValueError as error:
        _fail(str(error))
    summary = result.summary()
    typer.echo(
        f"faces {len(data)} of {count} photos ({data.missing} without a face); train {summary['train_identities']} "
        f"identities / {summary['train_faces']} faces, validation {summary['val_identities']} / "
        f"{summary['val_faces']}"
    )
    typer.echo(
        f"validation VAL@FAR {config.target_far:g}: base {summary['base_val_at_far']:.2%}, head "
        f"{summary['val_at_far']:.2%} (best epoch {result.best_epoch} of {summary['epochs_run']}; epoch 0 = untrained)"
    )
    typer.echo(f"head threshold {result.threshold:.4f} (same FAR as the base at 0.36 on the validation pairs)")
    typer.echo(f"registered {folder}: serve it with FACEGATE_HEAD__NAME={name}, then run `facegate reindex`")


@cli.command("reindex")
def reindex_command() -> None:
    """Recompute every enrolled face's embedding for the model now served (FACEGATE_HEAD__NAME set or not) from
    the stored base embeddings, in one transaction; every worker's index picks the change up. Safe to re-run."""
    from app.gallery import Gallery
    from app.gallery.reindex import reindex

    settings = _settings()
    with _failing_on_errors():
        pipeline = Pipeline.from_settings(settings)  # only the head's graph is opened (lazily), not the networks
        gallery = Gallery.open(settings.database_url, pipeline.model_version, index=settings.index)
    try:
        with _failing_on_errors(with_code=True):
            report = reindex(
                gallery,
                target_version=pipeline.model_version,
                base_version=pipeline.base_model_version,
                transform=pipeline.head.apply if pipeline.head is not None else None,
            )
    finally:
        gallery.close()
    sources = ", ".join(f"{n} from {v}" for v, n in sorted(report.from_versions.items())) or "none"
    typer.echo(
        f"model version {report.target_version}: {report.updated} faces recomputed ({sources}), "
        f"{report.already_current} already current, {report.skipped} without a base embedding (left stale)"
    )
    if report.skipped:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------------ db


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Apply the gallery's database migrations (the server also applies them at start)."""
    from app.gallery import db

    settings = _settings()
    db.upgrade(settings.database_url)
    engine = db.make_engine(settings.database_url)
    try:
        revision = db.schema_revision(engine)
    finally:
        engine.dispose()
    typer.echo(f"database at revision {revision} (head {db.head_revision()})")


@db_cli.command("load-synthetic")
def db_load_synthetic(
    faces: Annotated[int, typer.Option(min=1, help="Synthetic faces to write (about half as many identities).")],
    seed: Annotated[int, typer.Option(help="Random seed of the synthetic gallery.")] = 0,
) -> None:
    """Bulk-load face-like synthetic embeddings (PostgreSQL, COPY) for trying large galleries: identities named
    synthetic-NNNNNNNN with 1-3 faces each, of the served model version. Not for a production gallery."""
    import time

    from app.gallery import bulk, db, synthetic

    settings = _settings()
    model_version = Pipeline.from_settings(settings).model_version
    engine = db.make_engine(settings.database_url)
    try:
        if engine.dialect.name != "postgresql":
            _fail("load-synthetic needs a PostgreSQL gallery (FACEGATE_DATABASE_URL=postgresql+psycopg://...)")
        db.upgrade(engine)
        data = synthetic.gallery(faces, seed=seed)
        start = time.perf_counter()
        with db.make_session_factory(engine).begin() as session:  # one transaction: all rows or none
            identities, count = bulk.copy_synthetic_gallery(
                session, embeddings=data.embeddings, owners=data.owners, model_version=model_version
            )
    finally:
        engine.dispose()
    typer.echo(f"{count} faces of {identities} synthetic identities written in {time.perf_counter() - start:.1f} s")


def main() -> None:
    cli()
