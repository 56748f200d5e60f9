"""`ReplyTap` (service/broker/replies.py): reading a redis-py connection from its reads.

Against a real redis-server: the replies of a pipelined burst in order, error replies
as redis-py's exceptions, the ways a connection ends, redis-py's own writing and
closing still working once the tap has taken the reading over, and the same over TLS.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import hiredis
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from service.broker.replies import ReplyTap
from tests.helpers import RedisServer, async_wait_for, free_port, unique


async def _until(condition: Callable[[], Any], what: str) -> None:
    async def check() -> Any:
        return condition()

    await async_wait_for(check, what=what)


@asynccontextmanager
async def _connected(redis_server: RedisServer, name: str) -> AsyncIterator[Connection]:
    """A connected redis-py connection, disconnected (if it is not yet) on exit."""
    conn = Connection(port=redis_server.port, protocol=2, client_name=name)
    await conn.connect()  # type: ignore[no-untyped-call]
    try:
        yield conn
    finally:
        await conn.disconnect(nowait=True)


def _pack(*args: str | bytes | int) -> bytes:
    return hiredis.pack_command(args)  # type: ignore[arg-type]


async def test_a_pipelined_burst_comes_back_whole_and_in_order(
    redis_server: RedisServer,
) -> None:
    async with _connected(redis_server, unique("tap")) as conn:
        replies: list[Any] = []
        tap = ReplyTap(conn, replies.append)
        key = unique("k")
        big = "x" * 300_000  # split over several reads
        burst = [_pack("SET", key, big), _pack("GET", key)]
        burst += [_pack("ECHO", str(n)) for n in range(2000)]
        tap.transport.write(b"".join(burst))
        await _until(lambda: len(replies) == 2002, what="2002 replies")
        assert replies[0] == b"OK"
        assert replies[1] == big.encode()
        assert replies[2:] == [str(n).encode() for n in range(2000)]
        assert not tap.ended.done()


async def test_error_replies_arrive_as_redis_py_exceptions(redis_server: RedisServer) -> None:
    async with _connected(redis_server, unique("tap")) as conn:
        replies: list[Any] = []
        tap = ReplyTap(conn, replies.append)
        tap.transport.write(_pack("EVALSHA", "0" * 40, 0) + _pack("NOSUCHCOMMAND"))
        await _until(lambda: len(replies) == 2, what="two error replies")
        assert isinstance(replies[0], NoScriptError)
        assert isinstance(replies[1], ResponseError)
        assert not tap.ended.done()  # an error reply is a reply, not the end


async def test_a_reply_the_callback_refuses_ends_and_resets_the_connection(
    redis_server: RedisServer,
) -> None:
    name = unique("tap")
    ends: list[BaseException] = []

    def refuse(reply: Any) -> None:
        raise ValueError(f"unexpected {reply!r}")

    async with _connected(redis_server, name) as conn:
        tap = ReplyTap(conn, refuse, on_end=ends.append)
        tap.transport.write(_pack("PING"))
        reason = await asyncio.wait_for(tap.ended, 5)
        assert isinstance(reason, ValueError)
        assert ends == [reason]  # on_end: once, with the same reason
        assert tap.transport.is_closing()
        await _until(lambda: not redis_server.clients_named(name), what="reset")


async def test_redis_dropping_the_client_ends_the_tap_and_redis_py_sees_it(
    redis_server: RedisServer,
) -> None:
    name = unique("tap")
    ends: list[BaseException] = []
    async with _connected(redis_server, name) as conn:
        tap = ReplyTap(conn, lambda reply: None, on_end=ends.append)
        [client] = redis_server.clients_named(name)
        redis_server.client().client_kill_filter(_id=client["id"])
        reason = await asyncio.wait_for(tap.ended, 5)
        assert isinstance(reason, RedisConnectionError)
        assert ends == [reason]
        # redis-py's stream protocol heard the end too: its reader is at EOF.
        reader = conn._reader
        assert reader is not None
        await _until(reader.at_eof, what="redis-py's reader at EOF")


async def test_redis_py_still_writes_and_closes_through_its_streams(
    redis_server: RedisServer,
) -> None:
    name = unique("tap")
    async with _connected(redis_server, name) as conn:
        replies: list[Any] = []
        tap = ReplyTap(conn, replies.append)
        # redis-py's send_command writes and drains through its StreamWriter.
        await conn.send_command("ECHO", "through redis-py", check_health=False)
        await _until(lambda: replies == [b"through redis-py"], what="the echo")
        await conn.disconnect()  # waits for the stream to close: the tap passed the end on
        reason = await asyncio.wait_for(tap.ended, 5)
        assert isinstance(reason, RedisConnectionError)
    await _until(lambda: not redis_server.clients_named(name), what="closed")


async def test_a_connection_with_unread_replies_is_refused(redis_server: RedisServer) -> None:
    async with _connected(redis_server, unique("tap")) as conn:
        writer = conn._writer
        assert writer is not None
        writer.write(_pack("PING"))
        reader = conn._reader
        assert reader is not None
        # Let the reply reach redis-py's StreamReader, unread.
        await _until(lambda: bool(getattr(reader, "_buffer", b"")), what="a reply")
        with pytest.raises(RedisConnectionError, match="unread"):
            ReplyTap(conn, lambda reply: None)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (no openssl binary needed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_tap_reads_a_tls_connection(tmp_path: Path, loop: str) -> None:
    # rediss:// URLs: the transport is an SSL one (uvloop's in the service), whose
    # protocol the tap takes over like a plain socket's.
    cert, key = _self_signed(tmp_path)
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
        tap = ReplyTap(conn, replies.append)
        big = "y" * 200_000
        tap.transport.write(_pack("PING") + _pack("ECHO", big))
        await _until(lambda: len(replies) == 2, what="two replies over TLS")
        assert replies == [b"PONG", big.encode()]
        await conn.send_command("ECHO", "through redis-py", check_health=False)
        await _until(lambda: len(replies) == 3, what="the echo")
        assert replies[2] == b"through redis-py"
        await conn.disconnect()
        assert isinstance(await asyncio.wait_for(tap.ended, 5), RedisConnectionError)

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
