"""Identities: list, read, rename / re-describe, delete (really), add and delete faces."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Query, Response, UploadFile, status
from starlette.concurrency import run_in_threadpool

from app.api import responses
from app.api.auth import require
from app.api.deps import MetricsDep, ServiceDep, form_fields, json_fields
from app.api.forms import FormRoute
from app.api.routes.common import ALREADY_ENROLLED, enroll_response, identity_public, read_photo
from app.api.schemas import (
    ID_MAX_LENGTH,
    NAME_MAX_LENGTH,
    DeletionResponse,
    EnrollResponse,
    IdentityPage,
    IdentityPublic,
    IdentityUpdate,
)
from app.auth import Scope
from app.gallery import DeletionReport
from app.service import FacePolicy

router = APIRouter(prefix="/identities", tags=["identities"], route_class=FormRoute)

IdentityId = Annotated[str, Path(max_length=ID_MAX_LENGTH, description="Identity id (32 hex characters).")]
FaceId = Annotated[str, Path(max_length=ID_MAX_LENGTH, description="Face id (32 hex characters).")]


@router.get(
    "",
    response_model=IdentityPage,
    responses=responses.errors(),
    dependencies=[require(Scope.read)],
    summary="List identities (paged)",
)
async def list_identities(
    service: ServiceDep,
    offset: Annotated[
        int, Query(ge=0, le=10_000_000, description="Identities to skip (in a large gallery, page with `after`).")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    after: Annotated[
        str | None,
        Query(
            max_length=64,
            description="Start after the page that gave this cursor (its `next`): pages neither skip nor repeat an "
            "identity when others are added or deleted meanwhile, and a page deep in a large gallery is as fast as "
            "the first. Not with offset.",
        ),
    ] = None,
    name: Annotated[
        str | None,
        Query(
            max_length=NAME_MAX_LENGTH,
            description="Only names containing this, ignoring case in every script; % and _ are plain characters.",
        ),
    ] = None,
) -> IdentityPage:
    page = await run_in_threadpool(service.list_identities, offset=offset, limit=limit, name=name, after=after)
    version = service.pipeline.model_version
    return IdentityPage(
        items=[identity_public(i, version) for i in page.items],
        total=page.total,
        start=page.start,
        offset=page.offset,
        limit=page.limit,
        next=page.next,
    )


@router.get(
    "/{identity_id}",
    response_model=IdentityPublic,
    responses=responses.errors(404),
    dependencies=[require(Scope.read)],
    summary="One identity with its faces",
)
async def get_identity(service: ServiceDep, identity_id: IdentityId) -> IdentityPublic:
    identity = await run_in_threadpool(service.get_identity, identity_id)
    return identity_public(identity, service.pipeline.model_version, with_faces=True)


@router.patch(
    "/{identity_id}",
    response_model=IdentityPublic,
    responses=responses.errors(404, *responses.BODY, *responses.WRITE),
    dependencies=[require(Scope.write), Depends(json_fields)],
    summary="Rename and/or replace the metadata (JSON body)",
)
async def update_identity(service: ServiceDep, identity_id: IdentityId, body: IdentityUpdate) -> IdentityPublic:
    identity = await run_in_threadpool(service.update_identity, identity_id, name=body.name, metadata=body.metadata)
    return identity_public(identity, service.pipeline.model_version, with_faces=True)


@router.delete(
    "/{identity_id}",
    response_model=DeletionResponse,
    responses=responses.errors(404, *responses.WRITE),
    dependencies=[require(Scope.write)],
    summary="Delete the identity and every face (embeddings are removed from the database and the index)",
)
async def delete_identity(service: ServiceDep, identity_id: IdentityId) -> DeletionResponse:
    report = await run_in_threadpool(service.delete_identity, identity_id)
    return _deletion(report)


@router.post(
    "/{identity_id}/faces",
    status_code=status.HTTP_201_CREATED,
    response_model=EnrollResponse,
    responses={**ALREADY_ENROLLED, **responses.errors(*responses.PHOTO, *responses.WRITE)},
    dependencies=[require(Scope.write), Depends(form_fields("image", "face", "allow_low_quality"))],
    summary="Add a face to the identity",
)
async def add_face(
    service: ServiceDep,
    metrics: MetricsDep,
    response: Response,
    identity_id: IdentityId,
    image: Annotated[UploadFile, File(description="The photo with the identity's face.")],
    face: Annotated[FacePolicy, Form(description="single or largest (photos with several faces).")] = FacePolicy.single,
    allow_low_quality: Annotated[
        bool, Form(description="Add the face even if it fails a quality limit (else 422 low_quality).")
    ] = False,
) -> EnrollResponse:
    photo = await read_photo(image, "image")
    result = await run_in_threadpool(
        service.add_face, identity_id, photo, face=face, allow_low_quality=allow_low_quality
    )
    return enroll_response(result, response, metrics)


@router.delete(
    "/{identity_id}/faces/{face_id}",
    response_model=DeletionResponse,
    responses=responses.errors(404, *responses.WRITE),
    dependencies=[require(Scope.write)],
    summary="Delete one face (the identity stays, even with no face left)",
)
async def delete_face(service: ServiceDep, identity_id: IdentityId, face_id: FaceId) -> DeletionResponse:
    report = await run_in_threadpool(service.delete_face, identity_id, face_id)
    return _deletion(report)


@router.get(
    "/{identity_id}/faces/{face_id}/image",
    response_class=Response,
    responses={
        200: {"content": {"image/*": {}}, "description": "The photo as it was uploaded at enrolment."},
        **responses.errors(404),
    },
    dependencies=[require(Scope.admin)],
    summary="The photo a face was enrolled from (only kept with FACEGATE_STORE_IMAGES=true; admin scope)",
)
async def face_image(service: ServiceDep, identity_id: IdentityId, face_id: FaceId) -> Response:
    photo, media_type = await run_in_threadpool(service.face_photo, identity_id, face_id)
    # A photo of a person: never cached on the way, never re-typed by a browser.
    return Response(
        photo,
        media_type=media_type,
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


def _deletion(report: DeletionReport) -> DeletionResponse:
    return DeletionResponse(
        identity_id=report.identity_id,
        identity_deleted=report.identity_deleted,
        deleted_face_ids=list(report.face_ids),
    )
