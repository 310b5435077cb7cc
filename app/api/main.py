"""Assembles the API: one router per resource."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.routes import (
    calibration,
    cluster,
    enroll,
    evaluation,
    health,
    identify,
    identities,
    verify,
)

api_router = APIRouter()
for module in (enroll, verify, identify, identities, cluster, calibration, evaluation, health):
    api_router.include_router(module.router)
