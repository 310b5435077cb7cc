"""One worker's view of the API keys: is auth on, and which active key is this? With a short cache.

Keys live in the database, shared by every worker and server. Each worker remembers a lookup (and whether any key
exists) for at most `cache_seconds`, then reads the database again: a key revoked with `facegate keys revoke` is
refused by every worker within `cache_seconds` (default 5 s), and a key created is accepted at once (an unknown key
is looked up again after the same bound, so at worst a key used before it existed waits that long).

Auth is on when `auth.required` is set or when any key row exists, revoked ones included: revoking the last key
locks the API rather than silently opening it.

While the database cannot be read, a key whose lookup is older than `cache_seconds` cannot be checked: the request
gets 503 database_unavailable (a revoked key is never let in). Whether auth is on keeps its last answer instead:
it only ever turns on (a first key), and what it keeps open during the outage needs no database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.auth import store
from app.auth.keys import hash_key, key_prefix
from app.auth.scopes import Scope
from app.auth.store import ApiKeyRecord
from app.config import AuthSettings
from app.errors import DatabaseUnavailable, InsufficientStorage
from app.gallery.tables import utcnow

log = logging.getLogger(__name__)

SessionFactory = Callable[[], AbstractContextManager[Session]]
BOOTSTRAP_NAME = "bootstrap"
MAX_CACHED = 10_000  # distinct keys remembered; a flood of made-up keys empties the cache rather than growing it


class KeyVerifier:
    def __init__(
        self,
        sessions: SessionFactory,
        *,
        required: bool,
        cache_seconds: float,
        touch_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`sessions()` opens a transaction (e.g. `Gallery.session`); `touch_seconds`: `last_used_at` is written at
        most this often per key and worker (a write per request would serialise requests on SQLite). The write is
        made by one background thread, never on the request's path: on SQLite it waits for the write lock, which
        another process (`facegate reindex`, a bulk `enroll`) may hold for seconds, and a read request must not."""
        self.required = required
        self.cache_seconds = cache_seconds
        self.touch_seconds = touch_seconds
        self._sessions = sessions
        self._clock = clock
        self._lock = threading.Lock()
        self._enabled: tuple[bool, float] | None = None  # (value, read at)
        self._keys: dict[str, tuple[ApiKeyRecord | None, float]] = {}  # sha256(key) -> (active record, read at)
        self._touched: dict[str, float] = {}  # key id -> when last_used_at was last written
        self._toucher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facegate-key-touch")
        self._last_touch: Future[None] | None = None

    def enabled(self) -> bool:
        """Whether protected routes need a key (blocking: may read the database)."""
        if self.required:
            return True
        now = self._clock()
        with self._lock:
            if self._enabled is not None and now - self._enabled[1] < self.cache_seconds:
                return self._enabled[0]
        try:
            with self._sessions() as session:
                value = store.key_count(session) > 0
        except DatabaseUnavailable:
            if self._enabled is None:
                raise
            value = self._enabled[0]  # asked again after cache_seconds, not by every request of the outage
        with self._lock:
            self._enabled = (value, now)
        return value

    def lookup(self, key: str) -> ApiKeyRecord | None:
        """The active key `key` is, else None (blocking: may read the database, and write `last_used_at`)."""
        if key_prefix(key) is None:  # malformed: no transaction for it, nor a cache entry that pushes real keys out
            return None
        digest = hash_key(key)  # the cache is keyed by hash: the key itself is not kept in memory longer than needed
        now = self._clock()
        with self._lock:
            cached = self._keys.get(digest)
        if cached is not None and now - cached[1] < self.cache_seconds:
            record = cached[0]
        else:
            with self._sessions() as session:
                record = store.authenticate(session, key=key)
            with self._lock:
                if len(self._keys) >= MAX_CACHED:
                    self._keys.clear()
                self._keys[digest] = (record, now)
        if record is not None:
            self._touch(record, now)
        return record

    def _touch(self, record: ApiKeyRecord, now: float) -> None:
        with self._lock:
            last = self._touched.get(record.id)
            if last is not None and now - last < self.touch_seconds:
                return
            self._touched[record.id] = now
            try:
                self._last_touch = self._toucher.submit(self._write_touch, record, utcnow())
            except RuntimeError:  # closed: the server is stopping
                pass

    def _write_touch(self, record: ApiKeyRecord, at: datetime) -> None:
        try:
            with self._sessions() as session:
                store.touch_key(session, key_id=record.id, at=at)
        except (SQLAlchemyError, DatabaseUnavailable, InsufficientStorage) as error:  # bookkeeping: never fail for it
            log.warning("could not record the use of API key %s: %s", record.prefix, type(error).__name__)
        except Exception:
            log.exception("could not record the use of API key %s", record.prefix)

    def wait_for_touches(self) -> None:
        """Block until the `last_used_at` writes asked for so far are made (tests)."""
        with self._lock:
            last = self._last_touch
        if last is not None:
            last.result()

    def close(self) -> None:
        """Stop the writer (before the database is closed): the write under way is finished, queued ones dropped."""
        self._toucher.shutdown(wait=True, cancel_futures=True)


def open_verifier(sessions: SessionFactory, settings: AuthSettings) -> KeyVerifier:
    """At start-up: store the bootstrap key (if set and new), log whether auth is on, return the worker's verifier."""
    if settings.bootstrap_key is not None:
        with sessions() as session:
            record, created = store.ensure_key(
                session, key=settings.bootstrap_key.get_secret_value(), name=BOOTSTRAP_NAME, scope=Scope.admin
            )
        if created:
            log.info("auth: bootstrap admin key %s stored (hashed)", record.prefix)
        elif not record.active:
            log.warning("auth: the bootstrap key %s was revoked; it stays revoked", record.prefix)
    verifier = KeyVerifier(sessions, required=settings.required, cache_seconds=settings.cache_seconds)
    with sessions() as session:
        active, total = store.key_count(session, include_revoked=False), store.key_count(session)
    if verifier.enabled():
        why = "auth.required is set" if settings.required else f"{total} key(s) exist"
        log.info("auth: on (%s; %d active): protected routes need an X-API-Key", why, active)
        if active == 0:
            log.warning("auth: no active API key: every protected request gets 401 (facegate keys create)")
    else:
        log.warning("auth: off: no API key exists, every route is open (facegate keys create turns it on)")
    return verifier
