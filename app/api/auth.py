"""Route protection by API key scope: `dependencies=[require(Scope.read)]` on a route.

The key comes in `X-API-Key: <key>` or `Authorization: Bearer <key>`. When auth is on (app/auth/verifier.py: the
`auth.required` setting, or any key created), a request without a key, or with an unknown or revoked one, gets 401
`unauthorized` (with WWW-Authenticate); a valid key whose scope is too small gets 403 `forbidden`. When auth is off
every route is open, and `facegate serve` then listens on 127.0.0.1 only.

The key is checked before a byte of the body is read. FastAPI parses a request's body before it runs a route's
dependencies, so `ApiKeyMiddleware` checks it first, outside the body limit: an anonymous client (or one whose key is
revoked or too narrow) can neither make a worker hold its upload nor take a share of the worker's body budget, and
a malformed body gets it 401, not a 400/422 describing what the route takes. The route's dependency still runs (it
puts the schemes in the OpenAPI document, for /docs' "Authorize", and protects the route should the middleware not
see the request); it reuses the caller the middleware found, so the database is asked once per request. The key's
prefix (never the key) goes on the request's state for the access log.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.utils import create_model_field
from starlette import types as asgi
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.routing import BaseRoute

from app.api import responses
from app.api.errors import facegate_error_response
from app.api.route_names import matched_route
from app.auth.scopes import Scope
from app.auth.store import ApiKeyRecord
from app.auth.verifier import KeyVerifier
from app.errors import FacegateError, Forbidden, Unauthorized

# auto_error=False: a missing header is ours to answer (401 with our error body, and only when auth is on). Both
# appear in the OpenAPI document, so /docs has an "Authorize" button.
_api_key_header = APIKeyHeader(
    name="X-API-Key", scheme_name="ApiKey", auto_error=False, description="An API key (facegate keys create)."
)
_bearer = HTTPBearer(scheme_name="Bearer", auto_error=False, description="The same API key as a bearer token.")

SCOPE_ATTRIBUTE = "__facegate_scope__"
CALLER_STATE = "facegate_caller"  # the request state's entry for the `Caller` found, once per request


def get_verifier(connection: HTTPConnection) -> KeyVerifier:
    verifier: KeyVerifier = connection.app.state.keys
    return verifier


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as far as API keys go: the active key it sent, or None when auth is off."""

    record: ApiKeyRecord | None

    def check(self, scope: Scope) -> None:
        """Raise Forbidden unless this caller may use a route that needs `scope`."""
        if self.record is not None and not self.record.allows(scope):
            raise Forbidden(
                f"this API key has the {self.record.scope.value} scope; this route needs {scope.value}",
                required_scope=scope.value,
                key_scope=self.record.scope.value,
            )


def _key(header_key: str | None, bearer: HTTPAuthorizationCredentials | None) -> str | None:
    return header_key or (bearer.credentials if bearer is not None else None)


async def _identify(verifier: KeyVerifier, key: str | None) -> Caller:
    """The caller `key` makes; raises Unauthorized when auth is on and it is missing, unknown or revoked. Both
    checks may read the database: they run in the threadpool, off the event loop."""
    if not await run_in_threadpool(verifier.enabled):
        return Caller(None)
    if not key:
        raise Unauthorized("an API key is required: send it in the X-API-Key header")
    record = await run_in_threadpool(verifier.lookup, key)
    if record is None:
        raise Unauthorized("unknown or revoked API key")
    return Caller(record)


async def authorize(connection: HTTPConnection, key: str | None, scope: Scope) -> None:
    """Refuse (Unauthorized, Forbidden) a request that may not use a route needing `scope`.

    The caller is identified once per request and kept on its state: the middleware's check finds it there, and the
    dependency after it only compares the scope (its own route's: the same check, without the database)."""
    state: dict[str, Any] = connection.scope.setdefault("state", {})
    caller = state.get(CALLER_STATE)
    if not isinstance(caller, Caller):
        caller = await _identify(get_verifier(connection), key)
        state[CALLER_STATE] = caller
        if caller.record is not None:
            state["key_prefix"] = caller.record.prefix  # for the access log, on a 403 too
    caller.check(scope)


def require(scope: Scope) -> Any:
    """A dependency refusing requests whose API key does not grant `scope` (when auth is on)."""

    async def check(
        request: Request,
        header_key: Annotated[str | None, Security(_api_key_header)],
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> None:
        await authorize(request, _key(header_key, bearer), scope)

    check.__name__ = f"require_{scope.value}"
    setattr(check, SCOPE_ATTRIBUTE, scope)
    return Depends(check)


class ApiKeyMiddleware:
    """Check the API key of every request for a protected route before the app runs, so before its body is read.

    The route is the one the router will run (`matched_route`), its scope what its `require(...)` declares. Added
    outside BodyLimitMiddleware: a refused request has read nothing and held nothing of the body budget, whatever
    Content-Length it declared. Requests for open routes, and those the router answers 404 or 405, pass untouched,
    as does every request when auth is off. A key that cannot be checked for a database outage is answered 503
    here too (raised outside the app's handlers, it would be a 500 with a logged traceback)."""

    def __init__(self, app: asgi.ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        route = matched_route(scope) if scope["type"] == "http" else None
        needed = route_scope(route) if route is not None else None
        if needed is not None:
            # A connection without receive(): its headers are all that can be read.
            connection = HTTPConnection(scope)
            try:
                await authorize(connection, _key(await _api_key_header(connection), await _bearer(connection)), needed)
            except FacegateError as refusal:  # Unauthorized, Forbidden, or DatabaseUnavailable (key not checkable)
                response = facegate_error_response(scope, refusal)
                if _has_body(connection):
                    # Kept open, the connection would have the server read and throw away the whole upload (which
                    # no body limit counts) before it could take the next request: closing it stops the upload.
                    response.headers["Connection"] = "close"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _has_body(connection: HTTPConnection) -> bool:
    length = connection.headers.get("content-length")
    return "transfer-encoding" in connection.headers or (length is not None and length.strip() not in ("", "0"))


def route_scope(route: BaseRoute) -> Scope | None:
    """The scope a route requires (None: open)."""
    if not isinstance(route, APIRoute):
        return None
    for dependency in route.dependencies:
        scope = getattr(dependency.dependency, SCOPE_ATTRIBUTE, None)
        if scope is not None:
            return scope  # type: ignore[no-any-return]
    return None


def _api_routes(routes: Sequence[BaseRoute]) -> Iterator[APIRoute]:
    """Every APIRoute, looking inside included routers: FastAPI >= 0.16x keeps an included router's own routes
    (`original_router`) and builds the served copies from them when first used; older versions copy them at once."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _api_routes(inner.routes)
        elif isinstance(route, APIRoute):
            yield route


def document_protected(routes: Sequence[BaseRoute]) -> None:
    """Add 401/403 and the scope to the OpenAPI of every protected route (routes only declare `require(...)`).
    Called by `create_app` before the app serves, so the served copies of the routes are built with them."""
    for route in _api_routes(routes):
        scope = route_scope(route)
        if scope is None:
            continue
        for status, body in responses.errors(401, 403).items():
            if status in route.responses:
                continue
            route.responses[status] = body
            # FastAPI renders an additional response's model from `response_fields`, built when the route was made.
            route.response_fields[status] = create_model_field(
                name=f"Response_{status}_{route.unique_id}", type_=body["model"], mode="serialization"
            )
        note = f"Needs an API key with the `{scope.value}` scope (or wider) when auth is on."
        if note not in (route.description or ""):
            route.description = f"{route.description}\n\n{note}".strip() if route.description else note


__all__ = ["ApiKeyMiddleware", "authorize", "document_protected", "get_verifier", "require", "route_scope"]
