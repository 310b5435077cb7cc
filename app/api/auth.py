"""Route protection by API key scope: `dependencies=[require(Scope.read)]` on a route.

The key comes in `X-API-Key: <key>` or `Authorization: Bearer <key>`. When auth is on (app/auth/verifier.py: the
`auth.required` setting, or any key created), a request without a key, or with an unknown or revoked one, gets 401
`unauthorized` (with WWW-Authenticate); a valid key whose scope is too small gets 403 `forbidden`. When auth is off
every route is open, and `facegate serve` then listens on 127.0.0.1 only.

FastAPI parses a request's body before it runs dependencies, so an upload is read (within the body limit) before the
key is checked; nothing is decoded or stored before. The key's prefix (never the key) goes on `request.state` for the
access log.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.utils import create_model_field
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute

from app.api import responses
from app.auth.scopes import Scope
from app.auth.verifier import KeyVerifier
from app.errors import Forbidden, Unauthorized

# auto_error=False: a missing header is ours to answer (401 with our error body, and only when auth is on). Both
# appear in the OpenAPI document, so /docs has an "Authorize" button.
_api_key_header = APIKeyHeader(
    name="X-API-Key", scheme_name="ApiKey", auto_error=False, description="An API key (facegate keys create)."
)
_bearer = HTTPBearer(scheme_name="Bearer", auto_error=False, description="The same API key as a bearer token.")

SCOPE_ATTRIBUTE = "__facegate_scope__"


def get_verifier(request: Request) -> KeyVerifier:
    verifier: KeyVerifier = request.app.state.keys
    return verifier


def require(scope: Scope) -> Any:
    """A dependency refusing requests whose API key does not grant `scope` (when auth is on)."""

    async def check(
        request: Request,
        header_key: Annotated[str | None, Security(_api_key_header)],
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> None:
        verifier = get_verifier(request)
        if not await run_in_threadpool(verifier.enabled):
            return
        key = header_key or (bearer.credentials if bearer is not None else None)
        if not key:
            raise Unauthorized("an API key is required: send it in the X-API-Key header")
        record = await run_in_threadpool(verifier.lookup, key)
        if record is None:
            raise Unauthorized("unknown or revoked API key")
        request.state.key_prefix = record.prefix
        if not record.allows(scope):
            raise Forbidden(
                f"this API key has the {record.scope.value} scope; this route needs {scope.value}",
                required_scope=scope.value,
                key_scope=record.scope.value,
            )

    check.__name__ = f"require_{scope.value}"
    setattr(check, SCOPE_ATTRIBUTE, scope)
    return Depends(check)


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


__all__ = ["document_protected", "get_verifier", "require", "route_scope"]
