"""Pure ASGI middleware: the request body limits (per request and per worker), per-request metrics, CORS answers in
our error format and the answer to a request cut at shutdown.

All are plain ASGI (not BaseHTTPMiddleware) so that uploads stream through untouched and nothing is buffered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.asgi import HttpMiddleware, WatchedSend
from app.api.errors import error_response, new_incident
from app.api.route_names import method_name, route_template
from app.errors import RequestTooLarge, ServerBusy, ShuttingDown

if TYPE_CHECKING:
    from app.api.metrics import Metrics


RETRY_AFTER_SECONDS = 1  # a held body is usually released within a second or two, when its request is answered


class _BodyRefused(Exception):
    pass


class BodyBudget:
    """The request-body bytes one worker holds at once, over all its requests (`image.max_inflight_bytes`).

    Only the worker's event loop touches it, and `take` checks and adds without an await in between, so concurrent
    requests need no lock. `held` is back to 0 whenever no request is in flight.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        """Count `n` more bytes as held, unless that would go over the limit (then nothing is counted)."""
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        self.held -= n


class BodyLimitMiddleware(HttpMiddleware):
    """Refuse bodies over `max_bytes` with 413 `request_too_large`, and bodies the worker has no room for (its
    `budget` of bytes held at once) with 503 `server_busy`, without reading them whole.

    A declared Content-Length over either is refused before the app runs. Otherwise the bytes are counted as
    they stream in (chunked uploads, lying Content-Length); once over, reading stops, and whatever the app would
    have answered (FastAPI turns a failed body read into a 400) is replaced by the refusal.

    A request's bytes count against the budget from their arrival until the app returns (its answer sent): the app
    holds the body while it works (photos stay in memory, app/api/forms.py). A declared Content-Length is only
    checked against the room left, not reserved: reserving it would let a dozen clients that declare 20 MiB and
    send nothing lock every upload out for free, where holding the budget this way takes sending it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, budget: BodyBudget) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes
        self.budget = budget

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = Headers(scope=scope).get("content-length")
        declared_bytes = int(declared) if declared is not None and declared.isdigit() else 0
        if declared_bytes > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        if declared_bytes > self.budget.limit - self.budget.held:
            await self._busy(scope, receive, send)
            return

        held = 0  # this request's share of the budget, given back however the request ends
        received = 0
        refusal: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None
        started = False

        async def limited_receive() -> Message:
            nonlocal received, held, refusal
            if refusal is not None:
                raise _BodyRefused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refusal = self._too_large
                elif received > held:
                    if not self.budget.take(received - held):
                        refusal = self._busy
                    else:
                        held = received
                if refusal is not None:
                    raise _BodyRefused
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None:
                return  # the app's reply to the failed read is dropped; the refusal is sent below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            try:
                await self.app(scope, limited_receive, guarded_send)
            except _BodyRefused:
                pass
            except BaseException:
                if refusal is None:
                    raise
            if refusal is not None and not started:
                await refusal(scope, receive, send)
        finally:
            # Also on an exception, a client gone mid-body or a cancelled task: a share never given back would
            # shrink the worker's budget for good.
            self.budget.release(held)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            RequestTooLarge.code,
            f"the request body is larger than the limit of {self.max_bytes} bytes",
            {"limit_bytes": self.max_bytes},
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)

    async def _busy(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            503,
            ServerBusy.code,
            f"the server is busy: it already holds as many request bodies as it may at once ({self.budget.limit} "
            f"bytes); retry in {RETRY_AFTER_SECONDS} s",
            {"limit_bytes": self.budget.limit, "retry_after_seconds": RETRY_AFTER_SECONDS},
            headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"},
        )
        await response(scope, receive, send)


class RequestObserver(HttpMiddleware):
    """Base of the middlewares that watch every HTTP request end: subclasses get `observe(scope, status, seconds)`
    with the status the server sent (500 if the app died before answering) once the response is done. Plain ASGI:
    uploads stream through untouched."""

    def enabled(self) -> bool:
        return True

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        raise NotImplementedError

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.enabled():
            await self.app(scope, receive, send)
            return
        # request.state is a view of this dict; creating it here makes sure the app writes into the one we read.
        scope.setdefault("state", {})
        start = time.perf_counter()
        status = 500  # if the app dies before answering, the server sends a 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            # The JSON 500 was sent by errors.InternalErrorMiddleware, or is sent by Starlette's ServerErrorMiddleware.
            scope["state"].setdefault("error_code", "internal_error")
            scope["state"].setdefault("incident", new_incident())  # the 500's log line names the same one
            raise
        finally:
            self.observe(scope, status, time.perf_counter() - start)


class ShutdownCutMiddleware(HttpMiddleware):
    """A request still running when the shutdown timeout (FACEGATE_SHUTDOWN_TIMEOUT) after SIGTERM runs out is
    cancelled by uvicorn, which would log a traceback at ERROR and answer a plain-text 500. Answered here instead: 503
    `shutting_down` in our error format, with `Connection: close`; the access log and metrics record it as such.

    Its work is abandoned: from the app's shutdown on, the gallery commits nothing (FaceService.close), but a change
    committed in the moment before the cut may be stored, so the answer does not claim it was not."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        watched = WatchedSend(send)
        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            if watched.started:
                raise  # half an answer sent: uvicorn closes the connection
            response = error_response(
                503,
                ShuttingDown.code,
                "the server is shutting down and cut this request before it finished: a change it was making may or "
                "may not have been stored (look before retrying it)",
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)


class NoStoreMiddleware(HttpMiddleware):
    """`Cache-Control: no-store` on every answer that sets no cache policy of its own: names, metadata, embeddings
    and decisions about people are personal (biometric) data, for no browser or proxy cache to keep. The console's
    files and a stored photo set their own."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"cache-control" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"cache-control", b"no-store")]}
            await send(message)

        await self.app(scope, receive, send_no_store)


class MetricsMiddleware(RequestObserver):
    """Request latency by method, route template and status: every label bounded (the route's template, not the raw
    path, whose ids and probes would add a series each; a made-up method is OTHER)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        self.metrics.observe_request(method_name(scope), route_template(scope), status, seconds)


class CorsMiddleware(CORSMiddleware):
    """Starlette's CORS handling; a refused preflight is answered with our JSON error (400 `cors_refused`, the
    refused parts in details) instead of Starlette's plain text, like every other error."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ").split(", ")
        headers = {k: v for k, v in response.headers.items() if k.lower() not in {"content-length", "content-type"}}
        return error_response(
            400,
            "cors_refused",
            f"cross-origin request refused: {', '.join(refused)} not allowed (FACEGATE_CORS__ALLOW_ORIGINS)",
            {"refused": refused},
            headers=headers,
        )
