"""A small chat app of its own that embeds the broadcast service: `Realtime` under `/rt`.

The app keeps what is its business: who is signed in (its own `session` cookie), what
a chat message looks like (a publish hook that stamps the sender), and the rooms'
topics (a route that changes one and tells the room). The service does the rest: the
WebSockets, the fan-out through Redis, the history and the resume after a reconnect.

Run it as examples/chat_app/README.md says. The sessions and topics live in this
process's memory, which keeps the example short; a real app keeps them in its database,
and may then run several workers on one Redis.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import Cookie, Depends, FastAPI, HTTPException, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, JsonValue

from service import Hooks, Principal, Realtime, Refused, Settings

HERE = Path(__file__).resolve().parent
# The browser client, installed from the npm package by `npm install` (package.json).
CLIENT_JS = HERE / "node_modules" / "broadcast-service-client" / "client.js"
if not CLIENT_JS.is_file():
    raise RuntimeError(f"{CLIENT_JS} is missing: run `npm install` in {HERE} first")

MAX_TEXT = 500  # characters of one chat message

#: session id -> user name. In memory: signing out everyone on restart is fine here.
sessions: dict[str, str] = {}
#: room -> its topic.
topics: dict[str, str] = {}

# A room name ends up in a channel name (`room:<room>`), whose characters are limited.
Room = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


async def signed_in_user(session: Annotated[str | None, Cookie()] = None) -> str | None:
    """The name of the user whose `session` cookie this is; None: not signed in."""
    return sessions.get(session) if session else None


async def identify(user: Annotated[str | None, Depends(signed_in_user)]) -> Principal | None:
    """Who opens a WebSocket, from the same cookie as the app's pages; None: refused (403).

    Any signed-in user may read and write every room; a real app would look up which.
    """
    if user is None:
        return None
    return Principal(user, subscribe=("room:*",), publish=("room:*",))


async def require_user(user: Annotated[str | None, Depends(signed_in_user)]) -> str:
    """The signed-in user of an HTTP request; 401 without one."""
    if user is None:
        raise HTTPException(401, "sign in first")
    return user


async def stamp_sender(client: Principal, channel: str, data: JsonValue) -> JsonValue:
    """What a browser publishes to a room becomes `{"text", "user"}`, or is refused.

    The message is rebuilt rather than amended, so that a page cannot pass itself off
    as someone else (`"user": "alice"`) or as the app (`"topic": ...`).
    """
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise Refused("say something", "empty_message")
    if len(text) > MAX_TEXT:
        raise Refused(f"at most {MAX_TEXT} characters", "message_too_long")
    return {"text": text.strip(), "user": client.subject}


# Settings() reads BROADCAST_URL and the service's other variables (or a .env file).
realtime = Realtime(
    Settings(), identify=identify, hooks=Hooks(publish=stamp_sender, channels=["room:*"])
)
app = FastAPI(title="chat example")
# The WebSocket endpoint is then /rt/ws; the service's HTTP API comes along under
# /rt/api, closed until API_KEYS is set (the app publishes in-process).
app.include_router(realtime.router, prefix="/rt")
app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")


class Login(BaseModel):
    """The sign-in form: a name only (a demo: no password)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")


class Topic(BaseModel):
    """A room's new topic."""

    topic: str = Field(max_length=200)


@app.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The chat page."""
    return FileResponse(HERE / "static" / "index.html")


@app.get("/vendor/broadcast-service-client/client.js", include_in_schema=False)
async def client_js() -> FileResponse:
    """The npm package's module, which the page's import map names `broadcast-service-client`."""
    return FileResponse(CLIENT_JS, media_type="text/javascript")


@app.post("/login")
async def login(body: Login, response: Response) -> dict[str, str]:
    """Sign in under any name (a demo: no password) with an HttpOnly session cookie."""
    session = secrets.token_urlsafe(32)
    sessions[session] = body.name
    # HttpOnly: the page's scripts never see it; the browser sends it with the
    # WebSocket handshake to /rt/ws, which is same-origin. SameSite=Lax keeps other
    # sites' forms from posting with it (and the service checks the WebSocket's Origin).
    response.set_cookie("session", session, httponly=True, samesite="lax")
    return {"user": body.name}


@app.post("/logout")
async def logout(response: Response, session: Annotated[str | None, Cookie()] = None) -> None:
    """Forget the session. Connections already open stay open until they close."""
    sessions.pop(session or "", None)
    response.delete_cookie("session")


@app.get("/me")
async def me(user: Annotated[str | None, Depends(signed_in_user)]) -> dict[str, str | None]:
    """Who is signed in, or null (the page cannot read its HttpOnly cookie)."""
    return {"user": user}


@app.post("/rooms/{room}/topic")
async def set_topic(
    room: Room, body: Topic, user: Annotated[str, Depends(require_user)]
) -> dict[str, str]:
    """Change the room's topic, and tell everyone in the room: the app publishes itself."""
    topics[room] = body.topic
    message_id = await realtime.publish(f"room:{room}", {"topic": body.topic, "by": user})
    return {"id": message_id}


@app.get("/rooms/{room}/history")
async def history(
    room: Room, user: Annotated[str, Depends(require_user)], limit: int = 50
) -> dict[str, Any]:
    """What a page shows first: the room's topic and its latest messages, oldest first.

    `position` is the id of the room's latest message; a page that subscribed first
    keeps only the messages up to the `position` of its `subscribed` event, since it
    receives the later ones live.
    """
    read = await realtime.history(f"room:{room}", limit=max(1, min(limit, 100)))
    return {
        "topic": topics.get(room, ""),
        "position": read.position,
        "messages": [{"id": m.id, "data": m.data} for m in read.messages],
    }


@app.get("/readyz", include_in_schema=False)
async def readyz() -> JSONResponse:
    """Ready when the service is: Redis answers and its subscriptions are alive."""
    readiness = await realtime.readiness()
    return JSONResponse({"ready": readiness.ready}, status_code=200 if readiness.ready else 503)
