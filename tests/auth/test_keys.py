"""API keys: format and hashing (no I/O), then storage and the worker's verifier on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.auth import Scope, store
from app.auth.keys import generate_key, hash_key, key_matches, key_prefix, prefix_of
from app.auth.verifier import KeyVerifier, open_verifier
from app.config import AuthSettings
from app.errors import InvalidRequest, UnknownApiKey
from app.gallery.tables import ApiKey
from tests.auth.conftest import Sessions, sessions_on


class TestFormat:
    def test_generated_keys_are_random_and_well_formed(self) -> None:
        keys = {generate_key() for _ in range(200)}
        assert len(keys) == 200
        for key in keys:
            prefix = key_prefix(key)
            assert prefix is not None and len(prefix) == 8 and key.startswith(f"fg_{prefix}_")
            assert len(key) == 3 + 8 + 1 + 43  # 32 random bytes, base64url

    @pytest.mark.parametrize(
        "bad",
        ["", "fg_", "fg_1234567_" + "a" * 43, "fg_1234567g_" + "a" * 43, "fg_12345678_short", "xx_12345678_" + "a" * 43,
         "fg_12345678_" + "a" * 43 + "\n", "fg_12345678_" + "a" * 500, "fg_12345678_" + "é" * 43],
    )
    def test_malformed_keys_have_no_prefix(self, bad: str) -> None:
        assert key_prefix(bad) is None

    def test_a_key_is_named_by_its_prefix_in_any_form(self) -> None:
        key = generate_key()
        prefix = key[3:11]
        assert prefix_of(key) == prefix_of(prefix) == prefix_of(f"fg_{prefix}") == prefix
        assert prefix_of("not-a-prefix") is None

    def test_the_hash_is_sha256_and_compared_in_constant_time(self, monkeypatch: pytest.MonkeyPatch) -> None:
        key = generate_key()
        assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
        calls: list[tuple[Any, Any]] = []
        real = hmac.compare_digest

        def spy(a: Any, b: Any) -> bool:
            calls.append((a, b))
            return real(a, b)

        monkeypatch.setattr(hmac, "compare_digest", spy)
        assert key_matches(key, hash_key(key))
        assert not key_matches(key, hash_key(generate_key()))
        assert len(calls) == 2


class TestStore:
    def test_only_the_hash_is_stored(self, sessions: Sessions) -> None:
        with sessions() as session:
            created = store.create_key(session, name="door 3", scope=Scope.write)
        with sessions() as session:
            row = session.scalars(select(ApiKey)).one()
            raw = session.execute(text("SELECT * FROM api_keys")).one()
        assert row.key_hash == hash_key(created.key)
        assert row.prefix == created.record.prefix == created.key[3:11]
        assert row.scopes == ["write"]
        secret = created.key.split("_", 2)[2]
        assert not any(isinstance(v, str) and secret in v for v in raw)  # the secret part is nowhere in the row
        assert created.record.scope is Scope.write and created.record.active and created.record.last_used_at is None

    @pytest.mark.parametrize("name", ["", "   ", "door\x1b[31m3", "door\n3", "door\u202e3", "\ufeffdoor", "x" * 256])
    def test_a_key_name_follows_the_name_rule(self, sessions: Sessions, name: str) -> None:
        """Printed by `facegate keys list` and logged: no control characters (terminal escapes, forged lines), no
        invisible reordering, not blank, at most 255 characters. Nothing is stored for a refused name."""
        with sessions() as session, pytest.raises(InvalidRequest) as info:
            store.create_key(session, name=name, scope=Scope.read)
        assert info.value.details.get("field") == "name" and "key's name" in info.value.message
        with sessions() as session:
            assert store.list_keys(session) == []

    def test_authenticate_list_revoke(self, sessions: Sessions) -> None:
        with sessions() as session:
            reader = store.create_key(session, name="reader", scope=Scope.read)
            admin = store.create_key(session, name="admin", scope=Scope.admin)
        with sessions() as session:
            found = store.authenticate(session, key=reader.key)
            assert found is not None and found.id == reader.record.id
            assert store.authenticate(session, key=reader.key[:-1] + ("A" if reader.key[-1] != "A" else "B")) is None
            assert store.authenticate(session, key=generate_key()) is None  # unknown prefix
            assert store.authenticate(session, key="garbage") is None
            assert [k.name for k in store.list_keys(session)] == ["reader", "admin"]
        with sessions() as session:
            revoked = store.revoke_key(session, reference=reader.record.prefix)
            assert revoked.revoked_at is not None and not revoked.active
            again = store.revoke_key(session, reference=reader.key)  # idempotent; the whole key names it too
            assert again.revoked_at == revoked.revoked_at
        with sessions() as session:
            assert store.authenticate(session, key=reader.key) is None
            assert [k.name for k in store.list_keys(session, include_revoked=False)] == ["admin"]
            assert store.key_count(session) == 2 and store.key_count(session, include_revoked=False) == 1
            assert store.get_key(session, reference=admin.record.id).prefix == admin.record.prefix
            with pytest.raises(UnknownApiKey):
                store.revoke_key(session, reference="00000000")
            with pytest.raises(InvalidRequest):
                store.create_key(session, name="  ", scope=Scope.read)

    def test_scopes_imply_narrower_ones(self, sessions: Sessions) -> None:
        with sessions() as session:
            records = {s: store.create_key(session, name=s.value, scope=s).record for s in Scope}
        allowed = {(granted, needed) for granted, r in records.items() for needed in Scope if r.allows(needed)}
        assert allowed == {
            (Scope.read, Scope.read),
            (Scope.write, Scope.read),
            (Scope.write, Scope.write),
            (Scope.admin, Scope.read),
            (Scope.admin, Scope.write),
            (Scope.admin, Scope.admin),
        }

    def test_bootstrap_key_is_stored_once_and_stays_revoked(self, sessions: Sessions) -> None:
        key = generate_key()
        settings = AuthSettings(bootstrap_key=key)
        open_verifier(sessions, settings)
        open_verifier(sessions, settings)  # a restart (or a second worker): no second row
        with sessions() as session:
            (record,) = store.list_keys(session)
            assert record.scope is Scope.admin and record.name == "bootstrap"
            store.revoke_key(session, reference=record.prefix)
        verifier = open_verifier(sessions, settings)
        assert verifier.lookup(key) is None  # revoked stays revoked across restarts
        other = f"fg_{key[3:11]}_{'x' * 43}"  # same prefix, another secret
        with pytest.raises(InvalidRequest):
            open_verifier(sessions, AuthSettings(bootstrap_key=other))

    def test_malformed_bootstrap_key_is_refused_at_start(self) -> None:
        with pytest.raises(ValueError, match="bootstrap_key"):
            AuthSettings(bootstrap_key="changeme")
        assert AuthSettings(bootstrap_key="").bootstrap_key is None  # compose's empty default: unset


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestVerifier:
    def test_auth_turns_on_with_the_first_key_and_stays_on_after_revocation(self, sessions: Sessions) -> None:
        verifier = KeyVerifier(sessions, required=False, cache_seconds=0)
        assert not verifier.enabled()
        with sessions() as session:
            created = store.create_key(session, name="k", scope=Scope.read)
        assert verifier.enabled()
        with sessions() as session:
            store.revoke_key(session, reference=created.record.prefix)
        assert verifier.enabled()  # revoking the last key locks the API; it does not open it
        assert KeyVerifier(sessions, required=True, cache_seconds=0).enabled()

    def test_revocation_takes_effect_within_the_cache_bound(self, sessions: Sessions) -> None:
        clock = FakeClock()
        verifier = KeyVerifier(sessions, required=False, cache_seconds=5.0, clock=clock)
        with sessions() as session:
            created = store.create_key(session, name="k", scope=Scope.write)
        assert verifier.lookup(created.key) is not None
        with sessions() as session:
            store.revoke_key(session, reference=created.record.id)
        clock.now += 4.9
        assert verifier.lookup(created.key) is not None  # still trusted from the cache, within the bound
        clock.now += 0.2
        assert verifier.lookup(created.key) is None  # past the bound: read again, refused

    def test_a_held_write_lock_does_not_hold_up_a_lookup(self, tmp_path: Path) -> None:
        """Recording `last_used_at` is bookkeeping: a request whose key is due for it must not wait for SQLite's
        write lock, which another process (`facegate reindex`, a bulk `enroll`) may hold for seconds (it waited the
        whole busy timeout, 10 s, before a read was answered)."""
        path = tmp_path / "gallery.db"
        with sessions_on(f"sqlite:///{path}") as sessions:
            with sessions() as session:
                created = store.create_key(session, name="k", scope=Scope.read)
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # another process writing
            verifier = KeyVerifier(sessions, required=False, cache_seconds=0)
            try:
                start = time.monotonic()
                assert verifier.lookup(created.key) is not None
                assert time.monotonic() - start < 1.0
            finally:
                other.execute("COMMIT")
                other.close()
            verifier.wait_for_touches()  # made once the lock is free
            verifier.close()
            with sessions() as session:
                assert store.get_key(session, reference=created.record.prefix).last_used_at is not None

    def test_a_malformed_key_costs_no_transaction(self, sessions: Sessions) -> None:
        """A flood of made-up keys must not cost a database transaction each (nor fill the lookup cache)."""
        opened = 0

        @contextmanager
        def counted() -> Iterator[Session]:
            nonlocal opened
            opened += 1
            with sessions() as session:
                yield session

        verifier = KeyVerifier(counted, required=False, cache_seconds=60)
        for made_up in ("", "Bearer", "fg_zzzzzzzz_" + "a" * 40, "x" * 5000):
            assert verifier.lookup(made_up) is None
        assert opened == 0
        unknown = generate_key()  # well-formed: looked up (once, then cached)
        assert verifier.lookup(unknown) is None and verifier.lookup(unknown) is None
        assert opened == 1

    def test_last_used_is_recorded_at_most_once_per_interval(self, sessions: Sessions) -> None:
        clock = FakeClock()
        verifier = KeyVerifier(sessions, required=False, cache_seconds=0, touch_seconds=60, clock=clock)
        with sessions() as session:
            created = store.create_key(session, name="k", scope=Scope.read)
        verifier.lookup(created.key)
        verifier.wait_for_touches()
        with sessions() as session:
            first = store.get_key(session, reference=created.record.prefix).last_used_at
        assert first is not None
        clock.now += 30
        verifier.lookup(created.key)
        verifier.wait_for_touches()
        with sessions() as session:
            assert store.get_key(session, reference=created.record.prefix).last_used_at == first
        clock.now += 31
        verifier.lookup(created.key)
        verifier.wait_for_touches()
        with sessions() as session:
            later = store.get_key(session, reference=created.record.prefix).last_used_at
        assert later is not None and later > first
