"""Calibration (admin): choose the 1:1 threshold for a target false-accept rate, and see where the active one came from.

`POST /calibrate` computes the threshold from the gallery's own identities with >= 2 faces, or from distances of
labelled pairs the client computed (`facegate eval`); with `apply` it becomes the deployment threshold, stored in
the gallery database. `GET /calibration` shows the active threshold, the stored calibration and the table shipped
with the model. `DELETE /calibration` goes back to FACEGATE_THRESHOLD. These change every later decision: once API
keys exist (issue 6), only admin keys may call them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from app.api import responses
from app.api.auth import require
from app.api.deps import ServiceDep, json_fields
from app.api.head import HeadRoute
from app.api.schemas import (
    CalibrateRequest,
    CalibrateResponse,
    CalibrationCurveResponse,
    CalibrationReset,
    CalibrationResponse,
    CalibrationRow,
    DefaultTableOut,
    DeploymentCalibrationOut,
)
from app.auth import Scope
from app.matching.calibration import CalibrationTable
from app.service import CurveSource

router = APIRouter(tags=["admin"], route_class=HeadRoute)


@router.post(
    "/calibrate",
    response_model=CalibrateResponse,
    responses=responses.errors(409, *responses.BODY, *responses.WRITE),
    dependencies=[require(Scope.admin), Depends(json_fields)],
    summary="Threshold for a target false-accept rate (from the gallery or from labelled distances); apply to store it",
)
async def calibrate(service: ServiceDep, body: CalibrateRequest) -> CalibrateResponse:
    result = await run_in_threadpool(
        service.calibrate,
        body.source,
        target_far=body.target_far,
        same=body.same,
        different=body.different,
        apply=body.apply,
    )
    c = result.calibration
    return CalibrateResponse(
        threshold=c.threshold,
        target_far=c.target_far,
        far=c.far,
        far_interval=c.far_interval,
        val=c.val,
        val_interval=c.val_interval,
        confidence=c.confidence,
        n_pairs=result.n_pairs,
        n_same=c.n_same,
        n_different=c.n_different,
        n_identities=result.n_identities,
        source=result.source,
        applied=result.applied,
        computed_at=result.computed_at,
        model_version=result.model_version,
    )


@router.get(
    "/calibration",
    response_model=CalibrationResponse,
    responses=responses.errors(),
    dependencies=[require(Scope.read)],
    summary="The active threshold, where it came from, and the shipped calibration table",
)
async def calibration(service: ServiceDep) -> CalibrationResponse:
    status = await run_in_threadpool(service.calibration_status)
    table = status.table
    record = status.deployment
    return CalibrationResponse(
        threshold=status.threshold.value,
        threshold_source=status.threshold.source,
        far_estimate=status.far_estimate,
        deployment=DeploymentCalibrationOut(
            value=record.value if isinstance(record.value, dict) else {"threshold": record.value},
            source=record.source,
            updated_at=record.updated_at,
        )
        if record is not None
        else None,
        default_table=DefaultTableOut(
            model_version=table.model_version,
            source=table.source,
            n_same=table.n_same,
            n_different=table.n_different,
            n_missing=table.n_missing,
            rows=_rows(table),
        )
        if table is not None
        else None,
    )


@router.delete(
    "/calibration",
    response_model=CalibrationReset,
    responses=responses.errors(*responses.WRITE),
    dependencies=[require(Scope.admin)],
    summary="Forget the stored deployment threshold (back to FACEGATE_THRESHOLD)",
)
async def reset_calibration(service: ServiceDep) -> CalibrationReset:
    removed = await run_in_threadpool(service.reset_calibration)
    threshold = await run_in_threadpool(service.resolve_threshold)
    return CalibrationReset(removed=removed, threshold=threshold.value, threshold_source=threshold.source)


@router.get(
    "/calibration/curve",
    response_model=CalibrationCurveResponse,
    responses=responses.errors(409),
    dependencies=[require(Scope.read)],
    summary="FAR and VAL at every threshold (shipped table or the gallery's own pairs), to choose a threshold",
)
async def calibration_curve(
    service: ServiceDep,
    source: Annotated[
        CurveSource,
        Query(description="shipped: the table shipped with the model; gallery: measured on the gallery's identities "
              "with >= 2 faces (409 insufficient_data without two such identities)."),
    ] = CurveSource.shipped,
) -> CalibrationCurveResponse:
    curve = await run_in_threadpool(service.calibration_curve, source)
    table = curve.table
    return CalibrationCurveResponse(
        source=curve.source,
        description=table.source,
        model_version=table.model_version,
        n_same=table.n_same,
        n_different=table.n_different,
        n_identities=curve.n_identities,
        rows=_rows(table),
        threshold=curve.threshold.value,
        threshold_source=curve.threshold.source,
    )


def _rows(table: CalibrationTable) -> list[CalibrationRow]:
    """A calibration table's FAR, its upper bound and VAL at each threshold."""
    return [
        CalibrationRow(threshold=float(t), far=float(f), val=float(v), far_upper=float(u))
        for t, f, v, u in zip(table.thresholds, table.far, table.val, table.far_upper, strict=True)
    ]
