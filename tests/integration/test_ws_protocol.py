"""Protocol v1 on `/ws` against one real worker and a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from websockets.uri import parse_uri

from tests.helpers import UNIT, Client, Worker, seq_of, unique, wait_for


async def connect(worker: Worker) -> Client:
    client = await Client.connect(worker.ws + "/ws")
    welcome = await client.welcome()
    assert welcome["protocol"] == 1
    assert welcome["worker"]
    return client


async def test_subscribe_publish_receive(worker: Worker) -> None:
    channel = unique("news")
    alice, bob = await connect(worker), await connect(worker)
    reply = await alice.subscribe(channel, ref=1)
    # A fresh channel: its history starts now, before any message.
    epoch = reply["position"].removesuffix(":0")
    assert reply == {"type": "subscribed", "channel": channel, "position": f"{epoch}:0", "ref": 1}
    await bob.subscribe(channel)
    published = await bob.publish(channel, {"text": "hi"}, ref="p1")
    assert published["ref"] == "p1"
    assert published["channel"] == channel
    assert published["id"] == f"{epoch}:1"
    expected = {
        "type": "message",
        "channel": channel,
        "id": published["id"],
        "data": {"text": "hi"},
    }
    assert await alice.recv() == expected
    assert await bob.recv() == expected
    await alice.close()
    await bob.close()


async def test_ids_count_up_per_channel_within_one_epoch(worker: Worker) -> None:
    channel = unique("ids")
    client = await connect(worker)
    ids = [(await client.publish(channel, n))["id"] for n in range(5)]
    epochs = {message_id.rpartition(":")[0] for message_id in ids}
    assert len(epochs) == 1
    assert [seq_of(message_id) for message_id in ids] == [1, 2, 3, 4, 5]
    await client.close()


async def test_unsubscribe_stops_delivery(worker: Worker) -> None:
    channel, other = unique("u"), unique("u")
    client = await connect(worker)
    await client.subscribe(channel)
    await client.subscribe(other)
    await client.send({"type": "unsubscribe", "channel": channel, "ref": 5})
    assert await client.recv() == {"type": "unsubscribed", "channel": channel, "ref": 5}
    worker.publish(channel, "not for you")
    worker.publish(other, "for you")
    frame = await client.recv()
    assert frame["channel"] == other
    assert frame["data"] == "for you"
    await client.close()


async def test_ping_is_answered_with_its_ref(worker: Worker) -> None:
    client = await connect(worker)
    await client.send({"type": "ping", "ref": 42})
    assert await client.recv() == {"type": "pong", "ref": 42}
    await client.close()


BAD_INPUTS: list[tuple[Any, str, Any]] = [
    ("{not json", "invalid_json", None),
    ("[1, 2, 3]", "invalid_frame", None),
    ('"just a string"', "invalid_frame", None),
    ({"type": "dance", "ref": 1}, "unknown_type", 1),
    ({"channel": "x", "ref": 2}, "unknown_type", 2),
    ({"type": "subscribe", "ref": 3}, "invalid_channel", 3),
    ({"type": "subscribe", "channel": "white space", "ref": 4}, "invalid_channel", 4),
    ({"type": "subscribe", "channel": "x" * 200, "ref": 5}, "invalid_channel", 5),
    ({"type": "publish", "channel": "c", "ref": "no-data"}, "invalid_frame", "no-data"),
    ({"type": "publish", "channel": "c", "data": "x" * 1200, "ref": 7}, "message_too_large", 7),
    ({"type": "unsubscribe", "channel": "never", "ref": 8}, "not_subscribed", 8),
]


@pytest.mark.parametrize(("frame", "code", "ref"), BAD_INPUTS)
async def test_bad_input_gets_an_error_frame_and_everyone_carries_on(
    worker: Worker, frame: Any, code: str, ref: Any
) -> None:
    channel = unique("calm")
    offender, bystander = await connect(worker), await connect(worker)
    await bystander.subscribe(channel)
    await offender.send(frame)
    error = await offender.recv()
    assert error["type"] == "error"
    assert error["code"] == code
    assert error["message"]
    assert error.get("ref") == ref
    await offender.alive()
    # ...and it still works for real, as does everyone else's connection.
    published = await offender.publish(channel, "after the error")
    assert (await bystander.recv())["id"] == published["id"]
    await offender.close()
    await bystander.close()


async def test_binary_frame_gets_an_error(worker: Worker) -> None:
    client = await connect(worker)
    await client.send(b"\x00\x01binary")
    error = await client.recv()
    assert error["type"] == "error"
    assert error["code"] == "binary_not_supported"
    await client.alive()
    await client.close()


async def test_subscribing_twice_is_an_error(worker: Worker) -> None:
    channel = unique("twice")
    client = await connect(worker)
    await client.subscribe(channel)
    await client.send({"type": "subscribe", "channel": channel, "ref": "again"})
    error = await client.recv()
    assert (error["code"], error["ref"]) == ("already_subscribed", "again")
    # Still subscribed exactly once: one publish, one message.
    worker.publish(channel, 1)
    assert (await client.recv())["data"] == 1
    await client.alive()
    await client.close()


async def test_since_is_answered_honestly_without_history(worker: Worker) -> None:
    channel = unique("since")
    client = await connect(worker)
    reply = await client.subscribe(channel, since="12")
    assert reply["recovered"] is False
    await client.close()


async def test_oversized_frame_closes_with_1009_and_others_carry_on(worker: Worker) -> None:
    channel = unique("big")
    offender, bystander = await connect(worker), await connect(worker)
    await bystander.subscribe(channel)
    await offender.send("x" * 5000)  # over --max-frame-bytes 4000
    with pytest.raises(ConnectionClosed) as info:
        await offender.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1009
    worker.publish(channel, "still here")
    assert (await bystander.recv())["data"] == "still here"
    await bystander.close()


async def test_join_and_leave_events_with_info(worker: Worker) -> None:
    channel = unique("room")
    watcher, visitor = await connect(worker), await connect(worker)
    await watcher.subscribe(channel)
    await visitor.subscribe(channel, info={"name": "ann"})
    assert await watcher.recv() == {"type": "join", "channel": channel, "info": {"name": "ann"}}
    await visitor.close()
    assert await watcher.recv() == {"type": "leave", "channel": channel, "info": {"name": "ann"}}
    await watcher.close()


async def test_unsubscribe_announces_leave(worker: Worker) -> None:
    channel = unique("room")
    watcher, visitor = await connect(worker), await connect(worker)
    await watcher.subscribe(channel)
    await visitor.subscribe(channel, info="bo")
    assert (await watcher.recv())["type"] == "join"
    await visitor.send({"type": "unsubscribe", "channel": channel})
    assert await watcher.recv() == {"type": "leave", "channel": channel, "info": "bo"}
    await watcher.close()
    await visitor.close()


async def test_many_commands_in_flight_are_answered_in_order(worker: Worker) -> None:
    channel = unique("burst")
    client = await connect(worker)
    await client.subscribe(channel)
    for n in range(50):
        await client.send({"type": "publish", "channel": channel, "data": n, "ref": n})
    acks: list[int] = []
    messages: list[int] = []
    while len(acks) < 50 or len(messages) < 50:
        frame = await client.recv()
        (acks if frame["type"] == "published" else messages).append(
            frame["ref"] if frame["type"] == "published" else frame["data"]
        )
    assert acks == list(range(50))
    assert messages == list(range(50))
    await client.close()


async def test_simple_mode_publishes_text_and_receives_messages(worker: Worker) -> None:
    channel = unique("simple")
    a = await Client.connect(f"{worker.ws}/ws/{channel}")
    b = await Client.connect(f"{worker.ws}/ws/{channel}")
    full = await connect(worker)
    await full.subscribe(channel)
    for client in (a, b):
        await _until_subscribed(worker, channel, client)
    await a.send("hello from a")
    for client in (a, b, full):
        frame = await client.recv()
        while frame["data"] == "probe":  # probes precede it: one channel, one order
            frame = await client.recv()
        assert frame["type"] == "message"
        assert frame["data"] == "hello from a"
    await b.send(b"binary")
    assert (await b.recv())["code"] == "binary_not_supported"
    for client in (a, b, full):
        await client.close()


async def _until_subscribed(worker: Worker, channel: str, client: Client) -> None:
    # Simple mode says nothing when it is subscribed: publish probes until one arrives.
    for _ in range(100):
        worker.publish(channel, "probe")
        try:
            frame = await client.recv(timeout=0.1)
        except TimeoutError:
            continue
        assert frame["data"] == "probe"
        return
    raise AssertionError("simple-mode client never received a probe")


async def test_simple_mode_refuses_a_bad_channel_with_1008(worker: Worker) -> None:
    client = await Client.connect(f"{worker.ws}/ws/bad%20name")
    error = await client.recv()
    assert error["code"] == "invalid_channel"
    with pytest.raises(ConnectionClosed) as info:
        await client.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1008


async def test_disconnected_clients_are_released(worker: Worker, redis_server: Any) -> None:
    channel = unique("gone")
    # Earlier tests' clients may still be closing: start from a quiet worker.
    await asyncio.to_thread(_wait, lambda: worker.metric("broadcast_connections") == 0)
    clients = [await connect(worker) for _ in range(5)]
    for client in clients:
        await client.subscribe(channel)
    assert worker.metric("broadcast_connections") == 5
    key = _prefix_of(worker) + channel
    assert redis_server.client().pubsub_numsub(key)[0][1] == 1
    for client in clients[:3]:
        client.connection.transport.abort()  # vanish without a close frame
    for client in clients[3:]:
        await client.close()
    await asyncio.to_thread(_wait, lambda: worker.metric("broadcast_connections") == 0)
    # After the linger, this worker no longer subscribes to the channel in Redis.
    await asyncio.to_thread(_wait, lambda: redis_server.client().pubsub_numsub(key)[0][1] == 0)


def _wait(condition: Any) -> None:
    wait_for(condition, what="release")


def _prefix_of(worker: Worker) -> str:
    return worker.args[worker.args.index("--redis-prefix") + 1]


async def test_a_text_frame_inside_a_fragmented_message_closes_with_1002(worker: Worker) -> None:
    # RFC 6455 5.4: between a first fragment and its continuation only control frames
    # may come. The three parts go in separate reads (a pong proves each was read):
    # nothing of them may be published, and the connection fails with 1002.
    channel = unique("frag")
    listener = await connect(worker)
    await listener.subscribe(channel)
    reader, writer = await asyncio.open_connection(worker.host, worker.port)
    client = ClientProtocol(parse_uri(worker.ws + "/ws"))
    client.send_request(client.connect())

    async def exchange(until: Any) -> list[Any]:
        """Write what the client has to send, then read until `until(frames)` holds."""
        writer.write(b"".join(client.data_to_send()))
        seen: list[Any] = []
        while not until(seen):
            data = await asyncio.wait_for(reader.read(65536), 5 * UNIT)
            client.receive_data(data)
            seen += client.events_received()
            if not data:
                break
        return seen

    await exchange(lambda seen: client.state is not State.CONNECTING and seen)  # welcome
    head = '{"type":"publish","channel":"' + channel + '","data":"tru'
    client.send_text(head.encode(), fin=False)
    client.send_ping(b"1")
    await exchange(lambda seen: any(getattr(f, "data", None) == b"1" for f in seen))
    # websockets' client refuses to send it: another one serializes it (masked).
    rogue = ClientProtocol(parse_uri(worker.ws + "/ws"))
    rogue.state = State.OPEN
    rogue.send_text(('{"type":"publish","channel":"' + channel + '","data":"x"}').encode())
    writer.write(b"".join(rogue.data_to_send()))
    client.send_continuation(b'ncated"}', fin=True)
    await exchange(lambda seen: client.close_rcvd is not None)
    assert client.close_rcvd is not None
    assert client.close_rcvd.code == 1002
    writer.close()
    # Nothing was published: the next message the listener gets is this one.
    marker = worker.publish(channel, "after")
    assert await listener.recv() == {
        "type": "message",
        "channel": channel,
        "id": marker,
        "data": "after",
    }
    await listener.close()
