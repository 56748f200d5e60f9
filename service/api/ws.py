"""WebSocket endpoints: `/ws` (protocol v1) and `/ws/{channel}` (simple mode)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, WebSocket

from service.api.deps import get_runtime
from service.protocol import frames
from service.runtime import Runtime
from service.session import Session, SimpleSession

router = APIRouter()

RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


@router.websocket("/ws")
async def protocol_endpoint(websocket: WebSocket, runtime: RuntimeDep) -> None:
    """Protocol v1: the client subscribes, unsubscribes and publishes with JSON commands."""
    await websocket.accept()
    session = Session(websocket, runtime)
    session.deliver(frames.welcome(runtime.worker_id))
    await session.run()


@router.websocket("/ws/{channel}")
async def simple_endpoint(websocket: WebSocket, channel: str, runtime: RuntimeDep) -> None:
    """Simple mode: subscribed to `channel`; every text frame sent is published to it."""
    await websocket.accept()
    await SimpleSession(websocket, runtime, channel).run()
