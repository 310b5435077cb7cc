"""`facegate db ...`: gallery database maintenance (migrations, copying a gallery to another database, synthetic
galleries for benchmarks)."""

from __future__ import annotations

from typing import Annotated

import typer

from app.cli.common import db_cli, fail, load_settings, on_interrupt, require_gallery
from app.config import database_url_problem
from app.gallery.db import driver_message
from app.gallery.synthetic import MAX_FACES
from app.vision.pipeline import Pipeline


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Apply the gallery's database migrations (the server also applies them at start)."""
    from app.gallery import db

    settings = load_settings()
    db.upgrade(settings.database_url)
    engine = db.make_engine(settings.database_url)
    try:
        revision = db.schema_revision(engine)
    finally:
        engine.dispose()
    typer.echo(f"database at revision {revision} (head {db.head_revision()})")


@db_cli.command("load-synthetic")
def db_load_synthetic(
    faces: Annotated[
        int,
        typer.Option(
            min=1,
            max=MAX_FACES,
            help=f"Synthetic faces to write (about half as many identities), at most {MAX_FACES:,}: they are drawn "
            "in memory first, ~2.3 kB a face (5M: ~11 GB).",
        ),
    ],
    seed: Annotated[int, typer.Option(min=0, help="Random seed of the synthetic gallery (numpy: >= 0).")] = 0,
) -> None:
    """Bulk-load face-like synthetic embeddings (PostgreSQL, COPY) for trying large galleries: identities named
    synthetic-NNNNNNNN (numbered on from an earlier load's) with 1-3 faces each, of the served model version. Not for
    a production gallery."""
    import time

    from app.gallery import bulk, db, synthetic

    settings = load_settings()
    model_version = Pipeline.from_settings(settings).model_version
    engine = db.make_engine(settings.database_url)
    try:
        if engine.dialect.name != "postgresql":
            fail("load-synthetic needs a PostgreSQL gallery (FACEGATE_DATABASE_URL=postgresql+psycopg://...)")
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


@db_cli.command("copy")
def db_copy(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="URL",
            help="SQLAlchemy URL of the database to copy into (sqlite:///path or postgresql+psycopg://user:pass@host/db)."
            " It is migrated first and must hold no identities, faces, settings or API keys.",
        ),
    ],
) -> None:
    """Copy the whole gallery at FACEGATE_DATABASE_URL into another database: identities, faces (embeddings
    unchanged, stored photos), the calibrated threshold and API keys (clients keep working). One transaction on
    the target: an error or an interruption leaves it empty. SQLite and PostgreSQL, either way."""
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from app.gallery.copy import CopyRefused, UnusableDatabase, copy_gallery, display_url

    settings = load_settings()
    try:
        shown = display_url(to)
    except ArgumentError:
        fail("--to is not a database URL (sqlite:///path or postgresql+psycopg://user:pass@host/db)")
    # What FACEGATE_DATABASE_URL accepts, so that the copy can be served: another driver (postgresql+psycopg2://,
    # +asyncpg) failed with a traceback when the engine imported it.
    problem = database_url_problem(to)
    if problem is not None:
        fail(f"--to: {problem}")
    try:
        # The target's transaction is rolled back on the way out (the test: Ctrl-C mid-copy leaves it empty).
        with on_interrupt(lambda: f"nothing was written to {shown}"):
            report = copy_gallery(settings.database_url, to)
    except CopyRefused as error:
        fail(f"{error}")
    except UnusableDatabase as error:
        where = "FACEGATE_DATABASE_URL" if error.role == "source" else shown
        fail(f"cannot use the {error.role} database ({where}): {driver_message(error.error)}")
    except SQLAlchemyError as error:  # e.g. the connection lost half-way: the target's transaction was rolled back
        fail(f"copy failed, nothing was written to {shown}: {driver_message(error)}")
    typer.echo(
        f"copied {_counted(report.identities, 'identity', 'identities')}, {_counted(report.faces, 'face')}, "
        f"{_counted(report.api_keys, 'API key')} and {_counted(report.settings, 'setting')} to {shown} in "
        f"{report.seconds:.1f} s"
    )


@db_cli.command("purge-photos")
def db_purge_photos(
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation (for scripts).")] = False,
) -> None:
    """Delete every photo the gallery kept (enrolled while FACEGATE_STORE_IMAGES was on), in one transaction.
    Identities, faces and embeddings stay: search and verify answer as before; `reindex --from-photos` can no longer
    use the photos. Turning the setting off keeps the photos already stored: this is how they go."""
    from app.gallery import Gallery, db
    from app.gallery.copy import display_url
    from app.vision.models import load_manifest

    settings = load_settings()
    require_gallery(settings)
    if not yes:
        typer.confirm(f"Delete every stored photo in {display_url(settings.database_url)}?", abort=True)
    db.upgrade(settings.database_url)
    engine = db.make_engine(settings.database_url)
    # The index is never loaded or searched: the models' version only names it (read without hashing the files).
    gallery = Gallery(engine, load_manifest(settings.models_dir, verify=False).model_version)
    try:
        purged = gallery.purge_photos()
    finally:
        gallery.close()
    typer.echo(f"{_counted(purged, 'photo')} deleted; the faces and their embeddings are kept")
    if purged and engine.dialect.name == "postgresql":
        # The old row versions (the photos' bytes, in the faces table's TOAST table) stay on disk until vacuumed.
        typer.echo("PostgreSQL keeps the deleted bytes until vacuumed: run `VACUUM FULL faces;` to rewrite the table")
    if settings.store_images:
        typer.echo("FACEGATE_STORE_IMAGES is still true: faces enrolled from now on keep their photos")


def _counted(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
