"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import NotRequired

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from typing_extensions import TypedDict

from service.api.deps import RuntimeDep
from service.api.errors import ErrorRoute

router = APIRouter(route_class=ErrorRoute)


class Health(BaseModel):
    """The answer of `/healthz`."""

    status: str
    worker: str


class Readiness(TypedDict):
    """The answer of `/readyz`; `reason` only when not ready."""

    ready: bool
    worker: str
    reason: NotRequired[str]


@router.get("/healthz", response_model=Health)
async def healthz(runtime: RuntimeDep) -> dict[str, str]:
    """The process is alive and serving."""
    return {"status": "ok", "worker": runtime.worker_id}


@router.get(
    "/readyz",
    responses={
        200: {"model": Readiness, "description": "Ready."},
        503: {"model": Readiness, "description": "Not ready: `reason` says why."},
    },
)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """200 when Redis answers and this worker's subscriptions are alive, else 503."""
    readiness = await runtime.broker.readiness()
    body = {"ready": readiness.ready, "worker": runtime.worker_id}
    if not readiness.ready:
        body["reason"] = readiness.reason
    return JSONResponse(body, status_code=200 if readiness.ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus text exposition of this worker's metrics."""
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
