"""An app of its own that embeds the service, run on uvicorn by tests/integration/test_embedding.py.

Its users sign in with a `session` cookie looked up in a "database" (a dependency with
`yield`, counted so that a test can see it end with the handshake). Its hooks refuse
one user, one channel and one word, and sign every message with its sender.
Settings come from the environment, as for the service.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Cookie, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, JsonValue

from service import Hooks, Principal, Realtime, Refused, Settings
from service.app import create_app

USERS = {
    "alice-session": Principal("alice", subscribe=("chat:*", "news"), publish=("chat:*",)),
    "bob-session": Principal("bob", subscribe=("chat:*",), publish=("chat:*",)),
    "mallory-session": Principal("mallory", subscribe=("chat:*",), publish=("chat:*",)),
    # A guest: the app knows the browser but not who is behind it.
    "guest-session": Principal(None, subscribe=("chat:lobby",), publish=()),
    "crash-session": Principal("crash", subscribe=("chat:*",), publish=("chat:*",)),
}
open_sessions = 0


async def database() -> AsyncIterator[dict[str, Principal]]:
    """Stands for the app's database session: open while a request uses it."""
    global open_sessions
    open_sessions += 1
    try:
        yield USERS
    finally:
        open_sessions -= 1


async def current_user(
    users: Annotated[dict[str, Principal], Depends(database)],
    session: Annotated[str | None, Cookie()] = None,
) -> Principal | None:
    """The signed-in user, from the app's own session cookie; None: not signed in."""
    return users.get(session) if session else None


async def on_connect(client: Principal) -> None:
    if client.subject == "mallory":
        raise Refused("mallory is banned", "banned")
    if client.subject == "crash":
        raise RuntimeError("a bug in the app's connect hook")


async def on_subscribe(client: Principal, channel: str) -> None:
    if channel == "chat:staff" and client.subject != "alice":
        raise Refused("staff only", "staff_only")


async def on_publish(client: Principal, channel: str, data: JsonValue) -> JsonValue:
    text = data.get("text") if isinstance(data, dict) else data
    if text == "darn":
        raise Refused("mind your language", "banned_word")
    if text == "slow":
        await asyncio.sleep(30)  # longer than the hooks' timeout
    if text == "boom":
        raise RuntimeError("a bug in the app's hook")
    if text == "not json":
        return {"a", "set"}  # type: ignore[return-value]  # a bug: not a JSON value
    return {"text": text, "by": client.subject}


realtime = Realtime(
    identify=current_user,
    hooks=Hooks(
        connect=on_connect,
        subscribe=on_subscribe,
        publish=on_publish,
        channels=["chat:*"],
        timeout=1.0,
    ),
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """The app's own lifespan, which runs beside the router's."""
    yield {"greeting": "hello from the app's lifespan"}


app = FastAPI(lifespan=lifespan)
app.include_router(realtime.router, prefix="/rt")


class Announcement(BaseModel):
    text: str


@app.get("/readyz")
async def readyz() -> JSONResponse:
    readiness = await realtime.readiness()
    return JSONResponse({"ready": readiness.ready}, status_code=200 if readiness.ready else 503)


@app.post("/announce/{channel}")
async def announce(channel: str, announcement: Announcement) -> dict[str, str]:
    """Something happened in the app: tell the channel's subscribers."""
    message_id = await realtime.publish(channel, {"text": announcement.text, "by": "the app"})
    return {"id": message_id}


@app.get("/history/{channel}")
async def history(channel: str, since: str | None = None) -> dict[str, Any]:
    read = await realtime.history(channel, limit=10, since=since)
    return {
        "position": read.position,
        "recovered": read.recovered,
        "messages": [{"id": m.id, "data": m.data} for m in read.messages],
    }


@app.get("/state")
async def state(request: Request) -> dict[str, Any]:
    return {"open_sessions": open_sessions, "greeting": request.state.greeting}


#: The same app with its identity overridden, as a test of the app's would do.
overridden = FastAPI()
overridden.include_router(realtime.router, prefix="/rt")
overridden.dependency_overrides[current_user] = lambda: Principal(
    "stand-in", subscribe=("chat:*",), publish=("chat:*",)
)


@overridden.get("/readyz")
async def overridden_readyz() -> dict[str, bool]:
    return {"ready": True}


#: The standalone app mounted as a sub-application, which cannot work (no lifespan).
mounted = FastAPI()
mounted.mount("/rt", create_app(Settings()))


@mounted.get("/readyz")
async def mounted_readyz() -> dict[str, bool]:
    return {"ready": True}
