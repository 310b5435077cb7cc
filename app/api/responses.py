"""OpenAPI documentation of the error responses each route can give (all share the ErrorResponse shape)."""

from __future__ import annotations

from typing import Any

from app.api.schemas import ErrorResponse

# Every code of each status, as in the README's error table (tests/test_readme.py checks that they agree); a code
# only some routes give says which.
_DESCRIPTIONS = {
    400: "invalid_request: the body cannot be parsed (malformed multipart, a text field that is not UTF-8, a "
    "multipart charset that is unknown or not a text encoding, a text field over 1 MB, over 1,000 fields or files, "
    "JSON that is not UTF-8 or is nested too deeply)",
    401: "unauthorized: no API key, or an unknown or revoked one (when keys are in use)",
    403: "forbidden: the API key's scope is too small for this route (details: required_scope, key_scope)",
    404: "unknown_identity / unknown_face (no such id, a malformed one, or a face of another identity) / "
    "image_not_stored (a face's photo, kept only with FACEGATE_STORE_IMAGES=true)",
    405: "method_not_allowed",
    408: "request_timeout: the request's bytes stopped coming for FACEGATE_REQUEST_IDLE_TIMEOUT, or it did not arrive "
    "whole within FACEGATE_REQUEST_TIMEOUT; the connection is closed after this answer",
    409: "no_enrolled_faces: the identity has no face of the served model left to compare with / possible_duplicate "
    "(enrol: the face already matches an enrolled identity; details name it) / insufficient_data (calibrate, the "
    "gallery's calibration curve, identify evaluation: too few identities with two faces, or no threshold meets "
    "the target FAR)",
    413: "request_too_large (body over image.max_upload_bytes) / image_too_large (over image.max_pixels)",
    415: "unsupported_image: an image format facegate does not decode (PSD, EPS, ..., HEIC unless image.heic is on); "
    "details.format names it",
    422: "invalid_request (missing, unknown or out-of-range fields) / invalid_image / image_too_small / no_face / "
    "multiple_faces (details.boxes lists every face) / low_quality (enrol: details.reasons lists each failing "
    "measurement with its value and limit, details.quality every measurement)",
    500: "internal_error: logged; the body names nothing internal",
    503: "model_unavailable (routes that run the models): the models (or the served head) are missing or corrupt, or "
    "the required GPU is unusable / server_busy (routes that take a body): the worker already holds "
    "image.max_inflight_bytes of request bodies; retry after the Retry-After header's seconds / shutting_down (any "
    "route): the request was still running when the server's shutdown timeout ran out after SIGTERM / "
    "database_unavailable (routes that use the gallery database, or an API key last checked over "
    "auth.cache_seconds ago): the database cannot serve for now (unreachable, restarting, a read-only standby, "
    "SQLite locked, a PostgreSQL lock or statement timeout, a deadlock); retry after the Retry-After header's seconds",
    507: "insufficient_storage: the database's disk is full; nothing was stored",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the listed statuses plus 422 (validation), 500 and 503 (shutting_down: any request
    still running when the shutdown timeout runs out), all as ErrorResponse."""
    codes = sorted(set(statuses) | {422, 500, 503})
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in codes}


BODY = (400, 408, 413, 503)  # any route that reads a body: unparsable, too slow, over the body limit or the budget
PHOTO = (*BODY, 404, 415, 422)
WRITE = (507,)  # any route that stores or deletes: the database's disk may be full
