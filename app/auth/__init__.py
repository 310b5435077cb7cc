"""API keys: scopes, hashing, storage. The HTTP side (header parsing, 401/403) lives in app/api/auth.py."""

from app.auth.scopes import Scope

__all__ = ["Scope"]
