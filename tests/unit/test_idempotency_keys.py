"""Idempotency keys where no I/O is involved: the publish script's keys, memory://."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from service.broker.history import MemoryHistory, Position, Replayed
from service.broker.redis_history import publish_call, publish_token_ttl


def call(key: str | None, key_ttl: int = 300, token_ttl: int = 20) -> tuple[list[str], int]:
    """The publish script's KEYS and token TTL for one message to `chat:1`."""
    keys, args = publish_call(
        "chat:1",
        b'"hi"',
        prefix="p:",
        pubsub_key=b"p:chat:1",
        publish_command=b"PUBLISH",
        size=100,
        ttl=300,
        meta_ttl=604_800,
        token_ttl=token_ttl,
        key=key,
        key_ttl=key_ttl,
    )
    assert all(isinstance(k, str) for k in keys)
    ttl = args[7]  # ARGV[8], the token TTL
    assert isinstance(ttl, int)
    return [str(k) for k in keys], ttl


def test_without_a_key_each_publish_has_a_random_token_kept_for_its_retries() -> None:
    (_, _, token), ttl = call(None)
    assert token.startswith("p:pub:{chat:1}:")
    assert call(None)[0][2] != token
    assert ttl == 20


def test_a_key_is_the_token_in_the_channel_slot_kept_for_its_ttl() -> None:
    (meta, stream, token), ttl = call("order-17")
    assert token == "p:idem:{chat:1}:order-17"
    assert call("order-17")[0][2] == token
    assert ttl == 300
    # Braces in a key do not move it to another Cluster slot: the channel's tag comes first.
    braced = call("{x}")[0][2]
    assert key_slot(token.encode()) == key_slot(braced.encode()) == key_slot(meta.encode())
    assert key_slot(stream.encode()) == key_slot(meta.encode())


def test_a_key_outlives_the_retries_of_its_own_publish_whatever_its_ttl() -> None:
    # Else a late retry of the same call could find the key gone and publish twice.
    token_ttl = publish_token_ttl(5.0)
    assert token_ttl == 20
    assert call("k", key_ttl=1, token_ttl=token_ttl)[1] == token_ttl


def test_memory_history_answers_a_known_key_with_the_first_id_and_publishes_nothing() -> None:
    now = [0.0]
    history = MemoryHistory(size=10, ttl=10, meta_ttl=100, key_ttl=5, clock=lambda: now[0])
    first, frame = history.publish("c", b"1", "k")
    assert frame is not None
    assert type(first) is str
    again, nothing = history.publish("c", b"2", "k")
    assert (again, nothing) == (first, None)
    assert isinstance(again, Replayed)
    position = Position.parse(first)
    assert position is not None
    assert history.latest("c", 10).position == position  # nothing numbered, nothing kept
    assert len(history.latest("c", 10).frames) == 1
    # Another channel, or no key: other publishes.
    other, _ = history.publish("d", b"1", "k")
    assert not isinstance(other, Replayed)
    plain, _ = history.publish("c", b"3")
    assert Position.parse(plain) == Position(position.epoch, 2)


@pytest.mark.parametrize(("elapsed", "replayed"), [(4.9, True), (5.0, False)])
def test_memory_history_forgets_a_key_after_key_ttl(elapsed: float, replayed: bool) -> None:
    now = [0.0]
    history = MemoryHistory(size=10, ttl=10, meta_ttl=100, key_ttl=5, clock=lambda: now[0])
    first, _ = history.publish("c", b"1", "k")
    now[0] = elapsed
    again, frame = history.publish("c", b"2", "k")
    assert (again == first) is replayed
    assert (frame is None) is replayed


def test_memory_history_drops_expired_keys() -> None:
    now = [0.0]
    history = MemoryHistory(size=10, ttl=10, meta_ttl=100, key_ttl=5, clock=lambda: now[0])
    for n in range(1000):
        history.publish("c", b"1", f"k{n}")
    now[0] = 6.0
    history.publish("c", b"1", "fresh")
    assert len(history._keys) == 1  # memory stays bounded by what one TTL holds
