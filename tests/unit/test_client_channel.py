"""The Python client's resume bookkeeping (service.client.channel), without I/O."""

from __future__ import annotations

from service.client import Lost, Subscribed
from service.client.channel import Subscription


def test_first_subscribe_has_no_since_and_carries_info() -> None:
    sub = Subscription("c", info={"name": "ann"})
    assert sub.subscribe_frame(7) == {
        "type": "subscribe",
        "channel": "c",
        "ref": 7,
        "info": {"name": "ann"},
    }


def test_resumes_from_the_last_message_else_from_the_position() -> None:
    sub = Subscription("c")
    assert sub.confirmed(Subscribed("c", None, "e:5")) is None
    assert sub.subscribe_frame(1)["since"] == "e:5"
    sub.saw_message("e:6")
    sub.saw_message("e:7")
    assert sub.subscribe_frame(2)["since"] == "e:7"


def test_a_recovered_resubscribe_loses_nothing() -> None:
    sub = Subscription("c")
    sub.confirmed(Subscribed("c"))
    sub.saw_message("e:7")
    assert sub.confirmed(Subscribed("c", True, "e:7")) is None
    assert sub.subscribe_frame(1)["since"] == "e:7"


def test_an_unrecovered_resubscribe_is_lost_and_moves_on_to_the_new_position() -> None:
    sub = Subscription("c")
    sub.confirmed(Subscribed("c"))
    sub.saw_message("e:7")
    assert sub.confirmed(Subscribed("c", False, "f:3")) == Lost("c", "not_recovered")
    assert sub.subscribe_frame(1)["since"] == "f:3"


def test_without_position_an_unrecovered_resubscribe_keeps_the_last_id() -> None:
    # Today's server: no position, ids are plain numbers, `since` never recovered.
    sub = Subscription("c")
    sub.confirmed(Subscribed("c"))
    sub.saw_message("42")
    assert sub.confirmed(Subscribed("c", False)) == Lost("c", "not_recovered")
    assert sub.subscribe_frame(1)["since"] == "42"


def test_a_resubscribe_with_nothing_to_resume_from_counts_as_lost() -> None:
    sub = Subscription("c")
    assert sub.confirmed(Subscribed("c")) is None  # the first subscribe
    assert "since" not in sub.subscribe_frame(1)
    assert sub.confirmed(Subscribed("c")) == Lost("c", "not_recovered")


def test_an_ended_connection_forgets_the_server_side_only() -> None:
    sub = Subscription("c", on_server=True, retries=3, last_id="e:1")
    sub.connection_ended()
    assert (sub.on_server, sub.retries, sub.last_id) == (False, 0, "e:1")
