"""API key format, generation, hashing and comparison (no storage, no I/O: see app/auth/store.py).

A key reads `fg_<prefix>_<secret>`:
- `prefix`: 8 random hex characters, stored in clear. It names the key in `facegate keys list` and in the access log,
  and finds the key's row in one indexed lookup.
- `secret`: 32 random bytes from `secrets` (the OS CSPRNG), base64url without padding (43 characters).

Only the SHA-256 of the whole key is stored. A fast hash is enough here, unlike for passwords: the secret has 256 bits
of entropy, so nobody can guess it from a leaked hash however fast the guesses are, and a slow hash (bcrypt, argon2)
would only add tens of milliseconds to every request. Stored and presented hashes are compared with
`hmac.compare_digest`, whose time does not depend on where the two first differ.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_PREFIX_LENGTH = 8
SECRET_BYTES = 32
# The secret part of an operator-supplied (bootstrap) key: url-safe characters, at least 32 of them.
_KEY = re.compile(r"fg_(?P<prefix>[0-9a-f]{8})_(?P<secret>[A-Za-z0-9_-]{32,128})")
_PREFIX = re.compile(r"(?:fg_)?(?P<prefix>[0-9a-f]{8})_?")
MAX_KEY_LENGTH = 3 + KEY_PREFIX_LENGTH + 1 + 128


def generate_key() -> str:
    """A new random key; shown once to whoever creates it, never stored."""
    prefix = secrets.token_hex(KEY_PREFIX_LENGTH // 2)
    return f"fg_{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"


def key_prefix(key: str) -> str | None:
    """The prefix of a well-formed key; None for anything else (the caller answers 401 without a lookup)."""
    if len(key) > MAX_KEY_LENGTH:
        return None
    match = _KEY.fullmatch(key)
    return match.group("prefix") if match else None


def prefix_of(reference: str) -> str | None:
    """The prefix named by `reference`: a bare prefix (`1a2b3c4d`), `fg_1a2b3c4d`, or a whole key."""
    whole = key_prefix(reference)
    if whole is not None:
        return whole
    match = _PREFIX.fullmatch(reference)
    return match.group("prefix") if match else None


def hash_key(key: str) -> str:
    """SHA-256 of the key, hex (64 characters): what the database stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_matches(key: str, key_hash: str) -> bool:
    """Whether `key` hashes to `key_hash`, compared in constant time."""
    return hmac.compare_digest(hash_key(key).encode("ascii"), key_hash.encode("ascii"))
