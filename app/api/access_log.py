"""One log line per request (logger `facegate.access`, INFO): method, route, status, latency, decision, key prefix,
request id.

- `route` is the route's template (`/identities/{identity_id}`), not the raw path: ids stay out of the log, and a
  probe for random paths shows as `unmatched` instead of echoing whatever was sent.
- `decision` is what the route put on `request.state.decision` (verify: match / no_match; identify: each face's
  outcome, e.g. `match` or `match,unknown`; identify/batch: the outcomes counted, `error:1,match:3`); `error` the
  error code of a refused request; `incident` a 500's incident id, as in its traceback's log line and the reply.
- `key` is the API key's prefix (8 hex characters), never the key.
- `request_id` the id the answer's `X-Request-ID` header carries (app/api/request_id.py).
Never logged: embeddings, image bytes, names, metadata, query strings, client addresses (personal data).

A `RequestObserver` like MetricsMiddleware: uploads stream through untouched.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import Scope

from app.api.middleware import RequestObserver
from app.api.route_names import method_name, route_template

log = logging.getLogger("facegate.access")

# request.state attributes a route or the auth dependency may set, and the log field each becomes.
STATE_FIELDS = {
    "decision": "decision",
    "error_code": "error",
    "incident": "incident",
    "key_prefix": "key",
    "request_id": "request_id",
}


class AccessLogMiddleware(RequestObserver):
    def enabled(self) -> bool:
        return log.isEnabledFor(logging.INFO)

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        state: dict[str, Any] = scope.get("state", {})
        fields: dict[str, Any] = {
            "method": method_name(scope),
            "route": route_template(scope),
            "status": status,
            "latency_ms": round(seconds * 1000, 1),
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
