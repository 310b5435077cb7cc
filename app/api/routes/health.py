"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.api import responses
from app.api.auth import require
from app.api.deps import MetricsDep, ServiceDep
from app.api.head import HeadRoute
from app.api.metrics import CONTENT_TYPE, RECENT_WINDOW
from app.api.schemas import Health, LatencySummary, Readiness, RouteLatencyOut
from app.auth import Scope
from app.service import Readiness as ReadinessState

router = APIRouter(tags=["health"], route_class=HeadRoute)


# HEAD too: some load balancers and probes check with HEAD (the status, no body). Each method is its own route so
# that each has its own OpenAPI operation id (one route with both methods gave both the same id).
@router.head("/healthz", response_model=Health, summary="The process is up (status only, no body)")
@router.get(
    "/healthz",
    response_model=Health,
    summary="The process is up (does not touch models or database)",
)
async def healthz() -> Health:
    return Health()


# /readyz answers within this, under the image's HEALTHCHECK --timeout=5s: a database that stalled (connections up,
# nothing answered) held the check for the statement timeout plus the stall grace, 23 s by default.
READINESS_TIMEOUT_SECONDS = 4.0  # past libpq's connect_timeout (3 s): a server down is "unreachable"

# A probe still running when the shutdown timeout runs out is answered like any request: 503 shutting_down.
_CUT = " (a probe cut at shutdown: shutting_down, as ErrorResponse)"


@router.head(
    "/readyz",
    response_model=Readiness,
    responses={**responses.errors(), 503: {"model": Readiness, "description": f"Not ready{_CUT}."}},
    summary="Ready to serve (status only, no body)",
)
@router.get(
    "/readyz",
    response_model=Readiness,
    responses={**responses.errors(), 503: {"model": Readiness, "description": f"Not ready: see `problems`{_CUT}."}},
    summary="Ready to serve: models loaded, database reachable, index built",
)
async def readyz(service: ServiceDep) -> JSONResponse:
    state: ReadinessState | None = None
    with anyio.move_on_after(READINESS_TIMEOUT_SECONDS):
        # abandon_on_cancel: the check's thread finishes on its own (the stall watch ends it); the probe does not wait.
        state = await anyio.to_thread.run_sync(service.readiness, abandon_on_cancel=True)
    if state is None:
        state = service.unanswered_readiness()
    body = Readiness(
        ready=state.ready,
        models_loaded=state.models_loaded,
        providers=state.providers,
        database=state.database,
        gallery_size=state.gallery_size,
        identities=state.identities,
        stale_faces=state.stale_faces,
        model_version=state.model_version,
        problems=list(state.problems),
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if state.ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(metrics: MetricsDep) -> Response:
    # Several workers: the figures are merged from their files (disk reads, off the event loop).
    body = metrics.render() if metrics.shared is None else await run_in_threadpool(metrics.render)
    return Response(body, media_type=CONTENT_TYPE)


@router.get(
    "/metrics/summary",
    response_model=LatencySummary,
    responses=responses.errors(),
    dependencies=[require(Scope.read)],
    summary="Latency of the most recent requests per route (JSON, every worker; the web console's health page)",
)
async def metrics_summary(metrics: MetricsDep) -> LatencySummary:
    routes, workers = metrics.recent_latency() if metrics.shared is None else await run_in_threadpool(metrics.recent_latency)
    return LatencySummary(
        window=RECENT_WINDOW,
        requests=sum(r.count for r in routes),
        workers=workers,
        routes=[RouteLatencyOut(**{f: getattr(r, f) for f in RouteLatencyOut.model_fields}) for r in routes],
    )
