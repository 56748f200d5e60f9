"""The outbox's limits, and the room a resume's backlog gets above them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from service.connection import Connection
from service.metrics import Metrics


def outbox(max_messages: int = 10, max_chars: int = 100) -> Connection:
    # No socket is touched: nothing here runs the writer, and without uvicorn's own send
    # in the scope there are no direct writes either.
    websocket: Any = SimpleNamespace(scope={}, _send=None)
    return Connection(
        websocket,
        max_messages=max_messages,
        max_chars=max_chars,
        close_timeout=1,
        metrics=Metrics(),
    )


def test_a_full_outbox_closes_the_connection() -> None:
    connection = outbox(max_chars=100)
    connection.deliver("x" * 60)
    assert not connection.closing
    connection.deliver("x" * 60)
    assert connection.closing


def test_a_backlog_past_the_limits_does_not_get_the_next_frame_refused() -> None:
    connection = outbox(max_messages=10, max_chars=100)
    connection.deliver_backlog(["x" * 50] * 12)  # 600 characters, 12 frames
    connection.deliver("live")
    assert not connection.closing
    # The room is the backlog's size, not unlimited: the limits still apply on top.
    for _ in range(9):
        connection.deliver("y" * 10)
    assert not connection.closing
    connection.deliver("y" * 10)
    assert connection.closing


def test_overwhelmed_closes_as_a_slow_consumer() -> None:
    connection = outbox()
    connection.overwhelmed()
    assert connection.closing
    connection.deliver("after")  # ignored: closing
