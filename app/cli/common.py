"""What every command shares: the Typer apps, common options, settings, opening the service or the models,
and turning errors into exit status 2."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, get_args

import alembic.util
import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from sqlalchemy.exc import SQLAlchemyError
from typer.core import TyperGroup

from app.config import COMPOSE_VARIABLES, LogSettings, Settings, describe_settings_error, unknown_variables
from app.errors import DatabaseUnavailable, FacegateError, InsufficientStorage
from app.gallery.db import driver_message, in_memory_sqlite, missing_sqlite_file
from app.gallery.pgvector import PgvectorUnavailable
from app.matching.thresholds import MAX_THRESHOLD, validate_rate, validate_threshold
from app.names import printable
from app.service import FacePolicy, FaceService
from app.vision.pipeline import Pipeline


class _Commands(TyperGroup):
    """The `facegate` group: a database that cannot be opened or reached (no such folder, server down, wrong
    password, a schema the migrations do not know) ends any command with exit status 2 and the driver's own
    first line, not a traceback."""

    def invoke(self, ctx: Any) -> Any:  # Any: the Context of the click copy typer vendors (typer._click, private)
        try:
            return super().invoke(ctx)
        except (SQLAlchemyError, DatabaseUnavailable, InsufficientStorage) as error:
            fail(f"cannot use the database (FACEGATE_DATABASE_URL): {driver_message(error)}")
        except alembic.util.CommandError as error:  # e.g. a revision this version does not have
            fail(f"cannot migrate the database (FACEGATE_DATABASE_URL): {error} (migrated by a newer facegate?)")
        except PgvectorUnavailable as error:  # the server lacks the extension: a traceback otherwise
            fail(str(error))


cli = typer.Typer(
    cls=_Commands,
    name="facegate",
    help="Face verification service: enrol people from photos, verify and identify faces, run the HTTP API.",
    no_args_is_help=True,
    add_completion=False,
)
db_cli = typer.Typer(help="Gallery database maintenance.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")


def positive_distance(value: float | None) -> float | None:
    """A distance threshold must be above 0, as the settings and the API's `threshold` field require: at 0 only a
    photo compared with itself matches (typer's `min` is inclusive). The rule is `validate_threshold`'s."""
    if value is None:
        return None
    try:
        return validate_threshold(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value} is not in the range 0<x<={MAX_THRESHOLD:g} (a squared L2 distance between embeddings)"
        ) from None


def target_far(value: float) -> float:
    """A target false-accept rate: above 0 and below 1 (FAR 0 and 1 have no threshold), finite, as the API's
    `target_far` (`validate_rate`). typer's min/max let NaN through with a message about the bounds."""
    try:
        return validate_rate(value)
    except ValueError:
        raise typer.BadParameter(f"{value:g} is not in the range 0<x<1 (a share of different-person pairs)") from None


def float_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[float], float]:
    """A callback for a float option: a value outside `low`..`high` (an open end excludes its bound) is refused
    while the arguments are read, with the range. Infinity and NaN are outside any range: typer's `min` took
    `inf` and `1e309`, and refused NaN as if below the minimum."""
    shown_range = f"{low:g}{'<' if low_open else '<='}x{'<' if high_open else '<='}{high:g}"

    def check(value: float) -> float:
        above = low < value if low_open else low <= value  # False for NaN
        below = value < high if high_open else value <= high
        if not (above and below):
            raise typer.BadParameter(f"{value:g} is not in the range {shown_range}")
        return value

    return check


ThresholdOption = Annotated[
    float | None,
    typer.Option(
        callback=positive_distance,
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
def _check_cache(path: Path | None) -> Path | None:
    """--cache is rewritten at the end of a run: refuse a file that is no .npz (a zip archive), so that a mistyped
    `--cache pairs.csv` does not destroy the pairs. An empty file, or a cut or other program's .npz, is rewritten."""
    if path is not None and path.is_file():
        try:
            with path.open("rb") as f:
                head = f.read(4)
        except OSError as error:
            raise typer.BadParameter(f"cannot read {path}: {error.strerror}") from None
        if head and head not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise typer.BadParameter(f"{path} is not an embedding cache (.npz); it would be overwritten")
    if path is not None:
        # Its folder is made now, not when the cache is written after every photo is embedded: a parent that is a
        # file or cannot be created ended the run there with a traceback and the embeddings lost.
        problem = _folder_problem(path.parent)
        if problem is not None:
            raise typer.BadParameter(f"cannot create the folder of {path}: {problem}")
    return path


def _folder_problem(folder: Path) -> str | None:
    """Makes `folder` (and its parents); why it cannot be, else None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's word for a file in the way
        return "Not a directory"
    except OSError as error:
        return error.strerror or str(error)
    return None


CacheOption = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        dir_okay=False,
        callback=_check_cache,
        help="An .npz file of embeddings kept between runs: photos already embedded with the same model and "
        "detection settings (and unchanged on disk) are not embedded again. Created if missing; an existing file "
        "that is no .npz is refused, not overwritten.",
    ),
]


class PhotoSelection(StrEnum):
    first = "first"
    all = "all"


LOG_LEVELS: tuple[str, ...] = get_args(LogSettings.model_fields["level"].annotation)  # as FACEGATE_LOG__LEVEL takes


def log_level_name(value: str | None) -> str | None:
    """A --log-level, any case. Checked here: logging's own refusal of another word was a traceback."""
    if value is None:
        return None
    if value.upper() not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return value.upper()


@cli.callback()
def main_callback(
    log_level: Annotated[
        str,
        typer.Option(callback=log_level_name, help="Logging level of the core (DEBUG shows provider choices)."),
    ] = "WARNING",
) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# Set by `facegate serve` in JSON log mode: its warnings and refusals become log records (one JSON object per line,
# like everything else the server writes) instead of coloured text lines.
_as_log_records = False


def report_as_log_records() -> None:
    global _as_log_records
    _as_log_records = True


def _report(level: int, message: str) -> None:
    if _as_log_records:
        logging.getLogger("facegate.cli").log(level, message)
        return
    kind, colour = ("error", typer.colors.RED) if level >= logging.ERROR else ("warning", typer.colors.YELLOW)
    typer.secho(f"{kind}: {message}", fg=colour, err=True)


def load_settings() -> Settings:
    """Settings from the environment, read when a command runs (not cached: one command per process anyway). A value
    that is refused ends the command with exit status 2 and the variable's name, not a traceback."""
    for name, close in unknown_variables(os.environ):
        if name.upper() in COMPOSE_VARIABLES:
            said = f"{name} is read by docker-compose.yml, which passes it on as {close}: facegate itself reads {close}"
        else:
            said = f"{name} is not a facegate setting and is ignored" + (f" (did you mean {close}?)" if close else "")
        _report(logging.WARNING, said)
    try:
        settings = Settings()
    except (ValidationError, SettingsError) as error:
        fail(f"invalid settings: {describe_settings_error(error)}")
    if in_memory_sqlite(settings.database_url):
        # Every command is a process of its own: what it enrolled, stored or served would vanish when it ends
        # (`sqlite:///$UNSET_VARIABLE` reads `sqlite:///`). `db copy` refuses such a target for the same reason.
        fail(
            "invalid settings: FACEGATE_DATABASE_URL names an in-memory SQLite database (no file path), which "
            "vanishes when the command ends: give a file (sqlite:///path/to/facegate.db)"
        )
    return settings


def require_gallery(settings: Settings) -> None:
    """For the commands that read or change what a gallery already holds (identify, reindex, keys revoke): a SQLite
    file that does not exist is refused. Opening it created an empty gallery there and answered from it: a mistyped
    FACEGATE_DATABASE_URL gave 'unknown' for everyone, or '0 faces recomputed'."""
    path = missing_sqlite_file(settings.database_url)
    if path is not None and not path.is_absolute():
        # The default ./facegate.db is read from the folder the command runs in: run elsewhere than `make run`'s
        # checkout, the hint to create a gallery sent a first-time user to make a second, empty one.
        fail(
            f"the SQLite database {path} (FACEGATE_DATABASE_URL) does not exist in the current folder "
            f"({shown(Path.cwd())}): run the command from the folder that holds the gallery (`make run` keeps it in the "
            "checkout) or give FACEGATE_DATABASE_URL an absolute path (sqlite:////path/to/facegate.db)"
        )
    if path is not None:
        fail(
            f"the SQLite database {path} (FACEGATE_DATABASE_URL) does not exist: this command needs an existing "
            "gallery (`facegate enroll`, `db upgrade` or `serve` create one)"
        )


def open_service(settings: Settings) -> FaceService:
    with failing_on_errors():
        return FaceService.open(settings, load_models=True)


# An empty gallery in memory: what a command that only reads a gallery's settings opens when there is none.
NO_GALLERY_URL = "sqlite://"


@contextmanager
def service_call(*, existing_gallery: bool = False, gallery_if_present: bool = False) -> Iterator[FaceService]:
    """A service for one command; a FacegateError inside becomes `code: message` and exit status 2. With
    `existing_gallery`, a SQLite gallery that does not exist is refused (`require_gallery`). With
    `gallery_if_present`, for a command that stores nothing (verify: a stored calibration is only read), it is not
    created: an empty gallery in memory stands in, so the threshold comes from the settings."""
    settings = load_settings()
    if existing_gallery:
        require_gallery(settings)
    elif gallery_if_present and missing_sqlite_file(settings.database_url) is not None:
        settings = settings.model_copy(update={"database_url": NO_GALLERY_URL})
    service = open_service(settings)
    try:
        with failing_on_errors(with_code=True):
            yield service
    finally:
        service.close()


def open_pipeline(settings: Settings) -> Pipeline:
    """The models alone (no gallery database) for commands that only embed photos."""
    with failing_on_errors():
        pipeline = Pipeline.from_settings(settings)
        pipeline.load()
    return pipeline


@contextmanager
def pipeline_call(settings: Settings) -> Iterator[Pipeline]:
    """The models for one command, their inference threads stopped on the way out, Ctrl-C included: daemon threads
    left inside an ONNX Runtime call while the interpreter exits abort it ('terminate called without an active
    exception', SIGABRT) instead of exit status 130."""
    pipeline = open_pipeline(settings)
    try:
        yield pipeline
    finally:
        pipeline.close()


def default_threshold(settings: Settings, pipeline: Pipeline) -> float:
    """FACEGATE_THRESHOLD, or the served head's calibrated threshold when one is active and it is not set."""
    if pipeline.head is not None and "threshold" not in settings.model_fields_set:
        return pipeline.head.threshold
    return settings.threshold


def fail(message: str) -> NoReturn:
    _report(logging.ERROR, message)
    raise typer.Exit(2)


@contextmanager
def on_interrupt(state: Callable[[], str]) -> Iterator[None]:
    """Ctrl-C inside ends the command with one line, `interrupted: <state>`, saying what was and was not written, and
    exit status 130 (128 + SIGINT, as a shell reports it). `state` is asked when the interrupt comes, so it can count
    what was done by then. Without it typer ended the command silently with 130, or a command with a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        typer.secho(f"interrupted: {state()}", fg=typer.colors.RED, err=True)
        raise typer.Exit(130) from None


def embeddings_kept(cache: Path | None) -> str:
    """The end of the `interrupted:` line of a command with --cache, which saves the embeddings made so far on its way
    out ("" without one)."""
    return f"; the photos embedded so far are kept in {cache}" if cache is not None else ""


@contextmanager
def interrupts_held() -> Iterator[None]:
    """A Ctrl-C inside waits until the block has ended, then is raised (KeyboardInterrupt): for a short write that
    must not be cut half-way (a head's two files, each replacing its predecessor). The main thread only, where
    Python runs its signal handlers and where commands run."""
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


# The service's messages name the API's fields; on the command line the same advice is an option.
_API_ADVICE = (
    ("ask for face=largest", "pass --face largest"),
    ("allow_low_quality=true", "--allow-low-quality"),
    (
        "add the face to it (identity_id), or allow_duplicate=true",
        "name the folder after it to add the face to it, or pass --allow-duplicate",
    ),
    ("allow_duplicate=true", "--allow-duplicate"),
)


def error_text(error: FacegateError) -> str:
    """The error's message as a command-line user acts on it."""
    message = error.message
    for api, cli_words in _API_ADVICE:
        message = message.replace(api, cli_words)
    return message


@contextmanager
def failing_on_errors(*, with_code: bool = False) -> Iterator[None]:
    """A FacegateError inside ends the command with exit status 2 and its message (`code: message` if asked)."""
    try:
        yield
    except (DatabaseUnavailable, InsufficientStorage):
        raise  # the group ends it naming FACEGATE_DATABASE_URL and the driver's cause (connection refused, ...)
    except FacegateError as error:
        fail(f"{error.code}: {error_text(error)}" if with_code else error_text(error))


def make_folder(folder: Path, what: str) -> None:
    """A folder the command writes into at its end (`what` names it in the error), made before any photo is
    embedded: one that cannot be (a parent that is a file, no permission) ended a long run at its very end with a
    traceback and the work lost."""
    problem = _folder_problem(folder)
    if problem is not None:
        fail(f"cannot create {what} {folder}: {problem}")


@contextmanager
def report_folder(folder: Path, what: str) -> Iterator[None]:
    """`make_folder`, taken back (when it made it and it is still empty) if the command ends without writing into
    it: input refused after the check (a folder of one person, a Ctrl-C) left an empty --out folder behind."""
    existed = folder.is_dir()
    make_folder(folder, what)
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty folder goes
        raise


@contextmanager
def writing_reports(out: Path) -> Iterator[None]:
    """Writing the report files into --out: a failure (disk full) is one line, not a traceback."""
    try:
        yield
    except OSError as error:
        fail(f"cannot write the report into {out}: {error.strerror or error}")


def shown(path: Path | str) -> str:
    """A file name as printed (app/names.py `printable`): it cannot split its error line in two or drive the
    terminal."""
    return printable(str(path))


@dataclass(frozen=True)
class Unusable:
    """A photo or folder a command could not use (enroll's failures, cluster's problems): listed after the summary,
    one `line` each."""

    path: Path | str
    code: str
    message: str

    @classmethod
    def unreadable_folder(cls, path: Path | str, error: OSError) -> Unusable:
        return cls(path, "unreadable", f"cannot read the folder: {error.strerror}")

    def line(self) -> str:
        return f"  {shown(self.path)}: {self.code}: {self.message}"


def read_bytes(path: Path) -> bytes:
    """A photo named on the command line. Only a regular file: reading a FIFO or a device (`/dev/zero`) would block
    or never end, where the API reads at most FACEGATE_IMAGE__MAX_UPLOAD_BYTES."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            fail(f"cannot read {path}: not a regular file")
        return path.read_bytes()
    except OSError as error:
        fail(f"cannot read {path}: {error.strerror}")
