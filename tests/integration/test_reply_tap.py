"""The readers of a redis-py connection (service/broker/replies.py), both kinds.

Against a real redis-server, with the fast `ReplyTap` and the public `ReplyTask` alike:
the replies of a pipelined burst in order, error replies as redis-py's exceptions (a
connection-kind one too), the ways a connection ends, redis-py's own writing and closing
still working beside the reader, and the same over TLS. Then the choice between them:
the start-up check falls back by itself when redis-py is not as the tap expects, and
`fast=False` picks the public reader.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis._parsers.base
import uvloop
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection
from redis.exceptions import BusyLoadingError, MaxClientsReachedError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from service.broker import replies as replies_module
from service.broker.replies import Replies, ReplyTap, ReplyTask, reply_reader
from tests.helpers import RedisServer, async_wait_for, free_port, self_signed_certificate, unique


@pytest.fixture(autouse=True)
def _checked_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's first reader runs the start-up check again (it is cached per process)."""
    monkeypatch.setattr(replies_module, "_verdict", None)


def _reader(
    conn: AbstractConnection,
    on_reply: Callable[[Any], None],
    fast: bool,
    on_end: Callable[[BaseException], None] | None = None,
) -> Replies:
    """`reply_reader`, checked to be the kind `fast` asks for (the check passes here)."""
    reader = reply_reader(conn, on_reply, on_end=on_end, fast=fast)
    assert type(reader) is (ReplyTap if fast else ReplyTask)
    return reader


async def _until(condition: Callable[[], Any], what: str) -> None:
    async def check() -> Any:
        return condition()

    await async_wait_for(check, what=what)


@asynccontextmanager
async def _connected(port: int, name: str) -> AsyncIterator[Connection]:
    """A connected redis-py connection, disconnected (if it is not yet) on exit."""
    conn = Connection(port=port, protocol=2, client_name=name)
    await conn.connect()  # type: ignore[no-untyped-call]
    try:
        yield conn
    finally:
        await conn.disconnect(nowait=True)


def _pack(*args: str | bytes | int) -> bytes:
    return hiredis.pack_command(args)  # type: ignore[arg-type]


async def test_a_pipelined_burst_comes_back_whole_and_in_order(
    redis_server: RedisServer, fast: bool
) -> None:
    async with _connected(redis_server.port, unique("tap")) as conn:
        replies: list[Any] = []
        reader = _reader(conn, replies.append, fast)
        key = unique("k")
        big = "x" * 300_000  # split over several reads
        burst = [_pack("SET", key, big), _pack("GET", key)]
        burst += [_pack("ECHO", str(n)) for n in range(2000)]
        reader.write(b"".join(burst))
        await _until(lambda: len(replies) == 2002, what="2002 replies")
        assert replies[0] == b"OK"
        assert replies[1] == big.encode()
        assert replies[2:] == [str(n).encode() for n in range(2000)]
        assert not reader.ended.done()
        await reader.aclose()


async def test_error_replies_arrive_as_redis_py_exceptions(
    redis_server: RedisServer, fast: bool
) -> None:
    async with _connected(redis_server.port, unique("tap")) as conn:
        replies: list[Any] = []
        reader = _reader(conn, replies.append, fast)
        reader.write(_pack("EVALSHA", "0" * 40, 0) + _pack("NOSUCHCOMMAND"))
        await _until(lambda: len(replies) == 2, what="two error replies")
        assert isinstance(replies[0], NoScriptError)
        assert isinstance(replies[1], ResponseError)
        assert not reader.ended.done()  # an error reply is a reply, not the end
        await reader.aclose()


async def test_connection_kinds_of_error_replies_are_replies_too(fast: bool) -> None:
    # redis-py raises LOADING (and a few more) as connection errors, from inside its
    # parser; the public reader must still hand them on as replies, as the tap does,
    # so that the publish pipe retries that call alone instead of dropping the connection.
    async with _scripted_redis() as port, _connected(port, unique("tap")) as conn:
        replies: list[Any] = []
        reader = _reader(conn, replies.append, fast)
        reader.write(_pack("LOADINGPLEASE") + _pack("TOOMANY") + _pack("PING"))
        await _until(lambda: len(replies) == 3, what="three replies")
        assert type(replies[0]) is BusyLoadingError
        assert type(replies[1]) is MaxClientsReachedError
        assert replies[2] == b"PONG"
        assert not reader.ended.done()
        await reader.aclose()


async def test_a_reply_the_callback_refuses_ends_and_closes_the_connection(
    redis_server: RedisServer, fast: bool
) -> None:
    name = unique("tap")
    ends: list[BaseException] = []

    def refuse(reply: Any) -> None:
        raise ValueError(f"unexpected {reply!r}")

    async with _connected(redis_server.port, name) as conn:
        reader = _reader(conn, refuse, fast, on_end=ends.append)
        reader.write(_pack("PING"))
        reason = await asyncio.wait_for(reader.ended, 5)
        assert isinstance(reason, ValueError)
        assert ends == [reason]  # on_end: once, with the same reason
        if isinstance(reader, ReplyTap):
            assert reader.transport.is_closing()  # reset
        else:
            await _until(lambda: not conn.is_connected, what="closed by the reader")
        await _until(lambda: not redis_server.clients_named(name), what="gone from Redis")
        await reader.aclose()


async def test_redis_dropping_the_client_ends_the_reader_and_redis_py_sees_it(
    redis_server: RedisServer, fast: bool
) -> None:
    name = unique("tap")
    ends: list[BaseException] = []
    async with _connected(redis_server.port, name) as conn:
        reader = _reader(conn, lambda reply: None, fast, on_end=ends.append)
        [client] = redis_server.clients_named(name)
        redis_server.client().client_kill_filter(_id=client["id"])
        reason = await asyncio.wait_for(reader.ended, 5)
        assert isinstance(reason, RedisConnectionError)
        assert ends == [reason]
        if fast:
            # redis-py's stream protocol heard the end too: its reader is at EOF.
            stream = conn._reader
            assert stream is not None
            await _until(stream.at_eof, what="redis-py's reader at EOF")
        else:
            # redis-py read the end itself, and the reader closed the connection.
            await _until(lambda: not conn.is_connected, what="redis-py's connection closed")
        await reader.aclose()


async def test_redis_py_still_writes_and_closes_through_its_streams(
    redis_server: RedisServer, fast: bool
) -> None:
    name = unique("tap")
    async with _connected(redis_server.port, name) as conn:
        replies: list[Any] = []
        reader = _reader(conn, replies.append, fast)
        # redis-py's send_command writes and drains through its StreamWriter.
        await conn.send_command("ECHO", "through redis-py", check_health=False)
        await _until(lambda: replies == [b"through redis-py"], what="the echo")
        await conn.disconnect()  # waits for the stream to close: the reader hears the end
        reason = await asyncio.wait_for(reader.ended, 5)
        assert isinstance(reason, RedisConnectionError)
        await reader.aclose()
    await _until(lambda: not redis_server.clients_named(name), what="closed")


async def test_the_tap_refuses_a_connection_with_unread_replies(
    redis_server: RedisServer,
) -> None:
    async with _connected(redis_server.port, unique("tap")) as conn:
        writer = conn._writer
        assert writer is not None
        writer.write(_pack("PING"))
        stream = conn._reader
        assert stream is not None
        # Let the reply reach redis-py's StreamReader, unread.
        await _until(lambda: bool(getattr(stream, "_buffer", b"")), what="a reply")
        with pytest.raises(RedisConnectionError, match="unread"):
            reply_reader(conn, lambda reply: None, fast=True)


async def test_the_public_reader_hands_on_replies_already_buffered(
    redis_server: RedisServer,
) -> None:
    # It reads through redis-py, which sees what is buffered: nothing is left behind.
    async with _connected(redis_server.port, unique("tap")) as conn:
        await conn.send_command("PING", check_health=False)
        stream = conn._reader
        assert stream is not None
        await _until(lambda: bool(getattr(stream, "_buffer", b"")), what="a reply")
        replies: list[Any] = []
        reader = _reader(conn, replies.append, fast=False)
        reader.write(_pack("ECHO", "after"))
        await _until(lambda: len(replies) == 2, what="both replies")
        assert replies == [b"PONG", b"after"]
        await reader.aclose()


async def test_closing_a_reader_leaves_no_task_behind(
    redis_server: RedisServer, fast: bool
) -> None:
    async with _connected(redis_server.port, unique("tap")) as conn:
        before = asyncio.all_tasks()
        replies: list[Any] = []
        reader = _reader(conn, replies.append, fast)
        reader.write(_pack("PING"))
        await _until(lambda: replies == [b"PONG"], what="the reply")
        await reader.aclose()
        assert isinstance(reader.ended.result(), RedisConnectionError)
        assert asyncio.all_tasks() == before


# -- which reader: the start-up check and the setting -----------------------------------


async def _falls_back(caplog: pytest.LogCaptureFixture, conn: AbstractConnection, port: int) -> str:
    """Readers asked for with fast=True, on `conn` then on a sound connection, are both
    public (the first decided for the process); the one warning's text."""
    with caplog.at_level(logging.WARNING, logger="service.broker.replies"):
        first = reply_reader(conn, lambda reply: None, fast=True)
        await first.aclose()
        async with _connected(port, unique("tap")) as other:
            second = reply_reader(other, lambda reply: None, fast=True)
            await second.aclose()
    assert type(first) is ReplyTask
    assert type(second) is ReplyTask
    warnings = [r for r in caplog.records if r.name == "service.broker.replies"]
    assert len(warnings) == 1, warnings  # logged once, when the check failed
    assert warnings[0].levelno == logging.WARNING
    assert "read_response" in warnings[0].getMessage()
    return warnings[0].getMessage()


async def test_a_missing_parser_makes_the_reader_fall_back_by_itself(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As if a redis-py release moved its parsers: redis-py itself still works (its
    # modules hold their own reference), but replies.py cannot find what it relies on.
    monkeypatch.delattr(redis._parsers.base, "BaseParser")
    async with _connected(redis_server.port, unique("tap")) as conn:
        message = await _falls_back(caplog, conn, redis_server.port)
        assert "BaseParser.parse_error is missing" in message


async def test_a_connection_without_the_streams_it_expects_falls_back_by_itself(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As if redis-py's connection kept its reader under another name or kind: the check
    # runs on the first connection and decides for the process.
    async with _connected(redis_server.port, unique("tap")) as conn:
        monkeypatch.setattr(conn, "_reader", types.SimpleNamespace())
        message = await _falls_back(caplog, conn, redis_server.port)
        assert "_reader is SimpleNamespace" in message


async def test_a_redis_py_outside_the_tested_range_falls_back_by_itself(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(replies_module, "TESTED_REDIS", ((7, 0), (8, 0)))
    async with _connected(redis_server.port, unique("tap")) as conn:
        message = await _falls_back(caplog, conn, redis_server.port)
        assert "outside the tested range 7.0 to below 8.0" in message


async def test_fast_false_picks_the_public_reader_without_a_check_or_a_warning(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with _connected(redis_server.port, unique("tap")) as conn:
        with caplog.at_level(logging.WARNING, logger="service.broker.replies"):
            reader = reply_reader(conn, lambda reply: None, fast=False)
        assert type(reader) is ReplyTask
        assert replies_module._verdict is None  # not checked: nothing was wanted of it
        assert not caplog.records
        await reader.aclose()


async def test_a_sound_redis_py_passes_the_check(redis_server: RedisServer) -> None:
    async with _connected(redis_server.port, unique("tap")) as conn:
        assert replies_module.tap_problem(conn) == ""
        reader = reply_reader(conn, lambda reply: None, fast=True)
        assert type(reader) is ReplyTap
        await reader.aclose()


@asynccontextmanager
async def _scripted_redis() -> AsyncIterator[int]:
    """A fake Redis on a free port: +OK to anything, PONG to PING, and two error replies.

    LOADINGPLEASE gets LOADING, TOOMANY gets "max number of clients reached": error
    replies redis-py raises as connection errors, which a real Redis sends only when
    it is loading or full.
    """
    answers = {
        b"LOADINGPLEASE": b"-LOADING Redis is loading the dataset in memory\r\n",
        b"TOOMANY": b"-ERR max number of clients reached\r\n",
        b"PING": b"+PONG\r\n",
    }

    served: list[asyncio.Task[Any]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(asyncio.current_task())  # type: ignore[arg-type]
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    writer.write(answers.get(command[0].upper(), b"+OK\r\n"))
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        # Each client has gone by now: let its handler see the end before the loop does.
        await asyncio.wait_for(asyncio.gather(*served), 5)
        await server.wait_closed()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_reader_reads_a_tls_connection(tmp_path: Path, loop: str, fast: bool) -> None:
    # rediss:// URLs: the transport is an SSL one (uvloop's in the service), whose
    # protocol the tap takes over like a plain socket's.
    cert, key = self_signed_certificate(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [
            *("redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
            *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
            *("--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"),
            *("--save", "", "--appendonly", "no", "--dir", str(tmp_path)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )

    async def exchange() -> None:
        conn = SSLConnection(
            host="127.0.0.1",
            port=port,
            protocol=2,
            ssl_ca_certs=str(cert),
            ssl_cert_reqs="required",
        )
        await async_wait_for(_connects(conn), what="redis-server over TLS")
        replies: list[Any] = []
        reader = _reader(conn, replies.append, fast)
        big = "y" * 200_000
        reader.write(_pack("PING") + _pack("ECHO", big))
        await _until(lambda: len(replies) == 2, what="two replies over TLS")
        assert replies == [b"PONG", big.encode()]
        await conn.send_command("ECHO", "through redis-py", check_health=False)
        await _until(lambda: len(replies) == 3, what="the echo")
        assert replies[2] == b"through redis-py"
        await conn.disconnect()
        assert isinstance(await asyncio.wait_for(reader.ended, 5), RedisConnectionError)
        await reader.aclose()

    try:
        if loop == "uvloop":
            uvloop.run(exchange())
        else:
            asyncio.run(exchange())
    finally:
        server.terminate()
        server.wait(timeout=10)


def _connects(conn: SSLConnection) -> Callable[[], Awaitable[bool]]:
    async def attempt() -> bool:
        await conn.connect()  # type: ignore[no-untyped-call]
        return True

    return attempt
