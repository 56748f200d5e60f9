"""WebSocket endpoints: `/ws` (protocol v1) and `/ws/{channel}` (simple mode)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, WebSocket

from service.api.deps import RuntimeDep, connection_principal
from service.auth import Principal
from service.protocol import frames
from service.protocol.codes import CloseCode
from service.runtime import Runtime
from service.session import Session, SimpleSession

router = APIRouter()

PrincipalDep = Annotated[Principal, Depends(connection_principal)]


@router.websocket("/ws")
async def protocol_endpoint(
    websocket: WebSocket, runtime: RuntimeDep, principal: PrincipalDep
) -> None:
    """Protocol v1: the client subscribes, unsubscribes and publishes with JSON commands."""
    if not await _take_slot(websocket, runtime):
        return
    try:
        session = Session(websocket, runtime, principal)
        session.deliver(frames.welcome(runtime.worker_id))
        await session.run()
    finally:
        runtime.slots.release()


@router.websocket("/ws/{channel}")
async def simple_endpoint(
    websocket: WebSocket, channel: str, runtime: RuntimeDep, principal: PrincipalDep
) -> None:
    """Simple mode: subscribed to `channel`; every text frame sent is published to it."""
    if not await _take_slot(websocket, runtime):
        return
    try:
        await SimpleSession(websocket, runtime, principal, channel).run()
    finally:
        runtime.slots.release()


async def _take_slot(websocket: WebSocket, runtime: Runtime) -> bool:
    """Accept the connection; if the worker is full, close it at once with 1013."""
    await websocket.accept()
    if runtime.slots.acquire():
        return True
    runtime.metrics.refused_connections.inc()
    await websocket.close(CloseCode.TRY_AGAIN_LATER, "worker full: retry later")
    return False
