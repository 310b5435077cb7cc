"""Route protection by API key scope.

`require(Scope.read)` is a dependency for a route's `dependencies=[...]`.
TODO(issue 6): check the X-API-Key / Authorization: Bearer header against the stored hashed keys (401 / 403).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Depends, Request

from app.auth.scopes import Scope


def require(scope: Scope) -> Any:
    async def check(request: Request) -> None:
        return None

    check.__name__ = f"require_{scope.value}"
    return Depends(check)


__all__: list[str] = ["require"]
_Check = Callable[[Request], Coroutine[Any, Any, None]]
