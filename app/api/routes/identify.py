"""POST /identify: open-set 1:N search for every face of a photo."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api import responses
from app.api.auth import require
from app.api.deps import MetricsDep, ServiceDep, form_fields
from app.api.forms import FormRoute
from app.api.routes.common import IdentifyThresholdForm, TopKForm, identify_response, observe_identify, read_photo
from app.api.schemas import IdentifyResponse
from app.auth import Scope

router = APIRouter(tags=["identify"], route_class=FormRoute)


@router.post(
    "/identify",
    response_model=IdentifyResponse,
    responses=responses.errors(*responses.PHOTO),
    dependencies=[require(Scope.read), Depends(form_fields("image", "top_k", "threshold"))],
    summary="Who is in this photo? Candidates per face, and a match only under the threshold",
)
async def identify(
    request: Request,
    service: ServiceDep,
    metrics: MetricsDep,
    image: Annotated[UploadFile, File(description="The photo; every face in it is searched.")],
    top_k: TopKForm = 5,
    threshold: IdentifyThresholdForm = None,
) -> IdentifyResponse:
    photo = await read_photo(image, "image")
    result = await run_in_threadpool(service.identify, photo, top_k=top_k, threshold=threshold)
    # for the access log: each face's outcome, never a name
    request.state.decision = ",".join(observe_identify(metrics, result))
    return identify_response(result)
