"""Typed errors raised by the core. Each has a stable `code`; only `app/api/errors.py` maps them to HTTP."""

from __future__ import annotations

from typing import Any


class FacegateError(Exception):
    """Base class: `code` is stable and machine-readable, `message` is for people, `details` is extra JSON."""

    code: str = "error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidImage(FacegateError):
    """The bytes are not a photo we can decode (not an image, truncated or corrupt, an unsupported mode), or one whose
    decoding would cost far more than its size (a JPEG with thousands of scans: app/vision/decode.py)."""

    code = "invalid_image"


class UnsupportedImage(FacegateError):
    """An image in a format facegate does not decode (PSD, PostScript, ..., HEIC unless enabled; `details.format` when
    known): only photo formats are accepted (app/vision/decode.py FORMATS, and HEIF with FACEGATE_IMAGE__HEIC)."""

    code = "unsupported_image"


class ImageTooLarge(FacegateError):
    """Too many pixels (decompression-bomb guard; a lower limit for RLE-compressed BMP) or too many bytes."""

    code = "image_too_large"


class ImageTooSmall(FacegateError):
    """Too small for the detector to run on at all."""

    code = "image_too_small"


class NoFace(FacegateError):
    code = "no_face"


class MultipleFaces(FacegateError):
    code = "multiple_faces"


class ModelUnavailable(FacegateError):
    """Built models missing, corrupt (checksum) or the required provider cannot be used."""

    code = "model_unavailable"


class RequestTooLarge(FacegateError):
    """The request body is larger than `image.max_upload_bytes` (refused before it is read whole); or, for one photo
    of a many-photo request, the photos before it decoded `image.max_request_pixels` already."""

    code = "request_too_large"


class ServerBusy(FacegateError):
    """The worker already holds `image.max_inflight_bytes` of request bodies: this one is refused (before it is read,
    or at the part that would go over) rather than risk the worker running out of memory. Worth retrying later."""

    code = "server_busy"


class RequestTimeout(FacegateError):
    """A request that did not arrive in time (its bytes stopped, or came too slowly): answered by the server's HTTP
    protocol (app/api/request_timeouts.py), which then closes the connection."""

    code = "request_timeout"


class InvalidRequest(FacegateError):
    """A request that is well-formed but asks for something contradictory (e.g. both `name` and `identity_id`)."""

    code = "invalid_request"


class NoEnrolledFaces(FacegateError):
    """The identity exists but has no face left to compare with (all were deleted)."""

    code = "no_enrolled_faces"


class UnknownIdentity(FacegateError):
    """No identity with that id in the gallery (also for ids that are not well-formed)."""

    code = "unknown_identity"


class UnknownFace(FacegateError):
    """No face with that id under that identity (also for ids that are not well-formed)."""

    code = "unknown_face"


class ImageNotStored(FacegateError):
    """The face exists but its photo was not kept (FACEGATE_STORE_IMAGES was off when it was enrolled)."""

    code = "image_not_stored"


class LowQuality(FacegateError):
    """Enrolment refused: the face fails the quality limits (`details.reasons`: issue, measured value, limit each;
    `details.quality`: every measurement). Override with allow_low_quality."""

    code = "low_quality"


class PossibleDuplicate(FacegateError):
    """Enrolment of a new identity refused: the face already matches an enrolled identity within the threshold
    (`details`: identity_id, name, distance, threshold). Override with allow_duplicate."""

    code = "possible_duplicate"


class InsufficientData(FacegateError):
    """Not enough labelled data for the computation asked (e.g. calibrating on a gallery without any identity that
    has two faces)."""

    code = "insufficient_data"


class Unauthorized(FacegateError):
    """No API key, or one that is unknown or revoked, where a key is required (the message never says which of the
    last two, nor anything about stored keys)."""

    code = "unauthorized"


class Forbidden(FacegateError):
    """A valid API key whose scope is too small for the route (`details`: required and granted scope)."""

    code = "forbidden"


class UnknownApiKey(FacegateError):
    """No API key with that prefix or id (key management)."""

    code = "unknown_api_key"


class DatabaseUnavailable(FacegateError):
    """The gallery database cannot be used for now (app/gallery/db.py `outage_error`): its server cannot be reached
    or dropped the connection (a restart, a failover, a network cut), refuses connections (starting, stopping, out of
    connections) or is a read-only standby, or a SQLite file stayed locked by another writer. Worth retrying: the
    next request opens a new connection. A write whose connection was lost at its commit may have been stored."""

    code = "database_unavailable"


class InsufficientStorage(FacegateError):
    """The database's disk is full (PostgreSQL's, or the SQLite file's volume): the transaction was rolled back."""

    code = "insufficient_storage"


class ShuttingDown(FacegateError):
    """The server is stopping: a request cut at the end of the shutdown timeout, or a write refused after it."""

    code = "shutting_down"
