"""POST /enroll: one photo is enough to enrol a person; enrolling again to an identity adds a face."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Response, UploadFile, status
from starlette.concurrency import run_in_threadpool

from app.api import responses
from app.api.auth import require
from app.api.deps import MetricsDep, ServiceDep, form_fields, parse_metadata
from app.api.forms import FormRoute
from app.api.routes.common import ALREADY_ENROLLED, enroll_response, read_photo
from app.api.schemas import ID_MAX_LENGTH, METADATA_FORM_MAX_LENGTH, NAME_MAX_LENGTH, EnrollResponse
from app.auth import Scope
from app.service import FacePolicy

router = APIRouter(tags=["enrol"], route_class=FormRoute)

ENROLL_FIELDS = ("image", "name", "identity_id", "metadata", "face", "allow_low_quality", "allow_duplicate")


@router.post(
    "/enroll",
    status_code=status.HTTP_201_CREATED,
    response_model=EnrollResponse,
    responses={**ALREADY_ENROLLED, **responses.errors(409, *responses.PHOTO, *responses.WRITE)},
    dependencies=[require(Scope.write), Depends(form_fields(*ENROLL_FIELDS))],
    summary="Enrol a face: a new identity (name) or one more face of an identity (identity_id)",
)
async def enroll(
    service: ServiceDep,
    metrics: MetricsDep,
    response: Response,
    image: Annotated[UploadFile, File(description="The photo (JPEG, PNG, WebP, ...). One face, or see `face`.")],
    name: Annotated[
        str | None, Form(min_length=1, max_length=NAME_MAX_LENGTH, description="Name of a NEW identity.")
    ] = None,
    identity_id: Annotated[
        str | None, Form(max_length=ID_MAX_LENGTH, description="Add the face to this existing identity instead.")
    ] = None,
    metadata: Annotated[
        str | None, Form(max_length=METADATA_FORM_MAX_LENGTH, description="JSON object stored with a new identity.")
    ] = None,
    face: Annotated[
        FacePolicy,
        Form(description="single: refuse photos with several faces (422 multiple_faces); largest: take the largest."),
    ] = FacePolicy.single,
    allow_low_quality: Annotated[
        bool,
        Form(
            description="Enrol even if the face fails a quality limit (too small, blurred, too dark/bright, cut off, "
            "...); without it such a face is refused with 422 low_quality listing each reason."
        ),
    ] = False,
    allow_duplicate: Annotated[
        bool,
        Form(
            description="Create the new identity even if its face already matches an enrolled identity within the "
            "threshold; without it that is refused with 409 possible_duplicate naming the identity."
        ),
    ] = False,
) -> EnrollResponse:
    photo = await read_photo(image, "image")
    meta = parse_metadata(metadata)
    result = await run_in_threadpool(
        service.enroll,
        photo,
        name=name,
        identity_id=identity_id,
        metadata=meta,
        face=face,
        allow_low_quality=allow_low_quality,
        allow_duplicate=allow_duplicate,
    )
    return enroll_response(result, response, metrics)
