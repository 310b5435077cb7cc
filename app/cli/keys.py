"""`facegate keys ...`: API keys, stored hashed in the gallery database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer

from app.auth.scopes import Scope
from app.cli.common import cli, failing_on_errors, load_settings, require_gallery

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from app.auth.store import ApiKeyRecord

keys_cli = typer.Typer(
    help="API keys: clients send one in the X-API-Key header. Stored hashed in the gallery database "
    "(FACEGATE_DATABASE_URL); once a key exists, every protected route needs one.",
    no_args_is_help=True,
)
cli.add_typer(keys_cli, name="keys")


@contextmanager
def _keys_session(*, existing_gallery: bool = False) -> Iterator[Session]:
    """One transaction on the gallery database (migrated first: the keys table comes with the migrations). With
    `existing_gallery`, a SQLite gallery that does not exist is refused rather than created (`require_gallery`)."""
    from app.gallery import db

    settings = load_settings()
    if existing_gallery:
        require_gallery(settings)
    db.upgrade(settings.database_url)
    engine = db.make_engine(settings.database_url)
    try:
        with failing_on_errors(with_code=True), db.make_session_factory(engine)() as session, session.begin():
            yield session
    finally:
        engine.dispose()


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else "-"


def _key_line(key: ApiKeyRecord) -> str:
    state = f"revoked {_when(key.revoked_at)}" if key.revoked_at is not None else "active"
    return (
        f"{key.prefix}  {key.id}  {key.scope.value:<5}  {_when(key.created_at):<20}  {_when(key.last_used_at):<20}  "
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

    # A listing of a SQLite file that is not there (a mistyped URL) created an empty gallery and said "no keys".
    with _keys_session(existing_gallery=True) as session:
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
    """Revoke a key: every worker refuses it within FACEGATE_AUTH__CACHE_SECONDS (5 s). Auth stays on. A key
    already revoked is left as it is (exit status 0, as for other requests with nothing to do)."""
    from app.auth.store import get_key, revoke_key

    with _keys_session(existing_gallery=True) as session:
        record = get_key(session, reference=reference)
        already = record.revoked_at is not None
        if not already:
            record = revoke_key(session, reference=reference)
    described = f"key {record.prefix} ({record.scope.value}, '{record.name}')"
    if already:  # it printed "revoked ..." again, as if it had just happened
        typer.echo(f"{described} was already revoked at {_when(record.revoked_at)}: nothing changed")
    else:
        typer.echo(f"revoked {described}")


@keys_cli.command("generate")
def keys_generate() -> None:
    """Print a new random key without storing it: a value for FACEGATE_AUTH__BOOTSTRAP_KEY (stored hashed, with the
    admin scope, when the server starts)."""
    from app.auth.keys import generate_key

    typer.echo(generate_key())
