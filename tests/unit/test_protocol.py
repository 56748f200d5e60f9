"""Protocol v1: command parsing, error codes, frame encoding."""

from __future__ import annotations

import json

import orjson
import pytest

from service.errors import BrokerUnavailable, OutcomeUnknown, ProtocolError
from service.protocol import frames
from service.protocol.codes import CloseCode, ErrorCode
from service.protocol.commands import (
    Limits,
    Ping,
    Publish,
    Subscribe,
    Unsubscribe,
    parse_command,
    validate_idempotency_key,
)

LIMITS = Limits(max_channel_length=20, max_data_bytes=64)
TOO_LARGE = ErrorCode.MESSAGE_TOO_LARGE


def parse(frame: object) -> object:
    return parse_command(frame if isinstance(frame, str) else json.dumps(frame), LIMITS)


def error_of(frame: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(frame)
    return info.value


def test_parses_every_command() -> None:
    assert parse({"type": "subscribe", "channel": "news"}) == Subscribe("news")
    assert parse({"type": "subscribe", "channel": "news", "since": "41", "ref": 3}) == Subscribe(
        "news", "41", None, 3
    )
    assert parse({"type": "unsubscribe", "channel": "a:b", "ref": "x"}) == Unsubscribe("a:b", "x")
    assert parse({"type": "ping"}) == Ping()
    assert parse({"type": "publish", "channel": "c", "data": {"b": [1, 2]}}) == Publish(
        "c", b'{"b":[1,2]}'
    )


def test_publish_data_may_be_any_json_value_including_null() -> None:
    for value in (None, 0, "s", [1], {"k": None}, True):
        command = parse({"type": "publish", "channel": "c", "data": value})
        assert isinstance(command, Publish)
        assert orjson.loads(command.data) == value


def test_subscribe_info_is_kept_as_json() -> None:
    command = parse({"type": "subscribe", "channel": "c", "info": {"name": "ann"}})
    assert command == Subscribe("c", None, b'{"name":"ann"}')


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{", ErrorCode.INVALID_JSON),
        ("", ErrorCode.INVALID_JSON),
        ("[1, 2]", ErrorCode.INVALID_FRAME),
        ('"subscribe"', ErrorCode.INVALID_FRAME),
        ("{}", ErrorCode.UNKNOWN_TYPE),
        ('{"type": "shout"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": 5}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "subscribe"}', ErrorCode.INVALID_CHANNEL),
        ('{"type": "subscribe", "channel": ""}', ErrorCode.INVALID_CHANNEL),
        ('{"type": "subscribe", "channel": 7}', ErrorCode.INVALID_CHANNEL),
        ('{"type": "subscribe", "channel": "has space"}', ErrorCode.INVALID_CHANNEL),
        ('{"type": "subscribe", "channel": "star*"}', ErrorCode.INVALID_CHANNEL),
        ('{"type": "subscribe", "channel": "' + "x" * 21 + '"}', ErrorCode.INVALID_CHANNEL),
        ('{"type": "subscribe", "channel": "c", "since": 5}', ErrorCode.INVALID_FRAME),
        ('{"type": "unsubscribe"}', ErrorCode.INVALID_CHANNEL),
        ('{"type": "publish", "channel": "c"}', ErrorCode.INVALID_FRAME),
        ('{"type": "publish", "data": 1}', ErrorCode.INVALID_CHANNEL),
        ('{"type": "publish", "channel": "c", "data": "' + "x" * 63 + '"}', TOO_LARGE),
        ('{"type": "subscribe", "channel": "c", "info": "' + "x" * 63 + '"}', TOO_LARGE),
        ('{"type": "ping", "ref": {"a": 1}}', ErrorCode.INVALID_FRAME),
        ('{"type": "ping", "ref": true}', ErrorCode.INVALID_FRAME),
        ('{"type": "ping", "ref": "' + "r" * 129 + '"}', ErrorCode.INVALID_FRAME),
    ],
)
def test_bad_frames_get_a_specific_code(text: str, code: ErrorCode) -> None:
    assert error_of(text).code is code


def test_publish_takes_an_optional_idempotency_key() -> None:
    command = {"type": "publish", "channel": "c", "data": 1, "ref": 2}
    assert parse(command) == Publish("c", b"1", 2)
    assert parse({**command, "idempotency_key": None}) == Publish("c", b"1", 2)
    uuid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    assert parse({**command, "idempotency_key": uuid}) == Publish("c", b"1", 2, uuid)
    for key in ("k", "!~{}:*", "x" * 64):
        assert validate_idempotency_key(key) == key


@pytest.mark.parametrize("key", [5, True, ["k"], "", " ", "a b", "tab\t", "x" * 65, "cl\u00e9"])
def test_a_bad_idempotency_key_is_invalid_frame_and_says_what_a_key_is(key: object) -> None:
    error = error_of(
        {"type": "publish", "channel": "c", "data": 1, "idempotency_key": key, "ref": 7}
    )
    assert (error.code, error.ref) == (ErrorCode.INVALID_FRAME, 7)
    assert error.message.startswith("idempotency_key must be 1 to 64 visible ASCII characters")
    with pytest.raises(ProtocolError) as header:
        validate_idempotency_key(key, what="the Idempotency-Key header")
    assert header.value.message.startswith("the Idempotency-Key header must be 1 to 64")


def test_data_exactly_at_the_limit_is_accepted() -> None:
    data = "x" * 62  # 64 bytes with its quotes
    assert isinstance(parse({"type": "publish", "channel": "c", "data": data}), Publish)


def test_the_ref_is_echoed_in_errors_once_it_is_usable() -> None:
    assert error_of({"type": "nope", "ref": 9}).ref == 9
    assert error_of({"type": "publish", "channel": "c", "ref": "r1"}).ref == "r1"
    assert error_of({"type": "subscribe", "channel": "bad name", "ref": "r2"}).ref == "r2"
    assert error_of("not json").ref is None


def test_message_frame_halves_splice_into_valid_json() -> None:
    head, tail = frames.message_parts('we"ird', b'{"a":"\\u00e9"}')
    frame = json.loads(head + b"17" + tail)
    assert frame == {"type": "message", "channel": 'we"ird', "id": "17", "data": {"a": "\u00e9"}}
    assert list(frame) == ["type", "channel", "id", "data"]


def test_server_frames() -> None:
    assert json.loads(frames.subscribed("c", 1)) == {"type": "subscribed", "channel": "c", "ref": 1}
    assert json.loads(frames.subscribed("c", None, False)) == {
        "type": "subscribed",
        "channel": "c",
        "recovered": False,
    }
    assert json.loads(frames.published("c", "5", "r")) == {
        "type": "published",
        "channel": "c",
        "id": "5",
        "ref": "r",
    }
    assert json.loads(frames.error(ErrorCode.NOT_SUBSCRIBED, "why", 3)) == {
        "type": "error",
        "code": "not_subscribed",
        "message": "why",
        "ref": 3,
    }
    assert json.loads(frames.pong(None)) == {"type": "pong"}
    assert json.loads(frames.presence_event("leave", "c", b'{"name":"a"}')) == {
        "type": "leave",
        "channel": "c",
        "info": {"name": "a"},
    }


def test_an_unknown_outcome_is_an_outage_with_a_code_of_its_own() -> None:
    # Whoever handles `BrokerUnavailable` handles it too; the client is told apart.
    error = OutcomeUnknown("may have been published")
    assert isinstance(error, BrokerUnavailable)
    assert (error.code, BrokerUnavailable("x").code) == (
        ErrorCode.OUTCOME_UNKNOWN,
        ErrorCode.UNAVAILABLE,
    )
    assert ErrorCode.OUTCOME_UNKNOWN.value == "outcome_unknown"


def test_close_codes_are_the_documented_ones() -> None:
    assert {c.name: c.value for c in CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "POLICY_VIOLATION": 1008,
        "MESSAGE_TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011,
        "SERVICE_RESTART": 1012,
        "TRY_AGAIN_LATER": 1013,
    }
