"""POST /verify: 1:1, a photo against an enrolled identity, or a photo against another photo."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api import responses
from app.api.auth import require
from app.api.deps import MetricsDep, ServiceDep, form_fields
from app.api.forms import FormRoute
from app.api.routes.common import face_out, read_photo
from app.api.schemas import ID_MAX_LENGTH, THRESHOLD_MAX, VerifyIdentityResponse, VerifyPhotosResponse
from app.auth import Scope
from app.errors import InvalidRequest
from app.service import FacePolicy, VerifyResult

router = APIRouter(tags=["verify"], route_class=FormRoute)

VERIFY_FIELDS = ("image", "identity_id", "image_a", "image_b", "threshold", "face")


@router.post(
    "/verify",
    response_model=VerifyIdentityResponse | VerifyPhotosResponse,
    responses=responses.errors(409, *responses.PHOTO),
    dependencies=[require(Scope.read), Depends(form_fields(*VERIFY_FIELDS))],
    summary="Is this the same person? image + identity_id, or image_a + image_b",
    description=(
        "Send either `image` and `identity_id` (compared with the identity's nearest enrolled face) or `image_a` "
        "and `image_b` (photo against photo, nothing stored). `match` is distance <= threshold (squared L2)."
    ),
)
async def verify(
    request: Request,
    service: ServiceDep,
    metrics: MetricsDep,
    image: Annotated[UploadFile | None, File(description="Photo to check against `identity_id`.")] = None,
    identity_id: Annotated[str | None, Form(max_length=ID_MAX_LENGTH)] = None,
    image_a: Annotated[UploadFile | None, File(description="First photo (photo-vs-photo mode).")] = None,
    image_b: Annotated[UploadFile | None, File(description="Second photo (photo-vs-photo mode).")] = None,
    threshold: Annotated[
        float | None,
        Form(
            gt=0.0,
            allow_inf_nan=False,
            le=THRESHOLD_MAX,
            description="Override the deployment threshold. Lower: fewer false accepts, more false rejects.",
        ),
    ] = None,
    face: Annotated[FacePolicy, Form(description="single or largest (photos with several faces).")] = FacePolicy.single,
) -> VerifyIdentityResponse | VerifyPhotosResponse:
    by_identity = image is not None or identity_id is not None
    by_photos = image_a is not None or image_b is not None
    if (
        by_identity == by_photos
        or (by_identity and (image is None or identity_id is None))
        or (by_photos and (image_a is None or image_b is None))
    ):
        raise InvalidRequest(
            "send either image + identity_id, or image_a + image_b",
            received=sorted(
                k
                for k, v in {"image": image, "identity_id": identity_id, "image_a": image_a, "image_b": image_b}.items()
                if v is not None
            ),
        )
    if by_identity:
        assert image is not None and identity_id is not None
        photo = await read_photo(image, "image")
        result = await run_in_threadpool(service.verify_identity, photo, identity_id, threshold=threshold, face=face)
        _observe(request, metrics, result)
        assert result.identity_id is not None and result.nearest_face_id is not None
        return VerifyIdentityResponse(
            match=result.match,
            distance=result.distance,
            threshold=result.threshold.value,
            threshold_source=result.threshold.source,
            far_estimate=result.far_estimate,
            identity_id=result.identity_id,
            nearest_face_id=result.nearest_face_id,
            face=face_out(result.face),
        )
    assert image_a is not None and image_b is not None
    photo_a = await read_photo(image_a, "image_a")
    photo_b = await read_photo(image_b, "image_b")
    result = await run_in_threadpool(service.verify_photos, photo_a, photo_b, threshold=threshold, face=face)
    _observe(request, metrics, result)
    assert result.other_face is not None
    return VerifyPhotosResponse(
        match=result.match,
        distance=result.distance,
        threshold=result.threshold.value,
        threshold_source=result.threshold.source,
        far_estimate=result.far_estimate,
        face_a=face_out(result.face),
        face_b=face_out(result.other_face),
    )


def _observe(request: Request, metrics: MetricsDep, result: VerifyResult) -> None:
    decision = "match" if result.match else "no_match"
    request.state.decision = decision  # for the access log
    metrics.observe_decision("verify", decision, result.distance)
