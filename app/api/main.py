"""Assembles the API: one router per resource."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from app.api.deps import query_fields
from app.api.routes import (
    admin,
    calibration,
    cluster,
    docs,
    embed,
    enroll,
    evaluation,
    health,
    identify,
    identify_batch,
    identities,
    ui,
    verify,
)

_MODULES = (
    enroll,
    verify,
    identify,
    identify_batch,
    embed,
    identities,
    cluster,
    calibration,
    evaluation,
    health,
    ui,
    docs,
    admin,
)

api_router = APIRouter()
for module in _MODULES:
    # The API's routes refuse query parameters they do not take. Not checked: the console's and the docs' files,
    # and the probes and metrics, which decide nothing (a monitor's extra parameter must not make them fail).
    # Appended to each route's own dependencies rather than given to include_router, which would run it first:
    # the API key is checked before anything about the request, so a caller without one gets 401 (with a narrower
    # one 403), as for a misspelt form field, not a 422 describing the route's parameters.
    if module not in (ui, docs, health):
        for route in module.router.routes:
            if isinstance(route, APIRoute):
                route.dependencies.append(Depends(query_fields))
    api_router.include_router(module.router)


def api_routes() -> list[BaseRoute]:
    """Every route of the API in one flat list (each resource router's own routes), for naming the route of a
    request that the router never saw (refused before routing)."""
    return [route for module in _MODULES for route in module.router.routes]
