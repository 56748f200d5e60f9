"""Property-based fuzzing of `/ws` (hypothesis) against a live worker and a real Redis.

Each example opens one connection, sends it a list of items (arbitrary text, bytes,
JSON values, command-shaped objects, or a mix of all on a few valid channels),
pipelined, then `{"type": "ping", "ref": "alive"}`, and checks what comes back:

* every frame is a text frame holding a JSON object of a known `type`, with the fields
  docs/protocol.md gives that type; the first one is `welcome`;
* each item gets exactly one reply (`subscribed`, `unsubscribed`, `published`, `pong`,
  `refreshed` or `error`), in order, of the kind the protocol prescribes for it (a model
  of the connection's subscriptions tells which); an `error` has a documented `code`
  (never `internal`, nor `unavailable` with Redis up) and a non-empty `message`;
* the reply to a command with a valid `ref` echoes it; one without a `ref` has none;
* `message`, `join`, `leave` and `gap` come only for channels the connection is
  subscribed to at that point of the stream;
* then the connection answers the ping, or it was closed: with 1009 exactly when a frame
  over `MAX_FRAME_BYTES` was sent, 1008 only after `rate_limited`, or 1013; never 1011,
  never a TCP connection dropped without a close frame;
* a bystander subscribed to one of the channels on the same worker receives, before a
  marker published over HTTP after the example, every message the example had
  acknowledged on that channel, intact and in order, and nothing whose publish was
  refused;
* the worker logs no `ERROR` and no `Traceback` for the example.

After each property the worker is still alive and ready. Examples are derandomized, so
CI is reproducible; TEST_FUZZ_EXAMPLES scales their number (e.g. 10 for a long run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from tests.helpers import (
    UNIT,
    Client,
    RedisServer,
    Worker,
    async_wait_for,
    redis_args,
    subscribed_client,
    unique,
)

MAX_FRAME_BYTES = 4000
MAX_DATA_BYTES = 1000
MAX_SUBSCRIPTIONS = 2  # small, so that sequences run into it
MAX_CHANNEL_LENGTH = 128  # the default
MAX_REF_LENGTH = 128
SLOTS = 4  # valid channels the commands use; slot 0 is the bystander's

REPLY_TYPES = frozenset({"subscribed", "unsubscribed", "published", "pong", "refreshed", "error"})
EVENT_TYPES = frozenset({"message", "join", "leave", "gap"})
KNOWN_TYPES = REPLY_TYPES | EVENT_TYPES | {"welcome"}
REQUIRED_FIELDS: dict[str, set[str]] = {
    "welcome": {"worker", "protocol"},
    "subscribed": {"channel"},
    "unsubscribed": {"channel"},
    "published": {"channel", "id"},
    "message": {"channel", "id", "data"},
    "join": {"channel", "info"},
    "leave": {"channel", "info"},
    "gap": {"channel"},
    "pong": set(),
    "refreshed": set(),
    "error": {"code", "message"},
}
ERROR_CODES = frozenset(
    {
        "invalid_json",
        "invalid_frame",
        "unknown_type",
        "invalid_channel",
        "message_too_large",
        "binary_not_supported",
        "already_subscribed",
        "not_subscribed",
        "unavailable",
        "internal",
        # coming with auth and abuse limits
        "forbidden",
        "rate_limited",
        "too_many_subscriptions",
        "invalid_token",
        "unauthorized",
    }
)
CLOSE_CODES = frozenset({1008, 1009, 1013})
KNOWN_FIELDS = {
    "ping": {"type", "ref"},
    "subscribe": {"type", "channel", "since", "info", "ref"},
    "unsubscribe": {"type", "channel", "ref"},
    "publish": {"type", "channel", "data", "ref"},
    "refresh": {"type", "token", "ref"},
}
CHANNEL = re.compile(r"[A-Za-z0-9_\-.:@]+")
ALIVE = {"type": "ping", "ref": "alive"}
EXAMPLES = float(os.environ.get("TEST_FUZZ_EXAMPLES", "1"))


@pytest.fixture(scope="module")
def fuzzed(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A worker with small limits; publish limits out of reach, so fuzzing tests the rest."""
    worker = Worker(
        tmp_path_factory.mktemp("fuzzed"),
        redis_args(
            redis_server,
            unique("fz") + ":",
            "--max-data-bytes",
            str(MAX_DATA_BYTES),
            "--max-frame-bytes",
            str(MAX_FRAME_BYTES),
            "--max-subscriptions",
            str(MAX_SUBSCRIPTIONS),
            "--publish-rate",
            "1000",
            "--publish-burst",
            "1000",
            "--channel-linger",
            "0.2",
        ),
    )
    worker.start()
    yield worker
    worker.stop()


# --- what is sent ----------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Stands for the n-th valid channel of the test (names are only known at run time)."""

    n: int


@dataclass(frozen=True)
class Big:
    """`part` repeated `times`: a large value hypothesis reports in a few characters."""

    part: str | bytes
    times: int


@dataclass(frozen=True)
class Json:
    """A JSON value sent as a text frame, with the `Slot`s and `Big`s in it expanded."""

    value: Any
    ascii: bool = True


Item = str | bytes | Big | Json


def wire(item: Item, channels: list[str]) -> str | bytes:
    """The frame `item` is sent as."""

    def expand(value: Any) -> Any:
        if isinstance(value, Slot):
            return channels[value.n]
        if isinstance(value, Big):
            return value.part * value.times
        raise TypeError(f"not JSON: {value!r}")

    if isinstance(item, Json):
        return json.dumps(item.value, ensure_ascii=item.ascii, default=expand)
    return expand(item) if isinstance(item, Big) else item


def oversized(frame: str | bytes) -> bool:
    """Whether `frame` is over MAX_FRAME_BYTES, which closes the connection with 1009."""
    size = len(frame) if isinstance(frame, bytes) else len(frame.encode())
    return size > MAX_FRAME_BYTES


def short(value: Any) -> str:
    """`value` for an assertion message."""
    text = repr(value)
    return text if len(text) <= 300 else f"{text[:300]}... ({len(text)} characters)"


def big(parts: st.SearchStrategy[Any], low: int, high: int) -> st.SearchStrategy[Big]:
    """Short `parts` repeated into values around the size limits."""
    return st.builds(Big, parts, st.integers(low, high))


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too: the service reads those as floats
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
big_texts = big(st.text(min_size=1, max_size=4), 200, 1400)
payloads = json_values | big_texts  # `data` and `info`, on both sides of MAX_DATA_BYTES
slots = st.sampled_from([Slot(n) for n in range(SLOTS)])
channel_like = st.from_regex(r"[A-Za-z0-9_.:@-]{1,10}", fullmatch=True) | big(
    st.sampled_from(["a", "b:", "c.d"]), 40, 70
)
valid_refs = st.integers(-(2**63), 2**64 - 1) | st.text(max_size=MAX_REF_LENGTH)
any_refs = (
    valid_refs
    | big(st.text(min_size=1, max_size=1), MAX_REF_LENGTH - 1, MAX_REF_LENGTH + 1)
    | st.integers()
    | json_values
)
command_types = st.sampled_from([*KNOWN_FIELDS, "dance", "Subscribe", ""]) | json_values


def command(kind: str, required: dict[str, Any], **extra: Any) -> st.SearchStrategy[Json]:
    """A well-formed command of `kind`: `required` fields and some of `extra`."""
    return st.tuples(st.fixed_dictionaries(required, optional=extra), st.booleans()).map(
        lambda drawn: Json({"type": kind, **drawn[0]}, drawn[1])
    )


well_formed = st.one_of(
    command("subscribe", {"channel": slots}, ref=valid_refs, since=st.text(max_size=12)),
    command("subscribe", {"channel": slots}, info=json_values),
    command("unsubscribe", {"channel": slots}, ref=valid_refs),
    command("publish", {"channel": slots, "data": json_values}, ref=valid_refs),
    command("ping", {}, ref=valid_refs),
    command("refresh", {"token": st.text(min_size=1, max_size=20)}, ref=valid_refs),
)
malformed = st.tuples(
    st.fixed_dictionaries(
        {"type": command_types},
        optional={
            "channel": slots | channel_like | st.text(max_size=10) | json_values,
            "ref": any_refs,
            "data": payloads,
            "since": st.text(max_size=12) | json_values,
            "info": payloads,
            "token": st.text(max_size=12) | json_values,
        },
    ),
    st.dictionaries(st.text(max_size=6), json_values, max_size=2),
    st.booleans(),
).map(lambda drawn: Json({**drawn[1], **drawn[0]}, drawn[2]))
texts = st.text() | big_texts
binaries = st.binary(max_size=64) | big(st.binary(min_size=1, max_size=4), 900, 4100)
json_frames = st.builds(Json, json_values | st.dictionaries(st.text(), json_values), st.booleans())
# Mostly commands, so that subscriptions, publishes and their messages interleave
# (`one_of` would drop repeated strategies: they are weighted by sampling instead).
other_frames = [malformed, st.text(), st.binary(max_size=64), json_frames, texts | binaries]
anything = st.sampled_from([*[well_formed] * 6, *other_frames]).flatmap(lambda s: s)
# Hypothesis keeps lists short; runs of them make sequences of about 10 (up to 60).
sequences = st.lists(st.lists(anything, min_size=1, max_size=12), min_size=1, max_size=5).map(
    lambda runs: [item for run in runs for item in run]
)

FUZZ = settings(
    max_examples=max(1, int(150 * EXAMPLES)),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# --- what must come back ---------------------------------------------------------------


NO_REF = object()  # the reply must not carry a ref
ANY_REF = object()  # the command's ref was bad: its error may echo it or not


@dataclass
class Expect:
    """The replies the protocol allows to one frame."""

    success: str | None = None  # the reply's type if it succeeds
    must: set[str] = field(default_factory=set)  # it fails with one of these codes...
    may: set[str] = field(default_factory=set)  # ...or one of these may refuse it anyway
    ref: Any = NO_REF
    command: dict[str, Any] | None = None


def valid_channel(channel: Any) -> bool:
    return (
        isinstance(channel, str)
        and len(channel) <= MAX_CHANNEL_LENGTH
        and CHANNEL.fullmatch(channel) is not None
    )


def encoded_size(value: Any) -> int:
    """Bytes of `value` as compact JSON, as `MAX_DATA_BYTES` counts them."""
    return len(orjson.dumps(value))


def normalized(value: Any) -> Any:
    """`value` as subscribers read it back."""
    return json.loads(orjson.dumps(value))


def expect_reply(frame: str | bytes, subscriptions: set[str]) -> Expect:
    """The replies docs/protocol.md allows to `frame`, given the subscriptions."""
    if isinstance(frame, bytes):
        return Expect(must={"binary_not_supported"})
    try:
        # orjson is the service's parser: what it reads (integers beyond 64 bits as
        # floats, no NaN, no 1e400) is what the service was sent.
        command = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return Expect(must={"invalid_json"})
    if not isinstance(command, dict):
        return Expect(must={"invalid_frame"})
    expect = Expect(command=command)
    ref = command.get("ref")
    if ref is None:
        expect.ref = NO_REF
    elif type(ref) is int or (type(ref) is str and len(ref) <= MAX_REF_LENGTH):
        expect.ref = ref
    else:
        expect.ref = ANY_REF
        expect.must.add("invalid_frame")
    kind = command.get("type")
    if not isinstance(kind, str) or kind not in KNOWN_FIELDS:
        expect.must.add("unknown_type")
        if "type" in command and not isinstance(kind, str):
            expect.may.add("invalid_frame")  # "a field of the wrong type" fits too
        return expect
    if command.keys() - KNOWN_FIELDS[kind]:
        expect.may.add("invalid_frame")  # unknown fields: the docs do not say
    if kind == "ping":
        expect.success = "pong"
    elif kind == "refresh":
        expect.success = "refreshed"
        expect.may.add("invalid_token")
        token = command.get("token")
        if not isinstance(token, str) or not token:
            expect.must.add("invalid_frame")
    else:
        _expect_channel_command(kind, command, subscriptions, expect)
    return expect


def _expect_channel_command(
    kind: str, command: dict[str, Any], subscriptions: set[str], expect: Expect
) -> None:
    channel = command.get("channel")
    if not valid_channel(channel):
        expect.must.add("invalid_channel")
        if "channel" in command and not isinstance(channel, str):
            expect.may.add("invalid_frame")
    if kind == "publish":
        expect.success = "published"
        expect.may.add("rate_limited")
        if "data" not in command:
            expect.must.add("invalid_frame")
        elif encoded_size(command["data"]) > MAX_DATA_BYTES:
            expect.must.add("message_too_large")
        return
    if kind == "subscribe":
        expect.success = "subscribed"
        since, info = command.get("since"), command.get("info")
        if since is not None and not isinstance(since, str):
            expect.must.add("invalid_frame")
        if info is not None and encoded_size(info) > MAX_DATA_BYTES:
            expect.must.add("message_too_large")
    else:
        expect.success = "unsubscribed"
    if not valid_channel(channel):
        return
    # With a fault in the frame too, the docs do not say which one is reported.
    state = expect.may if expect.must else expect.must
    if kind == "unsubscribe" and channel not in subscriptions:
        state.add("not_subscribed")
    elif kind == "subscribe" and channel in subscriptions:
        state.add("already_subscribed")
    elif kind == "subscribe" and len(subscriptions) >= MAX_SUBSCRIPTIONS:
        state.add("too_many_subscriptions")


def check_frame(raw: str | bytes) -> dict[str, Any]:
    """A frame from the worker: a JSON object of a known type, with that type's fields."""
    assert isinstance(raw, str), f"the worker sent a binary frame: {raw!r}"
    frame = json.loads(raw)
    assert isinstance(frame, dict), f"not a JSON object: {raw}"
    kind = frame.get("type")
    assert kind in KNOWN_TYPES, f"unknown frame type: {raw}"
    missing = REQUIRED_FIELDS[kind] - frame.keys()
    assert not missing, f"{kind} frame without {sorted(missing)}: {raw}"
    if "channel" in REQUIRED_FIELDS[kind]:
        assert valid_channel(frame["channel"]), raw
    if kind == "error":
        assert frame["code"] in ERROR_CODES, f"undocumented error code: {raw}"
        assert isinstance(frame["message"], str), raw
        assert frame["message"].strip(), f"error without a message: {raw}"
    if kind in ("published", "message"):
        assert isinstance(frame["id"], str), raw
        assert frame["id"], raw
    return frame


def same(a: Any, b: Any) -> bool:
    """Equal and of one type (the ref 1 is neither the ref "1" nor 1.0)."""
    return type(a) is type(b) and a == b


# --- one fuzzed connection -------------------------------------------------------------


@dataclass
class Conversation:
    """What one fuzzed connection was sent, and what it has answered so far."""

    sent: list[str | bytes] = field(default_factory=list)
    subscriptions: set[str] = field(default_factory=set)
    replies: int = 0
    rate_limited: bool = False
    acked: list[tuple[str, str, Any]] = field(default_factory=list)  # channel, id, data

    def on_reply(self, reply: dict[str, Any]) -> None:
        frame = self.sent[self.replies]
        self.replies += 1
        expect = expect_reply(frame, self.subscriptions)
        context = f"sent {short(frame)}, subscribed to {sorted(self.subscriptions)}, got {reply}"
        if reply["type"] == "error":
            allowed = (expect.must | expect.may) if expect.must else expect.may
            assert reply["code"] in allowed, f"expected one of {sorted(allowed)}: {context}"
            self.rate_limited |= reply["code"] == "rate_limited"
        else:
            assert not expect.must, f"expected an error, one of {sorted(expect.must)}: {context}"
            assert reply["type"] == expect.success, f"expected {expect.success}: {context}"
            assert expect.command is not None
            self._on_success(expect.command, reply, context)
        if expect.ref is NO_REF:
            assert "ref" not in reply, f"a ref nobody sent: {context}"
        elif expect.ref is not ANY_REF:
            assert same(reply.get("ref"), expect.ref), f"ref not echoed: {context}"

    def _on_success(self, command: dict[str, Any], reply: dict[str, Any], context: str) -> None:
        kind = reply["type"]
        if kind in ("subscribed", "unsubscribed", "published"):
            assert reply["channel"] == command["channel"], context
        if kind == "subscribed":
            self.subscriptions.add(reply["channel"])
            if isinstance(command.get("since"), str):
                assert isinstance(reply.get("recovered"), bool), context
            if "position" in reply:
                assert isinstance(reply["position"], str), context
        elif kind == "unsubscribed":
            self.subscriptions.discard(reply["channel"])
        elif kind == "published":
            self.acked.append((reply["channel"], reply["id"], normalized(command["data"])))

    def on_event(self, event: dict[str, Any]) -> None:
        assert event["channel"] in self.subscriptions, (
            f"{event} on a channel not subscribed to (subscribed: {sorted(self.subscriptions)})"
        )

    def unanswered(self) -> list[str | bytes]:
        return self.sent[self.replies :]


async def recv(client: Client, timeout: float = 3.0) -> str | bytes:
    return await asyncio.wait_for(client.connection.recv(), timeout * UNIT)


async def converse(client: Client, frames: list[str | bytes]) -> Conversation:
    """Send `frames` and the alive ping, pipelined; check everything that comes back."""
    welcome = check_frame(await recv(client))
    assert welcome["type"] == "welcome", welcome
    assert welcome["protocol"] == 1, welcome
    conversation = Conversation()
    for frame in frames:
        try:
            await client.send(frame)
        except ConnectionClosed:
            break
        conversation.sent.append(frame)
        if oversized(frame):
            break
    too_big = bool(conversation.sent) and oversized(conversation.sent[-1])
    answerable = len(conversation.sent) - int(too_big)
    if not too_big:
        with contextlib.suppress(ConnectionClosed):
            await client.send(ALIVE)
    while True:
        try:
            raw = await recv(client)
        except ConnectionClosed as closed:
            _check_close(closed, conversation, too_big)
            return conversation
        frame = check_frame(raw)
        if frame["type"] in EVENT_TYPES:
            conversation.on_event(frame)
            continue
        assert frame["type"] in REPLY_TYPES, f"{frame} after the welcome"
        if conversation.replies == answerable:
            assert not too_big, f"{frame}: a reply to a frame over the size limit"
            assert frame == {"type": "pong", "ref": "alive"}, frame
            return conversation
        conversation.on_reply(frame)


def _check_close(closed: ConnectionClosed, conversation: Conversation, too_big: bool) -> None:
    assert closed.rcvd is not None, (
        f"connection dropped without a close frame after {conversation.replies} replies"
    )
    code = closed.rcvd.code
    context = f"closed with {code} ({closed.rcvd.reason!r}) after {conversation.replies} replies"
    assert code in CLOSE_CODES, context
    if code == 1009:
        assert too_big, f"{context}, yet no frame was over {MAX_FRAME_BYTES} bytes"
    if code == 1008:
        assert conversation.rate_limited, f"{context}, without a rate_limited error first"


def _command_on(frame: str | bytes, channel: str) -> dict[str, Any] | None:
    """The JSON object `frame` holds, if its `channel` is `channel`."""
    if isinstance(frame, bytes):
        return None
    try:
        command = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    if isinstance(command, dict) and command.get("channel") == channel:
        return command
    return None


# --- the fuzzer ------------------------------------------------------------------------


class Fuzzer:
    """Runs examples on one event loop, beside a bystander subscribed to channel 0."""

    def __init__(self, worker: Worker, runner: asyncio.Runner) -> None:
        self.worker = worker
        self.runner = runner
        # One HTTP client for all examples (a new one per request costs more than the rest).
        self.http = httpx.AsyncClient(base_url=worker.http, timeout=5 * UNIT)
        base = unique("fz")
        self.channels = [f"{base}:{n}" for n in range(SLOTS)]
        self.channel = self.channels[0]
        self.bystander: Client | None = None
        self.in_step = False  # whether the bystander has read up to the last marker
        # On channel 0: data of publishes that got no reply (they may have happened),
        # and every `info` sent.
        self.unanswered_data: list[Any] = []
        self.infos: list[Any] = []
        self.log_seen = len(worker.log())

    def exercise(self, items: list[Item]) -> None:
        self.runner.run(self._exercise([wire(item, self.channels) for item in items]))

    async def close(self) -> None:
        if self.bystander is not None:
            await self.bystander.close()

    async def aclose(self) -> None:
        await self.close()
        await self.http.aclose()

    async def _exercise(self, frames: list[str | bytes]) -> None:
        if not self.in_step:
            # A failed example may have left frames unread: start over.
            await self.close()
            self.bystander = await subscribed_client(self.worker, self.channel)
        self.in_step = False
        for frame in frames:
            command = _command_on(frame, self.channel)
            if command is not None and command.get("info") is not None:
                self.infos.append(normalized(command["info"]))
        client = await Client.connect(self.worker.ws + "/ws")
        try:
            conversation = await converse(client, frames)
        finally:
            await client.close()
        for frame in conversation.unanswered():
            command = _command_on(frame, self.channel)
            if command is not None and command.get("type") == "publish" and "data" in command:
                self.unanswered_data.append(normalized(command["data"]))
        await self._check_bystander(
            [(i, data) for channel, i, data in conversation.acked if channel == self.channel]
        )
        await self._check_log()
        self.in_step = True

    async def _check_bystander(self, acked: list[tuple[str, Any]]) -> None:
        """The bystander got what was published on its channel, then a fresh marker."""
        assert self.bystander is not None
        marker = f"marker-{uuid.uuid4().hex}"
        response = await self.http.post(
            f"/api/channels/{self.channel}/messages", json={"data": marker}
        )
        assert response.status_code == 200, response.text
        received: list[tuple[str, Any]] = []
        while True:
            frame = check_frame(await recv(self.bystander))
            assert frame["type"] in EVENT_TYPES, f"bystander got {frame}"
            assert frame["channel"] == self.channel, f"bystander got {frame}"
            if frame["type"] in ("join", "leave"):
                assert frame["info"] in self.infos, f"bystander got {frame}: nobody sent it"
            elif frame["type"] == "message":
                if frame["data"] == marker:
                    break
                received.append((frame["id"], frame["data"]))
        ids = [message_id for message_id, _ in received]
        positions = []
        for message_id, data in acked:
            assert message_id in ids, f"bystander never got {message_id}: {short(received)}"
            positions.append(ids.index(message_id))
            assert received[positions[-1]][1] == data, f"{message_id} altered: {short(received)}"
        assert positions == sorted(positions), f"out of order: {acked} vs {short(received)}"
        acked_ids = {message_id for message_id, _ in acked}
        for message_id, data in received:
            if message_id not in acked_ids:
                assert data in self.unanswered_data, (
                    f"bystander got {message_id} {short(data)}, which no publish sent"
                )

    async def _check_log(self) -> None:
        """The worker logged no error for this example, once it released the connection."""

        async def released() -> bool:
            # Only the bystander left: the fuzzed connection's handler has logged its end.
            metrics = (await self.http.get("/metrics")).text.splitlines()
            gauge = [line for line in metrics if line.startswith("broadcast_connections ")]
            return [float(line.rsplit(" ", 1)[1]) for line in gauge] == [1.0]

        await async_wait_for(released, what="the fuzzed connection to be released")
        self.check_log_since_last_time()

    def check_log_since_last_time(self) -> None:
        log = self.worker.log()
        new, self.log_seen = log[self.log_seen :], len(log)
        if "Traceback" in new or "ERROR" in new:
            raise AssertionError(f"the worker logged an error:\n{new}")

    def check_worker_healthy(self) -> None:
        """After a property: the worker is alive, ready, and logged no error since."""
        process = self.worker.process
        assert process is not None
        assert process.poll() is None, f"worker died:\n{self.worker.log()}"
        assert self.worker.status("/readyz") == 200
        self.check_log_since_last_time()


@pytest.fixture
def fuzzer(fuzzed: Worker) -> Iterator[Fuzzer]:
    """A fuzzer on an event loop of its own: hypothesis tests are synchronous."""
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        fuzzer = Fuzzer(fuzzed, runner)
        try:
            yield fuzzer
        finally:
            runner.run(fuzzer.aclose())


# --- the properties --------------------------------------------------------------------


def test_arbitrary_text_frames(fuzzer: Fuzzer) -> None:
    @FUZZ
    @given(st.lists(texts, min_size=1, max_size=4))
    @example([Big("x", MAX_FRAME_BYTES)])
    @example([Big("é", MAX_FRAME_BYTES // 2)])
    @example([Big("x", MAX_FRAME_BYTES + 1)])
    @example(["", " ", "{}", "[]", "null", '{"type":"ping"}', "1e400", "\ufeff{}"])
    # A reply still queued when the worker closes with 1009 (a race: fails most runs).
    @example(['{"type":"ping"}', Big("x", MAX_FRAME_BYTES + 1)])
    def check(items: list[Item]) -> None:
        fuzzer.exercise(items)

    check()
    fuzzer.check_worker_healthy()


def test_arbitrary_binary_frames(fuzzer: Fuzzer) -> None:
    @FUZZ
    @given(st.lists(binaries, min_size=1, max_size=4))
    @example([b"", b'{"type":"ping"}'])
    @example([Big(b"\x00", MAX_FRAME_BYTES)])
    @example([Big(b"\xff", MAX_FRAME_BYTES + 1)])
    def check(items: list[Item]) -> None:
        fuzzer.exercise(items)

    check()
    fuzzer.check_worker_healthy()


def test_arbitrary_json_values(fuzzer: Fuzzer) -> None:
    @FUZZ
    @given(st.lists(json_frames, min_size=1, max_size=4))
    @example([Json(2**64), Json(-(2**63) - 1), Json([]), Json({}), Json({"type": None})])
    def check(items: list[Item]) -> None:
        fuzzer.exercise(items)

    check()
    fuzzer.check_worker_healthy()


def test_command_shaped_objects(fuzzer: Fuzzer) -> None:
    @settings(FUZZ, max_examples=max(1, int(200 * EXAMPLES)))
    @given(st.lists(malformed | well_formed, min_size=1, max_size=6))
    @example([Json({"type": "ping", "ref": Big("r", MAX_REF_LENGTH)})])
    @example([Json({"type": "ping", "ref": Big("r", MAX_REF_LENGTH + 1)})])
    @example([Json({"type": "ping", "ref": 2**64 - 1}), Json({"type": "ping", "ref": 2**64})])
    @example([Json({"type": "ping", "ref": True}), Json({"type": "ping", "ref": 1.0})])
    @example([Json({"type": "publish", "channel": Slot(0), "data": Big("x", MAX_DATA_BYTES - 2)})])
    @example([Json({"type": "publish", "channel": Slot(0), "data": Big("x", MAX_DATA_BYTES - 1)})])
    @example([Json({"type": "subscribe", "channel": Big("c", MAX_CHANNEL_LENGTH)})])
    @example([Json({"type": "subscribe", "channel": Big("c", MAX_CHANNEL_LENGTH + 1)})])
    def check(items: list[Item]) -> None:
        fuzzer.exercise(items)

    check()
    fuzzer.check_worker_healthy()


def test_command_sequences(fuzzer: Fuzzer) -> None:
    @settings(FUZZ, max_examples=max(1, int(200 * EXAMPLES)))
    @given(sequences)
    def check(items: list[Item]) -> None:
        fuzzer.exercise(items)

    check()
    fuzzer.check_worker_healthy()
