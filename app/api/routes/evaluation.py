"""POST /evaluate/identify (admin): how well 1:N identification keeps strangers out, measured on the live gallery.

The same protocol and figures as `facegate eval-identify --images DIR`, run on the stored embeddings instead of a
folder of photos, so an operator can see DIR/FNIR at FPIR 1 %, 5 %, 10 % on their own people.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api import responses
from app.api.auth import require
from app.api.deps import ServiceDep
from app.api.head import HeadRoute
from app.api.schemas import IdentifyDefaultPointOut, IdentifyEvaluationResponse, RuleDirOut
from app.auth import Scope

router = APIRouter(tags=["admin"], route_class=HeadRoute)


@router.post(
    "/evaluate/identify",
    response_model=IdentifyEvaluationResponse,
    responses=responses.errors(409),
    dependencies=[require(Scope.admin)],
    summary="DIR/FNIR at FPIR 1 %, 5 %, 10 % of the raw, ratio and facegate rules on the gallery's own faces",
)
async def evaluate_identify(service: ServiceDep) -> IdentifyEvaluationResponse:
    result = await run_in_threadpool(service.evaluate_identification)
    r = result.report
    p = r.default_point
    return IdentifyEvaluationResponse(
        model_version=result.model_version,
        n_identities=result.n_identities,
        n_faces=result.n_faces,
        n_enrolled=r.n_enrolled,
        n_probes=r.n_probes,
        n_strangers=r.n_strangers,
        rank1=r.rank1,
        rules=[
            RuleDirOut(rule=rule, dir_at_fpir=table)
            for rule, table in r.dir_at_fpir.items()
        ],
        default=IdentifyDefaultPointOut(
            target_fpir=p["target_fpir"],
            gallery_size=p["gallery_size"],
            fpir=p["fpir"],
            fpir_interval=result.fpir_interval,
            dir=p["dir"],
            fnir=p["fnir"],
            probe_reasons=p["probe_reasons"],
            stranger_reasons=p["stranger_reasons"],
        ),
        raw_threshold_point=r.raw_threshold_point,
    )
