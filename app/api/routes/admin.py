"""Operator views of a worker's state (admin scope)."""

from __future__ import annotations

import os

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api import responses
from app.api.auth import require
from app.api.deps import GalleryDep
from app.api.head import HeadRoute
from app.api.schemas import IndexStateResponse
from app.auth import Scope

router = APIRouter(prefix="/admin", tags=["admin"], route_class=HeadRoute)


@router.get(
    "/index",
    response_model=IndexStateResponse,
    responses=responses.errors(),
    dependencies=[require(Scope.admin)],
    summary="This worker's search index after replaying the change log: counts, replay position, face-id digest",
)
async def index_state(gallery: GalleryDep) -> IndexStateResponse:
    state = await run_in_threadpool(gallery.index_state)
    stats = state.stats
    return IndexStateResponse(
        pid=os.getpid(),
        model_version=stats.model_version,
        size=stats.size,
        identities=stats.identities,
        stale=stats.stale,
        last_change_id=stats.last_change_id,
        face_ids_sha256=state.face_ids_sha256,
    )
