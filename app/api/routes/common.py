"""Shapes shared by the routes: service dataclasses -> public response models, and reading uploads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Form, Response, UploadFile, status

from app.api.errors import error_object, shorten
from app.api.metrics import Metrics
from app.api.schemas import (
    THRESHOLD_MAX,
    TOP_K_MAX,
    BoxOut,
    CandidateOut,
    EnrollResponse,
    ErrorBody,
    FaceOut,
    FacePublic,
    IdentifiedFaceOut,
    IdentifyResponse,
    IdentityPublic,
    QualityIssueOut,
    QualityOut,
)
from app.errors import FacegateError, InvalidImage
from app.gallery import FaceRecord, IdentityRecord
from app.service import Candidate, EnrollResult, FoundFace, IdentifyResult
from app.vision.types import Box

T = TypeVar("T")

# Threads that may run the many-photo routes' work at once (per worker process). Each such request holds its thread
# for as long as its photos take (seconds to minutes); on the shared thread pool (anyio's 40 tokens) enough of them
# left every other request of the worker - the API-key check, /readyz, /metrics with several workers - queued
# behind them: /readyz took 18 s under 50 clients of /embed, past the image's 4 s health-check timeout.
BULK_THREADS = anyio.CapacityLimiter(8)


async def run_bulk(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`run_in_threadpool` for the many-photo routes (/embed, /identify/batch, /cluster): on threads of their own."""
    return await anyio.to_thread.run_sync(lambda: function(*args, **kwargs), limiter=BULK_THREADS)


# Form fields /identify and /identify/batch share.
TopKForm = Annotated[int, Form(ge=1, le=TOP_K_MAX, description="Candidates returned per face (identities).")]
IdentifyThresholdForm = Annotated[
    float | None,
    Form(
        gt=0.0,
        allow_inf_nan=False,  # NaN compares false with both limits: say what is wrong with it
        le=THRESHOLD_MAX,
        description="Largest distance at which anyone is named (default: the deployment threshold). Lower: fewer "
        "strangers taken for someone enrolled, more enrolled people answered unknown.",
    ),
]


async def read_photo(upload: UploadFile, field: str) -> bytes:
    data = await upload.read()
    if not data:
        raise InvalidImage(f"{field} is empty", field=field)
    return data


async def read_photos(uploads: list[UploadFile]) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each upload of a many-photo request. An empty one is not refused here: it becomes that
    photo's own invalid_image error. The name is only echoed, cut short like any client text in a reply."""
    photos = []
    for i, upload in enumerate(uploads):
        photos.append((shorten(upload.filename or f"image-{i}"), await upload.read()))
        await upload.close()  # its in-memory copy of the bytes (a third copy of the body with the request's cache)
    return photos


def error_out(error: FacegateError) -> ErrorBody:
    """A photo's own error inside a many-photo reply (the same object as an error response's `error`)."""
    return ErrorBody(**error_object(error))


def box_out(box: Box) -> BoxOut:
    return BoxOut(left=box.left, top=box.top, right=box.right, bottom=box.bottom)


def quality_out(face: FoundFace) -> QualityOut | None:
    if face.quality is None:
        return None
    return QualityOut(
        **face.quality.as_dict(),
        issues=[QualityIssueOut(issue=i.issue.value, measured=i.measured, limit=i.limit) for i in face.quality_issues],
    )


def face_out(face: FoundFace) -> FaceOut:
    return FaceOut(
        box=box_out(face.box), score=face.score, quality=quality_out(face), landmarks=list(face.landmarks)
    )


def candidate_out(c: Candidate) -> CandidateOut:
    return CandidateOut(identity_id=c.identity_id, name=c.name, face_id=c.face_id, distance=c.distance)


def face_public(face: FaceRecord, model_version: str) -> FacePublic:
    return FacePublic(
        id=face.id,
        model_version=face.model_version,
        created_at=face.created_at,
        box=box_out(face.box),
        score=face.detector_score,
        stale=face.model_version != model_version,
    )


def identity_public(identity: IdentityRecord, model_version: str, *, with_faces: bool = False) -> IdentityPublic:
    return IdentityPublic(
        id=identity.id,
        name=identity.name,
        metadata=identity.metadata,
        created_at=identity.created_at,
        updated_at=identity.updated_at,
        face_count=identity.face_count,
        faces=[face_public(f, model_version) for f in identity.faces] if with_faces else None,
    )


# OpenAPI's word on the 200 of /enroll and POST /identities/{id}/faces (their usual answer is 201).
ALREADY_ENROLLED: dict[int | str, dict[str, Any]] = {
    200: {
        "model": EnrollResponse,
        "description": "The identity already had this face (the same photo: a retried request whose answer was "
        "lost); nothing was stored, `already_enrolled` is true and `face_id` is that face's.",
    }
}


def enroll_response(result: EnrollResult, response: Response, metrics: Metrics) -> EnrollResponse:
    """The reply to /enroll and POST /identities/{id}/faces: the same shape for a new and an added face. A face the
    identity already had stored nothing: 200 instead of 201, and no enrolment counted."""
    if result.already_enrolled:
        response.status_code = status.HTTP_200_OK
    else:
        metrics.enrolments.inc()
    return EnrollResponse(
        identity_id=result.identity_id,
        face_id=result.face_id,
        name=result.name,
        created=result.created,
        face=face_out(result.face),
        model_version=result.model_version,
        possible_duplicate=candidate_out(result.possible_duplicate) if result.possible_duplicate else None,
        already_enrolled=result.already_enrolled,
    )


def observe_identify(metrics: Metrics, result: IdentifyResult) -> list[str]:
    """Count each face's outcome (match, unknown, ambiguous) and nearest distance in the metrics; the outcomes."""
    outcomes = []
    for face in result.faces:
        outcome = "match" if face.match is not None else face.reason.value
        metrics.observe_decision("identify", outcome, face.candidates[0].distance if face.candidates else None)
        outcomes.append(outcome)
    return outcomes


def identify_response(result: IdentifyResult) -> IdentifyResponse:
    """The reply to /identify, and each photo's result in /identify/batch."""
    return IdentifyResponse(
        faces=[
            IdentifiedFaceOut(
                face=face_out(f.face),
                match=candidate_out(f.match) if f.match is not None else None,
                reason=f.reason.value,
                candidates=[candidate_out(c) for c in f.candidates],
                margin=f.margin,
                ambiguous=f.ambiguous,
                fpir_estimate=f.fpir_estimate,
                ratio=f.ratio,
                score=f.score,
                score_threshold=f.score_threshold,
                accept_distance=f.accept_distance,
            )
            for f in result.faces
        ],
        threshold=result.threshold.value,
        threshold_source=result.threshold.source,
        target_fpir=result.target_fpir,
        far_estimate=result.far_estimate,
        gallery_size=result.gallery_size,
        identities=result.identities,
        faces_detected=result.faces_detected,
    )
