"""The FastAPI application factory. Importing this module does no I/O.

Run with `uvicorn --factory app.main:create_app` (or `facegate serve`). The lifespan verifies and loads the models
(if `preload_models`), opens the gallery with its migrations applied and builds the search index; everything lives
on `app.state` (settings, service, metrics).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import SettingsError
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartParser
from starlette.routing import Route

from app import __version__
from app.api import errors
from app.api.access_log import AccessLogMiddleware
from app.api.auth import ApiKeyMiddleware, document_protected
from app.api.main import api_router, api_routes
from app.api.metrics import Metrics
from app.api.middleware import (
    BodyBudget,
    BodyLimitMiddleware,
    CorsMiddleware,
    MetricsMiddleware,
    NoStoreMiddleware,
    ShutdownCutMiddleware,
)
from app.api.multiprocess import shared_directory
from app.api.request_id import HEADER as REQUEST_ID_HEADER
from app.api.request_id import RequestIdMiddleware
from app.auth.verifier import open_verifier
from app.config import Settings, describe_settings_error, get_settings
from app.service import FaceService

log = logging.getLogger(__name__)

DESCRIPTION = """
Face verification over dlib's ResNet embeddings (128-d), run in ONNX Runtime.

* Distances are **squared L2** between embeddings; two faces match when distance <= threshold
  (default 0.36 = dlib's 0.6 Euclidean). Every decision returns the distance and threshold used.
* Every error is `{"error": {"code": ..., "message": ..., "details": ...}}` with a stable `code`.
* Request bodies are limited to `FACEGATE_IMAGE__MAX_UPLOAD_BYTES` (413 `request_too_large`), and the bodies one
  worker holds at once to `FACEGATE_IMAGE__MAX_INFLIGHT_BYTES` (503 `server_busy`, with `Retry-After`).
"""


def _settings_from_environment() -> Settings:
    """`uvicorn --factory app.main:create_app` has no CLI to word a refused setting: pydantic's traceback named model
    fields, not the FACEGATE_ variable. One line instead, as `facegate serve` gives (exit status 1)."""
    try:
        return get_settings()
    except (ValidationError, SettingsError) as error:
        raise SystemExit(f"facegate: invalid settings: {describe_settings_error(error)}") from None


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing is opened until the lifespan starts (`with TestClient(app)` / uvicorn startup)."""
    settings = settings if settings is not None else _settings_from_environment()
    metrics = Metrics(shared_directory())  # several workers (facegate serve --workers N) share their metrics
    # One per app, so one per worker process: the request bodies this worker holds at once.
    body_budget = BodyBudget(settings.image.max_inflight_bytes)
    # Starlette writes an uploaded file over `spool_max_size` (1 MB) to a temporary file on disk: a photo is
    # biometric data and must never touch the disk. No upload can exceed the body limit, so up to that, it stays in
    # memory. (A class attribute, shared by every app of the process: only ever raised.)
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.image.max_upload_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await run_in_threadpool(FaceService.open, settings)
        app.state.service = service
        try:  # API keys live in the gallery database; the bootstrap key (if any) is stored before serving
            app.state.keys = await run_in_threadpool(open_verifier, service.gallery.session, settings.auth)
        except BaseException:
            service.close()
            raise
        metrics.info.labels(service.pipeline.model_version).set(1)
        metrics.watch(service.gallery.peek_stats, service.pipeline.providers, lambda: body_budget.held)
        service.pipeline.on_batch = metrics.observe_batch
        try:
            yield
        finally:
            app.state.keys.close()  # its last_used_at writer stops before the database closes
            service.close()
            metrics.close()

    app = FastAPI(
        title="facegate",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # app/api/routes/docs.py: Swagger UI from the package, not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.body_budget = body_budget
    # No automatic `/enroll/` -> `/enroll` redirect: Starlette's is absolute (http:// behind a TLS proxy) and a 307
    # makes a client post the photo again; the 404 handler answers trailing slashes instead (app/api/errors.py).
    app.router.redirect_slashes = False
    errors.install(app)
    app.include_router(api_router)
    document_protected(app.routes)
    # The routes in the router's order, to find a request's route before the router runs (the API-key check) or when
    # it never did (the access log and metrics of a request refused before routing).
    app.state.route_table = [r for r in app.routes if isinstance(r, Route)] + api_routes()
    # Added last = outermost: latency includes refused bodies, and the body limit runs before anything reads.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.image.max_upload_bytes, budget=body_budget)
    # Outside the body limit: a request without a valid key of the route's scope is refused before a byte of its
    # body is read or counted against the worker's budget (anonymous uploads must not crowd out authorised ones).
    app.add_middleware(ApiKeyMiddleware)
    # Inside every middleware that marks answers (no-store, CORS, request id): a 500 carries what the others do.
    app.add_middleware(errors.InternalErrorMiddleware)
    app.add_middleware(NoStoreMiddleware)  # outside the body limit: its 413 and 503 answers are covered too
    app.add_middleware(ShutdownCutMiddleware)  # inside the metrics and access log, which record its 503
    if settings.cors.allow_origins:
        # Outside the body limit and the error handlers, so a browser can read a 413 or 401 answer too; inside the
        # metrics and the access log, which then also record preflights and refused ones.
        app.add_middleware(
            CorsMiddleware,
            allow_origins=settings.cors.allow_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["X-API-Key", "Authorization", "Content-Type", REQUEST_ID_HEADER],
            # Readable by the page's script: the id to quote in a report, and how long to wait before retrying.
            expose_headers=[REQUEST_ID_HEADER, "Retry-After"],
            allow_credentials=False,
            max_age=settings.cors.max_age,
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(AccessLogMiddleware)
    app.add_middleware(RequestIdMiddleware)  # outermost: the id is set first, and every answer carries it
    return app
