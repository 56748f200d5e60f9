"""README's "Inside a FastAPI app": its two Python blocks, run as written on uvicorn.

The blocks are taken from README.md itself, written to files as they are, and served by
a real uvicorn process with the test's own Redis in `BROADCAST_URL` (the first block's
Settings() reads it from the environment; the second one's has none and stays on
memory://, one process).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.conftest import WorkerFactory
from tests.helpers import UNIT, Client, RedisServer, Worker, wait_for

README = Path(__file__).resolve().parents[2] / "README.md"


def section_blocks() -> list[str]:
    """The `python` code blocks of the section, its subsections included, in order."""
    text = README.read_text()
    section = text.split("\n## Inside a FastAPI app\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def uvicorn(directory: Path, module: str) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(directory), f"{module}:app"]


def test_the_section_has_the_two_blocks() -> None:
    blocks = section_blocks()
    assert len(blocks) == 2
    assert "include_router(realtime.router" in blocks[0]
    assert "Hooks(" in blocks[1]


async def test_the_app_with_its_own_login_and_a_route_that_publishes(
    tmp_path: Path, make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    (tmp_path / "readme_app.py").write_text(section_blocks()[0])
    app = make_worker(
        env={"BROADCAST_URL": redis_server.url, "REDIS_PREFIX": prefix},
        program=uvicorn(tmp_path, "readme_app"),
        start=False,
    )
    # The app has no /readyz of its own: ready once its route answers.
    app.start(wait_ready=False)
    wait_ready(app)

    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(app.ws + "/rt/ws", open_timeout=5 * UNIT)
    assert refused.value.response.status_code == 403

    cookie = {"Cookie": "session=s3cr3t-session-id"}
    client = await Client.connect(app.ws + "/rt/ws", additional_headers=cookie)
    try:
        await client.welcome()
        await client.subscribe("room:orders")
        async with httpx.AsyncClient() as http:
            shipped = await http.post(app.http + "/orders/7/ship", timeout=5 * UNIT)
        assert shipped.status_code == 200, shipped.text
        message = await client.recv_type("message")
        assert message["id"] == shipped.json()["id"]
        assert message["data"] == {"order": 7, "shipped": True}
        # Alice may not publish to her own user channel, only to rooms.
        await client.send({"type": "publish", "channel": "user:alice", "data": 1, "ref": 1})
        assert (await client.recv_type("error"))["code"] == "forbidden"
    finally:
        await client.close()


async def test_the_publish_hook(tmp_path: Path, make_worker: WorkerFactory) -> None:
    (tmp_path / "readme_hooks.py").write_text(section_blocks()[1])
    app = make_worker(program=uvicorn(tmp_path, "readme_hooks"), start=False)
    app.start(wait_ready=False)
    wait_ready(app)
    client = await Client.connect(app.ws + "/rt/ws")
    try:
        await client.welcome()
        await client.subscribe("room:lobby")
        await client.send({"type": "publish", "channel": "room:lobby", "data": {"text": " "}})
        error = await client.recv_type("error")
        assert (error["code"], error["message"]) == ("empty_message", "say something")
        await client.publish("room:lobby", {"text": "hi"})
        message = await client.recv_type("message")
        assert message["data"] == {"text": "hi", "user": None}  # anonymous: auth is off
    finally:
        await client.close()


def wait_ready(app: Worker) -> None:
    """Until the app answers HTTP (uvicorn serves only once the lifespan has run)."""

    def answers() -> bool:
        if app.process is not None and app.process.poll() is not None:
            raise AssertionError(f"the app exited:\n{app.log()}")
        try:
            httpx.get(app.http + "/rt/api/channels/x/history", timeout=2 * UNIT)
        except httpx.HTTPError:
            return False
        return True

    wait_for(answers, 20, what="the README's app to answer")
