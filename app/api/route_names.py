"""The route a request goes to: its name for logs and metrics (its template, never the raw path: ids stay out), and
the route itself before the router runs it."""

from __future__ import annotations

from starlette.routing import BaseRoute, Match
from starlette.types import Scope

# The methods a metric label or log line names as sent (RFC 9110's, and PATCH). uvicorn's HTTP parser (h11) passes any
# token as a method: anything else is "OTHER", so that made-up methods cannot add a series (or a log value) each.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


def method_name(scope: Scope) -> str:
    """The request's method for metrics and logs: one of KNOWN_METHODS, else "OTHER"."""
    method = str(scope.get("method", "GET"))
    return method if method in KNOWN_METHODS else "OTHER"


def route_template(scope: Scope) -> str:
    """The matched route's template (`/identities/{identity_id}`), never the raw path; `unmatched` otherwise.

    The router records the route it ran in the scope; a request refused before routing (a declared body over the
    limit) or answered by a route that does not record itself (/docs, /openapi.json) is matched against the app's
    flat route table (`app.state.route_table`, set by create_app) instead."""
    path = getattr(scope.get("route"), "path", None)
    if path:
        return str(path)
    for route in _route_table(scope):
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return str(getattr(route, "path", "unmatched"))
    return "unmatched"


def matched_route(scope: Scope) -> BaseRoute | None:
    """The route the router will run for this request, found before it runs (the API-key check needs its scope);
    None when the router will answer 404 or 405. The table lists the routes in the router's order, and the router
    runs the first whose path and method both match."""
    for route in _route_table(scope):
        if route.matches(scope)[0] is Match.FULL:
            return route
    return None


def allowed_methods(scope: Scope) -> list[str]:
    """The methods some route answers at the request's path, for a 405's Allow header: the router's own 405 names
    only the first route of the path (`GET` for `PUT /identities/{id}`, which also takes PATCH and DELETE). A route
    that answers GET answers HEAD too (app/api/head.py)."""
    methods: set[str] = set()
    for route in _route_table(scope):
        declared = getattr(route, "methods", None)
        if declared and route.matches({**scope, "method": next(iter(declared))})[0] is Match.FULL:
            methods |= set(declared) | ({"HEAD"} if "GET" in declared else set())
    return sorted(methods)


def path_without_slash(scope: Scope) -> str | None:
    """The request's path without its trailing slash when that names a route (for any method), else None: facegate's
    paths have none, and the answer to `/enroll/` says which path was meant."""
    path = str(scope.get("path", ""))
    if len(path) < 2 or not path.endswith("/"):
        return None
    stripped = path.rstrip("/") or "/"
    if stripped.startswith("//"):
        return None  # as a Location, "//host" names another host: never redirect there (no route matches it today)
    probe = {**scope, "path": stripped}
    return stripped if any(route.matches(probe)[0] is not Match.NONE for route in _route_table(scope)) else None


def _route_table(scope: Scope) -> list[BaseRoute]:
    """The app's flat route table (`app.state.route_table`, set by create_app); empty for another app."""
    table: list[BaseRoute] = getattr(getattr(scope.get("app"), "state", None), "route_table", [])
    return table
