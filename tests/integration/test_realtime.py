"""`Realtime` in-process: its lifespan, publish and history, on a real Redis."""

from __future__ import annotations

import pytest
from fastapi import FastAPI

from service import Realtime, Refused, Settings
from service.errors import ProtocolError
from tests.helpers import RedisServer, unique


def realtime_on(redis_server: RedisServer) -> Realtime:
    settings = Settings(  # type: ignore[call-arg]
        broadcast_url=redis_server.url, redis_prefix=unique("rt") + ":", max_data_bytes=100
    )
    return Realtime(settings)


async def test_publish_returns_the_id_that_history_then_holds(redis_server: RedisServer) -> None:
    realtime = realtime_on(redis_server)
    async with realtime.lifespan():
        first = await realtime.publish("orders", {"id": 1})
        second = await realtime.publish("orders", [2])
        read = await realtime.history("orders", limit=10)
        assert read.position == second
        assert [(m.id, m.data) for m in read.messages] == [(first, {"id": 1}), (second, [2])]
        after = await realtime.history("orders", since=first)
        assert after.recovered is True
        assert [m.id for m in after.messages] == [second]
        unknown = await realtime.history("orders", since="not-an-id")
        assert unknown.recovered is False


async def test_an_idempotency_key_publishes_once(redis_server: RedisServer) -> None:
    realtime = realtime_on(redis_server)
    async with realtime.lifespan():
        first = await realtime.publish("orders", 1, idempotency_key="order-1-shipped")
        again = await realtime.publish("orders", 1, idempotency_key="order-1-shipped")
        assert again == first
        assert len((await realtime.history("orders")).messages) == 1


async def test_bad_input_raises_what_it_is(redis_server: RedisServer) -> None:
    realtime = realtime_on(redis_server)
    with pytest.raises(RuntimeError, match="not running"):
        await realtime.publish("orders", 1)
    async with realtime.lifespan():
        with pytest.raises(ProtocolError) as bad_channel:
            await realtime.publish("no spaces", 1)
        assert bad_channel.value.code == "invalid_channel"
        with pytest.raises(ProtocolError) as too_large:
            await realtime.publish("orders", "x" * 200)
        assert too_large.value.code == "message_too_large"
        with pytest.raises(ProtocolError):
            await realtime.publish("orders", 1, idempotency_key="has spaces")
        with pytest.raises(ValueError, match="limit"):
            await realtime.history("orders", limit=0)
        with pytest.raises(ValueError, match="limit"):
            await realtime.history("orders", limit=1001)
        with pytest.raises(RuntimeError, match="running already"):
            async with realtime.lifespan():
                pass


async def test_two_realtimes_in_one_app_refuse_to_start(redis_server: RedisServer) -> None:
    app = FastAPI()
    app.include_router(realtime_on(redis_server).router, prefix="/a")
    app.include_router(realtime_on(redis_server).router, prefix="/b")
    with pytest.raises(RuntimeError, match="one Realtime per app"):
        async with app.router.lifespan_context(app):
            pass


def test_refusal_codes_are_checked_where_they_are_made() -> None:
    assert Refused("no", "banned_word").wire_code() == "banned_word"
    assert Refused("no").wire_code() == "forbidden"
    with pytest.raises(ValueError, match="lower-case"):
        Refused("no", "Banned Word")
    # The service's own codes mean something to clients (they retry `unavailable`).
    for code in ("unavailable", "outcome_unknown", "invalid_token", "internal"):
        with pytest.raises(ValueError, match="the service's own"):
            Refused("no", code)
