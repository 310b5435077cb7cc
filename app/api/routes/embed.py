"""POST /embed: every face of many photos with its 128-d embedding (bulk jobs, photo libraries; nothing is stored)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, UploadFile

from app.api import responses
from app.api.auth import require
from app.api.deps import ServiceDep, form_fields
from app.api.forms import FormRoute
from app.api.routes.common import error_out, face_out, read_photos, run_bulk
from app.api.schemas import EmbeddedFaceOut, EmbedPhotoOut, EmbedResponse
from app.auth import Scope
from app.errors import FacegateError

router = APIRouter(tags=["embed"], route_class=FormRoute)


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=responses.errors(*responses.BODY),
    dependencies=[require(Scope.read), Depends(form_fields("images", repeatable=("images",)))],
    summary="Every face of several photos with its embedding (a bad photo gets its error, the others their faces)",
    description=(
        "Send the photos as repeated `images` fields (at most FACEGATE_BATCH__MAX_IMAGES; the whole body under "
        "FACEGATE_IMAGE__MAX_UPLOAD_BYTES). Each photo gets its faces (box, detector score, quality, landmarks and "
        "the 128-d embedding) or an `error` (invalid_image, unsupported_image, image_too_large, image_too_small, "
        "no_face; request_too_large once the photos before it decoded FACEGATE_IMAGE__MAX_REQUEST_PIXELS) without "
        "failing the others. The faces of all the photos are embedded together. Embeddings are "
        "biometric data: this is the only response that carries them."
    ),
)
async def embed(
    service: ServiceDep,
    images: Annotated[list[UploadFile], File(description="The photos (repeat the field).")],
) -> EmbedResponse:
    photos = await read_photos(images)
    results = await run_bulk(service.embed_photos, [data for _, data in photos])
    out = []
    for index, ((filename, _), result) in enumerate(zip(photos, results, strict=True)):
        if isinstance(result, FacegateError):
            out.append(EmbedPhotoOut(index=index, filename=filename, error=error_out(result)))
            continue
        faces = [EmbeddedFaceOut(**face_out(f.face).model_dump(), embedding=list(f.embedding)) for f in result.faces]
        out.append(
            EmbedPhotoOut(
                index=index,
                filename=filename,
                faces=faces,
                model_version=result.model_version,
                faces_detected=result.faces_detected,
            )
        )
    return EmbedResponse(
        model_version=service.pipeline.model_version,
        n_images=len(out),
        n_faces=sum(len(p.faces or ()) for p in out),
        n_errors=sum(p.error is not None for p in out),
        images=out,
    )
