"""POST /identify/batch: /identify for many photos in one request, a result or an error per photo."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from fastapi import APIRouter, Depends, File, Request, UploadFile

from app.api import responses
from app.api.auth import require
from app.api.deps import MetricsDep, ServiceDep, form_fields
from app.api.forms import FormRoute
from app.api.routes.common import (
    IdentifyThresholdForm,
    TopKForm,
    error_out,
    identify_response,
    observe_identify,
    read_photos,
    run_bulk,
)
from app.api.schemas import IdentifyBatchResponse, IdentifyPhotoOut
from app.auth import Scope
from app.errors import FacegateError

router = APIRouter(tags=["identify"], route_class=FormRoute)


@router.post(
    "/identify/batch",
    response_model=IdentifyBatchResponse,
    responses=responses.errors(*responses.BODY),
    dependencies=[
        require(Scope.read),
        Depends(form_fields("images", "top_k", "threshold", repeatable=("images",))),
    ],
    summary="Who is in each of these photos? Per photo what /identify answers, or its error",
    description=(
        "Send the photos as repeated `images` fields (at most FACEGATE_BATCH__MAX_IMAGES; the whole body under "
        "FACEGATE_IMAGE__MAX_UPLOAD_BYTES). `top_k` and `threshold` apply to every photo. Each photo gets the result "
        "/identify gives for it alone, or an `error` (invalid_image, unsupported_image, image_too_large, "
        "image_too_small, no_face; request_too_large once the photos before it decoded "
        "FACEGATE_IMAGE__MAX_REQUEST_PIXELS) without failing the others."
    ),
)
async def identify_batch(
    request: Request,
    service: ServiceDep,
    metrics: MetricsDep,
    images: Annotated[list[UploadFile], File(description="The photos (repeat the field).")],
    top_k: TopKForm = 5,
    threshold: IdentifyThresholdForm = None,
) -> IdentifyBatchResponse:
    photos = await read_photos(images)
    results = await run_bulk(
        service.identify_photos, [data for _, data in photos], top_k=top_k, threshold=threshold
    )
    out = []
    outcomes: Counter[str] = Counter()
    for index, ((filename, _), result) in enumerate(zip(photos, results, strict=True)):
        if isinstance(result, FacegateError):
            outcomes["error"] += 1
            out.append(IdentifyPhotoOut(index=index, filename=filename, error=error_out(result)))
            continue
        outcomes.update(observe_identify(metrics, result))
        out.append(IdentifyPhotoOut(index=index, filename=filename, result=identify_response(result)))
    # For the access log: the faces' outcomes counted (a list per face, as /identify logs, could run to thousands).
    request.state.decision = ",".join(f"{outcome}:{n}" for outcome, n in sorted(outcomes.items()))
    return IdentifyBatchResponse(
        n_images=len(out), n_errors=sum(p.error is not None for p in out), images=out
    )
