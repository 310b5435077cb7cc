"""The one place where errors become HTTP: status codes and the `{"error": {"code", "message", "details"?}}` body.

The core raises typed exceptions from `app.errors`; routes never build error responses themselves. Anything not
mapped here (a bug, a crashed library) becomes a logged, generic 500 that names nothing internal.

Status map (also in the OpenAPI document of every route):

| code                          | status | when                                                          |
|-------------------------------|--------|---------------------------------------------------------------|
| invalid_request               | 422    | missing/unknown/repeated/out-of-range fields, contradictions  |
| invalid_request               | 400    | a body that cannot be parsed at all (malformed multipart, a   |
|                               |        | form field that is not UTF-8, an unusable multipart charset,  |
|                               |        | JSON not UTF-8 or too deep)                                   |
| invalid_image                 | 422    | not an image, truncated or corrupt                            |
| unsupported_image             | 415    | an image format (PSD, EPS, ..., HEIC unless image.heic) or a  |
|                               |        | TIFF pixel layout facegate does not decode                    |
| image_too_small               | 422    | too small for the detector                                    |
| no_face                       | 422    | no face found                                                 |
| multiple_faces                | 422    | several faces and `face=single`; details.boxes lists them     |
| image_too_large               | 413    | more pixels than `image.max_pixels` (RLE BMP: 2 M or 1 MB)    |
| request_too_large             | 413    | body larger than `image.max_upload_bytes`; per photo of a     |
|                               |        | many-photo request: past `image.max_request_pixels`           |
| unknown_identity/unknown_face | 404    | no such id                                                    |
| image_not_stored              | 404    | the face's photo was not kept (`store_images` off)            |
| no_enrolled_faces             | 409    | verify against an identity whose faces were all deleted       |
| low_quality                   | 422    | enrol: the face fails a quality limit; details.reasons        |
| possible_duplicate            | 409    | enrol a new identity whose face matches an enrolled one       |
| insufficient_data             | 409    | calibrate on a gallery without 2 identities of >= 2 faces;    |
|                               |        | the gallery's curve or identify evaluation on too few faces;  |
|                               |        | apply a calibration from fewer than 1/FAR different pairs     |
| not_found / method_not_allowed| 404/405| no such route / method (a trailing slash: GET/HEAD get a 308  |
|                               |        | to the path without it, other methods a 404 that names it)    |
| model_unavailable             | 503    | models missing, corrupt or the required GPU is not usable     |
| shutting_down                 | 503    | still running when the shutdown timeout ran out after SIGTERM |
| server_busy                   | 503    | the worker holds `image.max_inflight_bytes` of bodies already |
| database_unavailable          | 503    | the database cannot serve for now (unreachable, restarting,   |
|                               |        | read-only standby, SQLite locked, a PostgreSQL lock or        |
|                               |        | statement timeout, a deadlock); with Retry-After              |
| insufficient_storage          | 507    | the database's disk is full: nothing was stored               |
| request_timeout               | 408    | the request stopped arriving, or came too slowly (sent by the |
|                               |        | server's protocol, app/api/request_timeouts.py)               |
| client_disconnected           | 499    | never sent: the client left before its body was read (logs)   |
| internal_error                | 500    | anything else (logged with a request id, nothing leaked)      |

`invalid_image` is 422, not 415: the request itself (multipart) is fine; it is the content of the `image` field that
cannot be processed. `unsupported_image` is 415 (RFC 9110 allows it for content found unsupported on inspection):
the photo is a real image, in a format the client can convert from.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from app import errors
from app.api.asgi import HttpMiddleware, WatchedSend
from app.api.request_id import HEADER, request_id_of
from app.api.route_names import allowed_methods, method_name, path_without_slash, route_template
from app.gallery.db import driver_message
from app.logs import LOGGED_ATTRIBUTE

log = logging.getLogger(__name__)

# code -> HTTP status. Keyed by code (not class) so that errors added later in app/errors.py by their code are
# found; `status_for` walks the class hierarchy for subclasses that reuse a parent's code.
STATUS_BY_CODE: dict[str, int] = {
    errors.InvalidRequest.code: 422,
    errors.InvalidImage.code: 422,
    errors.ImageTooSmall.code: 422,
    errors.NoFace.code: 422,
    errors.MultipleFaces.code: 422,
    errors.ImageTooLarge.code: 413,
    errors.RequestTooLarge.code: 413,
    errors.NoEnrolledFaces.code: 409,
    errors.ModelUnavailable.code: 503,
    errors.ShuttingDown.code: 503,
    errors.ServerBusy.code: 503,
    errors.DatabaseUnavailable.code: 503,
    errors.InsufficientStorage.code: 507,
    errors.RequestTimeout.code: 408,
    errors.UnknownIdentity.code: 404,
    errors.UnknownFace.code: 404,
    errors.ImageNotStored.code: 404,
    errors.LowQuality.code: 422,
    errors.PossibleDuplicate.code: 409,
    errors.InsufficientData.code: 409,
    errors.UnsupportedImage.code: 415,
    errors.Unauthorized.code: 401,
    errors.Forbidden.code: 403,
    errors.UnknownApiKey.code: 404,
}

# HTTP errors raised by the framework itself (unknown route, wrong method, unparseable body).
_HTTP_CODES: dict[int, str] = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def status_for(exc: errors.FacegateError) -> int | None:
    for cls in type(exc).__mro__:
        code = getattr(cls, "code", None)
        if code in STATUS_BY_CODE:
            return STATUS_BY_CODE[code]
    return None


def error_body(code: str, message: str, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = dict(details)
    return {"error": body}


def error_object(exc: errors.FacegateError) -> dict[str, Any]:
    """A core error as the `{"code", "message", "details"?}` object alone, for replies that report errors per item
    instead of failing the request (POST /embed, POST /identify/batch)."""
    body: dict[str, Any] = error_body(exc.code, exc.message, _jsonable(exc.details))["error"]
    return body


class CodedErrorResponse(JSONResponse):
    """An error answer. When sent, it puts its code on the request's state, where the access log reads it: every
    refusal is logged with its code, whichever layer answered (handlers, body limit, CORS)."""

    def __init__(self, status: int, code: str, body: dict[str, Any], headers: Mapping[str, str] | None) -> None:
        super().__init__(body, status_code=status, headers=dict(headers or {}))
        self.code = code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})["error_code"] = self.code
        await super().__call__(scope, receive, send)


def error_response(
    status: int,
    code: str,
    message: str,
    details: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return CodedErrorResponse(status, code, error_body(code, message, details), headers)


def new_incident() -> str:
    return uuid.uuid4().hex[:12]


def _internal_error(scope: Scope, exc: BaseException) -> JSONResponse:
    # The request's access line names the same incident (RequestObserver reads it, or sets it first when this runs
    # in ServerErrorMiddleware, after the access line).
    state = scope.setdefault("state", {})
    incident = str(state.setdefault("incident", new_incident()))
    request_id = request_id_of(scope)
    # The route's template, not the raw path: ids stay out of the log (as in the access log).
    log.error(
        "unhandled error %s on %s %s",
        incident,
        method_name(scope),
        route_template(scope),
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"fields": {"incident": incident, "request_id": request_id}},
    )
    with contextlib.suppress(AttributeError):  # Starlette re-raises it: uvicorn's traceback of it is dropped
        setattr(exc, LOGGED_ATTRIBUTE, incident)
    state[_ANSWERED] = True
    message = f"internal error (incident {incident}); it has been logged"
    return error_response(500, "internal_error", message)


_ANSWERED = "internal_error_answered"  # in a request's scope state: its 500 is logged (and sent, unless started)


class InternalErrorMiddleware(HttpMiddleware):
    """Answers a request that failed with an unexpected exception (before its answer began) with the logged 500, from
    inside the middlewares that put CORS, `Cache-Control: no-store` and `X-Request-ID` on every answer. Starlette's
    ServerErrorMiddleware, outermost, sent it past all of them: a page of an allowed origin could not read it (no
    Access-Control-Allow-Origin), so not its request id either. The exception is raised on, as before, for the
    server (and a TestClient) to see; unhandled_error_handler then finds it answered."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        watched = WatchedSend(send)
        try:
            await self.app(scope, receive, watched)
        except Exception as exc:  # not CancelledError (BaseException): ShutdownCutMiddleware answers a cut request
            if not watched.started:
                await _internal_error(scope, exc)(scope, receive, send)
            raise


def facegate_error_response(scope: Scope, exc: errors.FacegateError) -> JSONResponse:
    """The answer to a core error: its status and body, or a logged 500 for one not mapped here. Also used outside
    the exception handlers (the API-key middleware answers before the app runs)."""
    status = status_for(exc)
    if status is None:
        return _internal_error(scope, exc)
    headers = {}
    if status == 401:
        # RFC 9110: a 401 names the scheme to use; `ApiKey` is ours (X-API-Key header), Bearer the standard one.
        headers["WWW-Authenticate"] = 'ApiKey header="X-API-Key", Bearer'
    retry_after = exc.details.get("retry_after_seconds")
    if status == 503 and isinstance(retry_after, int):
        headers["Retry-After"] = str(retry_after)
    if isinstance(exc, (errors.DatabaseUnavailable, errors.InsufficientStorage)):
        # One line, no traceback: while the database is out, every request that needs it ends here. The cause
        # (the driver's first line: refused, timed out, disk full) is for the log, not the client.
        log.warning("%s on %s %s: %s", exc.code, method_name(scope), route_template(scope), driver_message(exc))
    return error_response(status, exc.code, exc.message, _jsonable(exc.details), headers=headers)


async def facegate_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.FacegateError)
    return facegate_error_response(request.scope, exc)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    raw = exc.errors()
    problems = list(_clean_validation_errors(raw))
    summary = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'request'}: {p['message']}" for p in problems[:5])
    if len(raw) > 5:
        summary += f"; and {len(raw) - 5} more"
    hint = _body_kind_hint(request)
    if hint:
        summary += f" ({hint})"
    return error_response(
        422, "invalid_request", f"invalid request: {summary}", {"errors": problems, "n_errors": len(raw)}
    )


def _body_kind_hint(request: Request) -> str | None:
    """The body kind the route reads, when the request declared another: `curl -d` sends a form unless told
    otherwise, and a form field or JSON key then reads as missing, which does not say why."""
    body = getattr(request.scope.get("route"), "body_field", None)
    sent = declared_media_type(request)
    if body is None or sent is None:  # no body read; FastAPI reads an undeclared body as JSON
        return None
    if isinstance(body.field_info, params.Form):  # File is a Form
        if sent != "multipart/form-data":
            return f"this endpoint takes multipart/form-data (curl -F), not {shorten(sent)}"
    elif not is_json(sent):
        return f"this endpoint takes a JSON body (Content-Type: application/json), not {shorten(sent)}"
    return None


def declared_media_type(request: Request) -> str | None:
    """The request's Content-Type without its parameters, lower-case (None: none declared)."""
    declared = request.headers.get("content-type")
    return declared.split(";")[0].strip().lower() if declared else None


def is_json(media_type: str) -> bool:
    """Whether a body of this media type is read as JSON."""
    return media_type == "application/json" or media_type.endswith("+json")


# Set in a request's scope state by the server's protocol when it cut the request's body for coming too slowly.
TIMED_OUT = "request_timed_out"
CLIENT_DISCONNECTED = "client_disconnected"
CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": an answer no one receives, for the logs and metrics


def client_gone_response(scope: Scope) -> JSONResponse:
    """The answer to a request whose client left before its body was read whole (or whose body the server cut:
    FACEGATE_REQUEST_*TIMEOUT, answered 408 by the protocol already). Nobody receives it; it is what the access log
    and metrics record, instead of a 500 and a traceback logged for every upload a phone dropped."""
    if scope.get("state", {}).get(TIMED_OUT):
        return error_response(408, errors.RequestTimeout.code, "the request did not arrive in time")
    return error_response(
        CLIENT_CLOSED_STATUS, CLIENT_DISCONNECTED, "the client closed the connection before its request was read whole"
    )


async def client_disconnect_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ClientDisconnect)
    return client_gone_response(request.scope)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI reports a body it could not read whole as a 400
        return client_gone_response(request.scope)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    try:
        default = HTTPStatus(exc.status_code).phrase
    except ValueError:
        default = "HTTP error"
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else default
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {shorten(request.url.path)}"
        meant = path_without_slash(request.scope)
        if meant is not None and request.method in ("GET", "HEAD"):
            # A relative redirect: Starlette's own (redirect_slashes, turned off) wrote an absolute http:// URL
            # behind a TLS proxy. Other methods are not redirected: a client that follows would send the photo again.
            query = request.url.query
            location = request.scope.get("root_path", "") + meant + ("?" + query if query else "")
            return RedirectResponse(location, status_code=308)
        if meant is not None:
            message += f"; did you mean {shorten(meant)}? (facegate's paths have no trailing slash)"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {shorten(request.url.path)}"
        allowed = allowed_methods(request.scope)
        if allowed:
            return error_response(405, code, message, headers={**(exc.headers or {}), "Allow": ", ".join(allowed)})
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Run by Starlette's ServerErrorMiddleware (outermost) for every exception that reaches it."""
    if request.scope.get("state", {}).get(_ANSWERED):  # by InternalErrorMiddleware: logged, its 500 sent
        return error_response(500, "internal_error", "internal error")  # not sent: the answer has begun
    # Raised outside InternalErrorMiddleware (by a middleware around it): this 500 is sent past RequestIdMiddleware,
    # which cannot put the id on it.
    response = _internal_error(request.scope, exc)
    request_id = request_id_of(request.scope)
    if request_id is not None:
        response.headers[HEADER] = request_id
    return response


def install(app: FastAPI) -> None:
    app.add_exception_handler(errors.FacegateError, facegate_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(ClientDisconnect, client_disconnect_handler)
    # Registered for Exception, Starlette runs this in ServerErrorMiddleware (outermost): a JSON 500 is sent, then
    # the exception is re-raised for the server to log; the client never sees a traceback.
    app.add_exception_handler(Exception, unhandled_error_handler)


MAX_LISTED_ERRORS = 20  # a body with 100k unknown keys gets 20 of its errors back, not 100k
MAX_ECHOED_CHARS = 64  # a location part that comes from the client (an unknown JSON key, a path) is cut to this


def shorten(text: str) -> str:
    """Client-chosen text (a field name, a JSON key, a file name, a path) as a reply may echo it: at most
    MAX_ECHOED_CHARS."""
    return text if len(text) <= MAX_ECHOED_CHARS else f"{text[:MAX_ECHOED_CHARS]}..."


def listed(names: list[str]) -> tuple[list[str], str]:
    """Client-chosen names as an error lists them: at most MAX_LISTED_ERRORS, each shortened, and the list in words
    for the message (saying how many more there are)."""
    shown = [shorten(name) for name in names[:MAX_LISTED_ERRORS]]
    words = ", ".join(map(repr, shown))
    if len(names) > len(shown):
        words += f" and {len(names) - len(shown)} more"
    return shown, words


_NOT_A_FILE = "Value error, Expected UploadFile"


def _clean_validation_errors(raw: Iterable[Mapping[str, Any]]) -> Iterable[dict[str, Any]]:
    """Pydantic's errors without `input`/`ctx`/`url` (the input may be a whole upload or a secret), at most
    MAX_LISTED_ERRORS of them, locations cut short (an unknown JSON key is the client's text)."""
    for i, e in enumerate(raw):
        if i == MAX_LISTED_ERRORS:
            return
        loc = [part for part in e.get("loc", ()) if part not in ("body",)] or list(e.get("loc", ()))
        message = str(e.get("msg", "invalid"))
        if message.startswith(_NOT_A_FILE):  # Starlette's words name a Python class: say what the client sent
            field = shorten(next((str(p) for p in loc if isinstance(p, str)), "image"))
            message = f"expected a file upload (curl -F '{field}=@photo.jpg'), not a text field"
        yield {
            "loc": [shorten(str(p)) for p in loc],
            "message": message,
            "type": str(e.get("type", "value_error")),
        }


def _jsonable(details: Mapping[str, Any]) -> dict[str, Any]:
    """Details as plain JSON values (numpy scalars, tuples and dataclass-like boxes flattened)."""
    out: dict[str, Any] = {}
    for key, value in details.items():
        out[key] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    if hasattr(value, "as_dict") and callable(value.as_dict):
        return value.as_dict()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
