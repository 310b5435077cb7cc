"""POST /cluster: group the faces of several photos by person (nothing is stored)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile

from app.api import responses
from app.api.auth import require
from app.api.deps import ServiceDep, form_fields
from app.api.forms import FormRoute
from app.api.routes.common import box_out, read_photos, run_bulk
from app.api.schemas import (
    THRESHOLD_MAX,
    ClusterFaceOut,
    ClusterOut,
    ClusterResponse,
    PhotoProblemOut,
)
from app.auth import Scope
from app.grouping import ClusterMember

router = APIRouter(tags=["cluster"], route_class=FormRoute)


@router.post(
    "/cluster",
    response_model=ClusterResponse,
    responses=responses.errors(*responses.BODY),
    dependencies=[require(Scope.read), Depends(form_fields("images", "threshold", repeatable=("images",)))],
    summary="Group the faces of several photos by person (chinese whispers over distance <= threshold)",
    description=(
        "Send the photos as repeated `images` fields (at most FACEGATE_CLUSTER__MAX_PHOTOS, and the whole body under "
        "FACEGATE_IMAGE__MAX_UPLOAD_BYTES). Every face of every photo takes part. A photo that cannot be used (not "
        "an image, no face, or past the pixels the request's photos may decode together: "
        "FACEGATE_IMAGE__MAX_REQUEST_PIXELS, request_too_large) is listed in `problems`, not refused."
    ),
)
async def cluster(
    service: ServiceDep,
    images: Annotated[list[UploadFile], File(description="The photos (repeat the field).")],
    threshold: Annotated[
        float | None,
        Form(
            gt=0.0,
            allow_inf_nan=False,
            le=THRESHOLD_MAX,
            description="Faces within this squared distance are linked (default FACEGATE_CLUSTER__THRESHOLD, 0.25: "
            "stricter than the 1:1 threshold, as clusters grow along chains of links). Lower: purer clusters and "
            "more faces left unclustered; higher: fewer, larger clusters that may merge people.",
        ),
    ] = None,
) -> ClusterResponse:
    photos = await read_photos(images)  # an empty one is listed in problems like any other unusable photo
    result = await run_bulk(service.cluster, photos, threshold=threshold)
    report = result.report
    return ClusterResponse(
        threshold=result.threshold.value,
        threshold_source=result.threshold.source,
        n_photos=report.n_photos,
        n_faces=report.n_faces,
        clusters=[ClusterOut(size=len(c), members=[_member(m) for m in c]) for c in report.clusters],
        sizes=report.sizes,
        unclustered=[_member(m) for m in report.unclustered],
        problems=[
            PhotoProblemOut(photo=p.photo, photo_index=p.photo_index, code=p.code, message=p.message)
            for p in report.problems
        ],
    )


def _member(m: ClusterMember) -> ClusterFaceOut:
    return ClusterFaceOut(photo=m.photo, photo_index=m.photo_index, box=box_out(m.box), score=m.score)
