"""One log line per request (logger `facegate.access`, INFO): method, route, status, latency, decision, key prefix.

- `route` is the route's template (`/identities/{identity_id}`), not the raw path: ids stay out of the log, and a
  probe for random paths shows as `unmatched` instead of echoing whatever was sent.
- `decision` is what the route put on `request.state.decision` (verify: match / no_match; identify: each face's
  outcome, e.g. `match` or `match,unknown`); `error` the error code of a refused request.
- `key` is the API key's prefix (8 hex characters), never the key.
Never logged: embeddings, image bytes, names, metadata, query strings, client addresses (personal data).

Plain ASGI (like MetricsMiddleware): uploads stream through untouched.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("facegate.access")

# request.state attributes a route or the auth dependency may set, and the log field each becomes.
STATE_FIELDS = {"decision": "decision", "error_code": "error", "key_prefix": "key"}


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        # request.state is a view of this dict; creating it here makes sure the app writes into the one we read.
        state: dict[str, Any] = scope.setdefault("state", {})
        start = time.perf_counter()
        status = 500  # if the app dies before answering, the server sends a 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            fields: dict[str, Any] = {
                "method": scope.get("method", "GET"),
                "route": getattr(route, "path", None) or "unmatched",
                "status": status,
                "latency_ms": round((time.perf_counter() - start) * 1000, 1),
            }
            for attribute, field in STATE_FIELDS.items():
                value = state.get(attribute)
                if value is not None:
                    fields[field] = str(value)
            log.info(
                "%s %s %d %.1f ms",
                fields["method"],
                fields["route"],
                status,
                fields["latency_ms"],
                extra={"fields": fields},
            )
