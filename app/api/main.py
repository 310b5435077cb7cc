"""Assembles the API: one router per resource."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.routes import (
    admin,
    calibration,
    cluster,
    embed,
    enroll,
    evaluation,
    health,
    identify,
    identify_batch,
    identities,
    ui,
    verify,
)

api_router = APIRouter()
for module in (
    enroll, verify, identify, identify_batch, embed, identities, cluster, calibration, evaluation, health, ui, admin
):
    api_router.include_router(module.router)
