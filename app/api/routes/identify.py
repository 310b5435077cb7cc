"""POST /identify: open-set 1:N search for every face of a photo."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api import responses
from app.api.deps import MetricsDep, ServiceDep, form_fields
from app.api.routes.common import candidate_out, face_out, read_photo
from app.api.schemas import THRESHOLD_MAX, TOP_K_MAX, IdentifiedFaceOut, IdentifyResponse

router = APIRouter(tags=["identify"])


@router.post(
    "/identify",
    response_model=IdentifyResponse,
    responses=responses.errors(*responses.PHOTO),
    dependencies=[Depends(form_fields("image", "top_k", "threshold"))],
    summary="Who is in this photo? Candidates per face, and a match only under the threshold",
)
async def identify(
    service: ServiceDep,
    metrics: MetricsDep,
    image: Annotated[UploadFile, File(description="The photo; every face in it is searched.")],
    top_k: Annotated[int, Form(ge=1, le=TOP_K_MAX, description="Candidates returned per face (identities).")] = 5,
    threshold: Annotated[
        float | None,
        Form(
            gt=0.0,
            le=THRESHOLD_MAX,
            description="Largest distance at which anyone is named (default: the deployment threshold). Lower: "
            "fewer strangers taken for someone enrolled, more enrolled people answered unknown.",
        ),
    ] = None,
) -> IdentifyResponse:
    photo = await read_photo(image, "image")
    result = await run_in_threadpool(service.identify, photo, top_k=top_k, threshold=threshold)
    for face in result.faces:
        outcome = "match" if face.match is not None else face.reason.value
        metrics.observe_decision("identify", outcome, face.candidates[0].distance if face.candidates else None)
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
            )
            for f in result.faces
        ],
        threshold=result.threshold.value,
        threshold_source=result.threshold.source,
        target_fpir=result.target_fpir,
        far_estimate=result.far_estimate,
        gallery_size=result.gallery_size,
        identities=result.identities,
    )
