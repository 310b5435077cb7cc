"""HEAD wherever GET is answered (RFC 9110 9.3.2: a server that answers GET must answer HEAD too).

Uptime checks, link checkers and some load balancers send HEAD; FastAPI's routes answer only the methods they were
declared with, so `HEAD /identities` got 405. `HeadRoute` (the route class of every API router) runs a GET route for
HEAD: the same API-key scope, the same checks, the same status and headers. The handler sees GET; the server, whose
own scope still says HEAD, sends no body (uvicorn drops it). The OpenAPI schema is unchanged: the route's declared
methods are, so HEAD adds no operation (and no second operation id) to any path.
"""

from __future__ import annotations

from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Receive, Scope, Send


class HeadRoute(APIRoute):
    """An APIRoute that also answers HEAD where it answers GET."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        return super().matches(_as_get(scope) if self._heads(scope) else scope)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Another method the route does not take gets FastAPI's 405; app/api/errors.py writes its Allow header.
        await super().handle(_as_get(scope) if self._heads(scope) else scope, receive, send)

    def _heads(self, scope: Scope) -> bool:
        return scope.get("type") == "http" and scope.get("method") == "HEAD" and "GET" in (self.methods or ())


def _as_get(scope: Scope) -> Scope:
    """The request as GET, for the route's own matching and handler; a copy, so the server's scope keeps HEAD."""
    return {**scope, "method": "GET"}
