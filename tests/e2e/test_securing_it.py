"""README's "Securing it", run as written against a real worker and a real Redis.

The two `sh` blocks of the section are taken from README.md itself, so the test and the
text cannot drift apart. What is changed, and only this: the first block's last line
(`.venv/bin/python -m service`, which runs until stopped) is checked to be exactly that
and then started by the `make_worker` fixture in the same directory, with the test's
Redis and a free port given in the environment (which wins over `.env`); and
`127.0.0.1:8000` becomes that port in the second block. Both blocks run in bash in a
fresh directory whose `.venv` is this interpreter's.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from service.client import Client, ClientError, Message, State, StateChanged
from service.settings import Settings
from tests.conftest import WorkerFactory
from tests.helpers import UNIT, RedisServer, hermetic_environment

README = Path(__file__).resolve().parents[2] / "README.md"
START_LINE = ".venv/bin/python -m service"


def section_blocks() -> list[str]:
    """The `sh` code blocks of README's "Securing it" section, in order."""
    text = README.read_text()
    section = text.split("\n## Securing it\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


def run_block(script: str, cwd: Path) -> str:
    """Run `script` with bash in `cwd`; its stdout (fails the test on a nonzero exit)."""
    env = hermetic_environment()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60 * UNIT,
    )
    assert result.returncode == 0, (
        f"{script}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    return result.stdout


def test_securing_it_as_written(
    tmp_path: Path, redis_server: RedisServer, make_worker: WorkerFactory, prefix: str
) -> None:
    setup, use = section_blocks()
    lines = setup.rstrip("\n").split("\n")
    assert lines[-1] == START_LINE, "the first block must end by starting the service"
    workdir = tmp_path / "workers"  # where make_worker starts its processes
    workdir.mkdir()
    (workdir / ".venv").symlink_to(sys.prefix)

    shown = run_block("\n".join(lines[:-1]), workdir)
    values = dict(re.findall(r"^(JWT_SECRET|API_KEY)=(\S+)$", shown, flags=re.MULTILINE))
    assert set(values) == {"JWT_SECRET", "API_KEY"}, shown  # both are shown
    assert "settings are valid" in shown, shown
    assert "auth on" in shown, shown
    assert (workdir / ".env").stat().st_mode & 0o077 == 0  # for its owner only
    # The service reads the same values from .env as the commands did.
    os.chdir(workdir)
    settings = Settings()
    assert settings.jwt_secret is not None
    assert settings.jwt_secret.get_secret_value() == values["JWT_SECRET"]
    assert [key.get_secret_value() for key in settings.api_keys] == [values["API_KEY"]]

    worker = make_worker(env={"BROADCAST_URL": redis_server.url, "REDIS_PREFIX": prefix})
    assert worker.workdir == workdir
    out = run_block(use.replace("127.0.0.1:8000", f"127.0.0.1:{worker.port}"), workdir)
    lines = out.strip().split("\n")
    token = lines[0]
    claims = jwt.decode(token, values["JWT_SECRET"], algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["channels"] == {"subscribe": ["chat:*"], "publish": ["chat:*"]}
    assert 3590 <= claims["exp"] - claims["iat"] <= 3600
    assert lines[1] == "received chat:lobby hello from alice", out
    assert lines[2].startswith("refused forbidden"), out
    assert "id" in json.loads(lines[3]), out

    asyncio.run(_use_the_token(worker.ws, worker.publish, token, values["API_KEY"]))
    # A token whose `channels` is a list, as the README once suggested, is refused.
    listed = jwt.encode(
        {"sub": "bob", "exp": claims["exp"], "channels": ["chat:*"]},
        values["JWT_SECRET"],
        algorithm="HS256",
    )
    asyncio.run(_refused(worker.ws, listed))
    assert "WebSocket refused: claim 'channels' must be an object" in worker.log()


async def _use_the_token(ws: str, publish: object, token: str, api_key: str) -> None:
    """Within its claim the token subscribes and hears an HTTP publish; outside, refused."""
    async with Client(f"{ws}/ws", token=token) as client:
        await client.subscribe("chat:room")
        with pytest.raises(ClientError) as refused:
            await client.subscribe("admin:log")
        assert refused.value.code == "forbidden"
        with pytest.raises(ClientError) as refused:
            await client.publish("public:news", "not alice's to publish")
        assert refused.value.code == "forbidden"
        assert callable(publish)
        message_id = await asyncio.to_thread(publish, "chat:room", {"n": 1}, api_key)
        async with asyncio.timeout(10 * UNIT):
            async for event in client.events():
                if isinstance(event, Message):
                    assert (event.channel, event.id, event.data) == (
                        "chat:room",
                        message_id,
                        {"n": 1},
                    )
                    break


async def _refused(ws: str, token: str) -> None:
    """The client stops, and its reason says why the worker refused it."""
    async with Client(f"{ws}/ws", token=token) as client:
        async with asyncio.timeout(10 * UNIT):
            async for event in client.events():
                if isinstance(event, StateChanged) and event.state is State.CLOSED:
                    break
    assert event.code == 1008
    assert event.reason.startswith("handshake refused: "), event.reason
    assert "HTTP 403" in event.reason, event.reason
    # The worker's 403 says why (its body), and the client passes that on.
    assert "claim 'channels' must be an object" in event.reason, event.reason
