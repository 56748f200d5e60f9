"""What history costs in Redis: bytes per kept message and per channel.

Starts its own redis-server on a free loopback port, publishes through the service's
own Lua script (`RedisHistory`), and prints Redis's `MEMORY USAGE` of the keys for a
few message sizes. Run: `.venv/bin/python bench/history_memory.py`.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from functools import partial

import orjson
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.broker.redis_history import RedisHistory
from service.broker.redis_pipe import ScriptPipe, settle

CHANNEL = "chat:lobby"
SIZES = (16, 128, 1024)  # bytes of `data` (a JSON string)
KEPT = 100  # HISTORY_SIZE default


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def measure(redis: Redis, size: int, count: int) -> tuple[int, int]:
    """Bytes of the stream and of the meta hash after `count` messages of `size` bytes."""
    await redis.flushall()
    port = redis.connection_pool.connection_kwargs["port"]
    pipes: list[ScriptPipe] = []

    def pipe(script: str) -> ScriptPipe:
        pipes.append(
            ScriptPipe(
                script,
                lambda: Connection(port=port, protocol=2),
                timeout=10,
                retry=Retry(NoBackoff(), 0),
            )
        )
        return pipes[-1]

    history = RedisHistory(
        redis,
        pipe=pipe,
        pubsub_key=lambda channel: channel.encode(),
        publish_command=b"PUBLISH",
        prefix="bench:",
        size=count,
        ttl=300,
        meta_ttl=604_800,
        token_ttl=30,
    )
    data = orjson.dumps("x" * (size - 2))
    for _ in range(count):
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        history.publish_now(CHANNEL, data, partial(settle, done))
        await done
    for made in pipes:
        await made.close()
    stream = await redis.memory_usage(f"bench:history:{{{CHANNEL}}}", samples=0) or 0
    meta = await redis.memory_usage(f"bench:meta:{{{CHANNEL}}}", samples=0) or 0
    return stream, meta


async def main(port: int) -> None:
    """Print the table."""
    redis = Redis(port=port)
    print(
        f"{'data bytes':>10} {'frame bytes':>11} {'stream, 1 msg':>13} "
        f"{'stream, 100':>11} {'per message':>11} {'meta hash':>9}"
    )
    for size in SIZES:
        one, meta = await measure(redis, size, 1)
        hundred, _ = await measure(redis, size, KEPT)
        frame_bytes = (
            len(b'{"type":"message","channel":"chat:lobby","id":"abcdefgh:100","data":') + size + 1
        )
        per = (hundred - one) / (KEPT - 1)
        print(f"{size:>10} {frame_bytes:>11} {one:>13} {hundred:>11} {per:>11.0f} {meta:>9}")
    await redis.aclose()


if __name__ == "__main__":
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        process = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            asyncio.run(main(port))
        finally:
            process.terminate()
            process.wait(timeout=10)
