"""API keys in the gallery database (table `api_keys`): keyword-only functions taking a SQLAlchemy `Session`, like
app/gallery/store.py. The caller owns the transaction (`Gallery.session()` or a plain session's `begin()`).

Keys live in the database, not in a worker's memory, so `facegate keys create|revoke` takes effect in every worker
of every server on that database (within `auth.cache_seconds`, see app/auth/verifier.py).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, inspect, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.auth.keys import generate_key, hash_key, key_matches, key_prefix, prefix_of
from app.auth.scopes import Scope
from app.errors import InvalidRequest, UnknownApiKey
from app.gallery.tables import MAX_NAME_LENGTH, ApiKey, utcnow
from app.names import clean_name


@dataclass(frozen=True)
class ApiKeyRecord:
    """A stored key as the rest of the code sees it: never its hash."""

    id: str
    name: str
    prefix: str
    scopes: tuple[Scope, ...]
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def scope(self) -> Scope:
        """The widest scope granted (each implies the narrower ones)."""
        return max(self.scopes, key=lambda s: list(Scope).index(s))

    def allows(self, needed: Scope) -> bool:
        return any(granted.implies(needed) for granted in self.scopes)


@dataclass(frozen=True)
class CreatedKey:
    key: str  # the only time the key exists outside its owner's hands: print it, do not store it
    record: ApiKeyRecord


def create_key(session: Session, *, name: str, scope: Scope, key: str | None = None) -> CreatedKey:
    """Store a new key (a random one unless `key` is given, e.g. the bootstrap key) and return it with its record."""
    # The name is printed by `facegate keys list` and logged: the rule of people's names (no control characters,
    # no invisible reordering), then the length.
    name = clean_name(name, what="a key's name")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"a key's name must be 1-{MAX_NAME_LENGTH} characters", field="name")
    key = key if key is not None else generate_key()
    prefix = key_prefix(key)
    if prefix is None:
        raise InvalidRequest("malformed API key: expected fg_<8 hex>_<32+ url-safe characters>", field="key")
    row = ApiKey(
        id=uuid.uuid4().hex,
        name=name,
        prefix=prefix,
        key_hash=hash_key(key),
        scopes=[Scope(scope).value],
        created_at=utcnow(),
    )
    session.add(row)
    # A random prefix collides with one of n stored keys with chance n / 4.3e9: IntegrityError, and creating again
    # gives another prefix.
    session.flush()
    return CreatedKey(key, _record(row))


def list_keys(session: Session, *, include_revoked: bool = True) -> list[ApiKeyRecord]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return [_record(row) for row in session.scalars(query)]


def get_key(session: Session, *, reference: str) -> ApiKeyRecord:
    """The key named by its id (32 hex), its prefix (8 hex, with or without `fg_`) or the whole key."""
    return _record(_row(session, reference))


def revoke_key(session: Session, *, reference: str) -> ApiKeyRecord:
    """Revoke a key (idempotent: an already revoked key keeps its first revocation time). The row stays, so the
    prefix is never handed out again and `list` still shows who had access until when."""
    row = _row(session, reference)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return _record(row)


def authenticate(session: Session, *, key: str) -> ApiKeyRecord | None:
    """The active key matching `key`, else None (malformed, unknown prefix, wrong secret or revoked: the caller
    cannot tell these apart, so neither can a client probing keys)."""
    prefix = key_prefix(key)
    if prefix is None:
        return None
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).first()
    if row is None or not key_matches(key, row.key_hash) or row.revoked_at is not None:
        return None
    return _record(row)


def touch_key(session: Session, *, key_id: str, at: datetime | None = None) -> None:
    """Record that the key was used (`last_used_at`)."""
    session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=at or utcnow()))


def key_count(session: Session, *, include_revoked: bool = True) -> int:
    query = select(func.count()).select_from(ApiKey)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return int(session.scalar(query) or 0)


def keys_table_exists(connection: Connection) -> bool:
    """Whether the database has been migrated far enough to hold keys (a fresh database has not)."""
    return inspect(connection).has_table(ApiKey.__tablename__)


def ensure_key(session: Session, *, key: str, name: str, scope: Scope) -> tuple[ApiKeyRecord, bool]:
    """Store `key` unless a key with its prefix exists; (record, created). The existing key must be this very key
    (same hash): a different one under the same prefix is refused. A revoked key stays revoked.

    Two workers starting at once may both try the insert: the loser's IntegrityError is caught (in a savepoint) and
    it reads the winner's row."""
    prefix = key_prefix(key)
    if prefix is None:
        raise InvalidRequest("malformed API key: expected fg_<8 hex>_<32+ url-safe characters>", field="key")
    existing = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).first()
    if existing is None:
        try:
            with session.begin_nested():
                return create_key(session, name=name, scope=scope, key=key).record, True
        except IntegrityError:
            existing = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one()
    if not key_matches(key, existing.key_hash):
        raise InvalidRequest(f"another key already has the prefix {prefix}: choose another key", field="key")
    return _record(existing), False


def _row(session: Session, reference: str) -> ApiKey:
    reference = reference.strip()
    row: ApiKey | None = None
    if len(reference) == 32 and all(c in "0123456789abcdef" for c in reference):
        row = session.get(ApiKey, reference)
    if row is None:
        prefix = prefix_of(reference)
        if prefix is not None:
            row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).first()
    if row is None:
        raise UnknownApiKey("no API key with that prefix or id")
    return row


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes: they were written in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _record(row: ApiKey) -> ApiKeyRecord:
    created = _aware(row.created_at)
    assert created is not None
    return ApiKeyRecord(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        scopes=tuple(Scope(s) for s in row.scopes),
        created_at=created,
        revoked_at=_aware(row.revoked_at),
        last_used_at=_aware(row.last_used_at),
    )
