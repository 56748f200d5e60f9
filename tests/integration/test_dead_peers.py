"""Server pings: a vanished client is dropped and released; an idle one behind a proxy
with a read timeout is kept alive."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.conftest import WorkerFactory
from tests.helpers import UNIT, Client, RedisServer, redis_args, subscribed_client, unique, wait_for


async def test_a_client_that_vanished_without_a_fin_is_dropped_and_released(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    worker = make_worker(
        *redis_args(
            redis_server,
            prefix,
            "--ws-ping-interval",
            "0.3",
            "--ws-ping-timeout",
            "0.5",
            "--channel-linger",
            "0",
        )
    )
    channel = unique("ghost")
    ghost = await subscribed_client(worker, channel, ping_interval=None)
    key = prefix + channel
    assert redis_server.client().pubsub_numsub(key)[0][1] == 1
    assert worker.metric("broadcast_connections") == 1
    # The peer freezes: its socket stays open (no FIN) but nothing is read or answered.
    ghost.connection.transport.pause_reading()
    await asyncio.to_thread(
        wait_for, lambda: worker.metric("broadcast_connections") == 0, 10, "the ghost dropped"
    )
    await asyncio.to_thread(
        wait_for, lambda: redis_server.client().pubsub_numsub(key)[0][1] == 0, 10, "released"
    )
    ghost.connection.transport.abort()


class IdleTimeoutProxy:
    """A TCP proxy that cuts a connection after `timeout` seconds without data from
    upstream, like nginx's proxy_read_timeout."""

    def __init__(self, upstream_port: int, timeout: float) -> None:
        self.upstream_port = upstream_port
        self.timeout = timeout
        self.port = 0
        self.cut = 0
        self._writers: list[asyncio.StreamWriter] = []

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[IdleTimeoutProxy]:
        server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            for writer in self._writers:
                writer.transport.abort()
            server.close()
            await server.wait_closed()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [client_w, up_w]

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

        async def downstream() -> None:
            while True:
                try:
                    async with asyncio.timeout(self.timeout):
                        data = await up_r.read(65536)
                except TimeoutError:
                    self.cut += 1
                    return
                if not data:
                    return
                client_w.write(data)
                await client_w.drain()

        upstream = asyncio.create_task(pipe(client_r, up_w))
        await downstream()
        upstream.cancel()
        for writer in (client_w, up_w):
            writer.transport.abort()


@pytest.mark.parametrize(("ping_interval", "survives"), [(0.5, True), (5.0, False)])
async def test_an_idle_client_behind_a_proxy_read_timeout(
    make_worker: WorkerFactory,
    redis_server: RedisServer,
    prefix: str,
    ping_interval: float,
    survives: bool,
) -> None:
    # Scaled down from nginx's 60 s proxy_read_timeout and our 20 s default ping interval:
    # pings more frequent than the proxy's timeout keep an idle client connected (the
    # control case, pings rarer than the timeout, shows the proxy does cut).
    worker = make_worker(
        *redis_args(redis_server, prefix, "--ws-ping-interval", str(ping_interval))
    )
    channel = unique("idle")
    async with IdleTimeoutProxy(worker.port, timeout=1.5).serve() as proxy:
        client = await Client.connect(f"ws://127.0.0.1:{proxy.port}/ws", ping_interval=None)
        await client.welcome()
        await client.subscribe(channel)
        # Idle (the client sends nothing) for well over the proxy's timeout.
        try:
            async with asyncio.timeout(4.0 * UNIT):
                await client.connection.wait_closed()
            closed = True
        except TimeoutError:
            closed = False
        if survives:
            assert not closed
            assert proxy.cut == 0
            worker.publish(channel, "still here")
            assert (await client.recv())["data"] == "still here"
        else:
            assert closed
            assert proxy.cut == 1
        await client.close()
