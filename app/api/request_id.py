"""Request ids: every answer carries `X-Request-ID`, and the request's access line (and a 500's log line) names it, so
a client's or a proxy's report of one request can be found in the log.

A well-formed id the client or a proxy sent (nginx `$request_id`, a load balancer's trace id) is kept, so one id
follows the request across services; anything else gets a fresh one. Well-formed means 1 to 128 characters from a
set that needs no quoting in a text log line or a header: a made-up id cannot forge log fields or split a line.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from app.api.asgi import HttpMiddleware

HEADER = "X-Request-ID"
STATE_ATTRIBUTE = "request_id"
_WELL_FORMED = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_of(scope: Scope) -> str | None:
    """The id RequestIdMiddleware gave the request (None outside it: a test app without the middleware)."""
    value = scope.get("state", {}).get(STATE_ATTRIBUTE)
    return str(value) if value is not None else None


class RequestIdMiddleware(HttpMiddleware):
    """Outermost of our middlewares: the id is set before anything else runs, and every answer sent through here
    carries it (a refused body, a missing API key, a CORS preflight, a 500). A 500 for an exception raised outside
    errors.InternalErrorMiddleware is sent by Starlette's ServerErrorMiddleware, outside this one:
    app/api/errors.py puts the header on it from the request's state."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = Headers(scope=scope).get(HEADER)
        request_id = sent if sent is not None and _WELL_FORMED.fullmatch(sent) else new_request_id()
        scope.setdefault("state", {})[STATE_ATTRIBUTE] = request_id
        header = (HEADER.lower().encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await self.app(scope, receive, send_with_id)
