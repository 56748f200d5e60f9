"""The Python client's reconnect policy (service.client.backoff), pure functions."""

from __future__ import annotations

import pytest
from websockets.frames import CloseCode

from service.client import backoff, retry_delay, should_reconnect


def lowest(a: float, b: float) -> float:
    return a


def highest(a: float, b: float) -> float:
    return b


def test_backoff_doubles_from_base_with_jitter_between_half_and_full() -> None:
    assert [backoff(n, 0.25, 10.0, highest) for n in range(4)] == [0.25, 0.5, 1.0, 2.0]
    assert [backoff(n, 0.25, 10.0, lowest) for n in range(4)] == [0.125, 0.25, 0.5, 1.0]


def test_backoff_is_capped_by_max_delay_even_after_very_many_attempts() -> None:
    assert backoff(6, 0.25, 10.0, highest) == 10.0
    assert backoff(6, 0.25, 10.0, lowest) == 5.0
    assert backoff(10_000, 0.25, 10.0, highest) == 10.0


def test_backoff_with_real_randomness_stays_in_bounds() -> None:
    for attempt in range(8):
        ceiling = min(10.0, 0.25 * 2**attempt)
        for _ in range(200):
            assert ceiling / 2 <= backoff(attempt, 0.25, 10.0) <= ceiling


def test_the_first_retry_after_1012_goes_at_once_later_ones_back_off() -> None:
    restart = CloseCode.SERVICE_RESTART
    # At once, but spread over min_delay, so that a worker's clients do not move together.
    assert retry_delay(0, restart, min_delay=0.25, max_delay=10.0, uniform=lowest) == 0.0
    assert retry_delay(0, restart, min_delay=0.25, max_delay=10.0, uniform=highest) == 0.25
    assert retry_delay(1, restart, min_delay=0.25, max_delay=10.0, uniform=highest) == 0.5


def test_after_1013_the_base_is_one_second() -> None:
    later = CloseCode.TRY_AGAIN_LATER
    assert retry_delay(0, later, min_delay=0.25, max_delay=10.0, uniform=lowest) == 0.5
    assert retry_delay(0, later, min_delay=0.25, max_delay=10.0, uniform=highest) == 1.0
    assert retry_delay(2, later, min_delay=0.25, max_delay=10.0, uniform=highest) == 4.0
    # A min_delay above one second is never undercut.
    assert retry_delay(0, later, min_delay=2.0, max_delay=10.0, uniform=highest) == 2.0


@pytest.mark.parametrize("cause", [None, CloseCode.ABNORMAL_CLOSURE, CloseCode.GOING_AWAY])
def test_other_causes_use_min_delay(cause: int | None) -> None:
    assert retry_delay(0, cause, min_delay=0.25, max_delay=10.0, uniform=highest) == 0.25
    assert retry_delay(3, cause, min_delay=0.25, max_delay=1.0, uniform=highest) == 1.0


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (None, True),  # a connection attempt failed
        (1001, True),
        (1005, True),
        (1006, True),
        (1011, True),
        (1012, True),
        (1013, True),
        (1014, True),
        (1000, False),
        (1002, False),
        (1008, False),
        (1009, False),
        (4000, False),
    ],
)
def test_which_close_codes_reconnect(code: int | None, expected: bool) -> None:
    assert should_reconnect(code) is expected


def test_an_expired_token_reconnects_only_when_a_fresh_one_can_be_had() -> None:
    policy = CloseCode.POLICY_VIOLATION
    assert should_reconnect(policy, "token expired", fresh_token=True) is True
    assert should_reconnect(policy, "token expired") is False
    # Any other 1008 stops, provider or not: a new token would not change it.
    assert should_reconnect(policy, "invalid channel name", fresh_token=True) is False
    # The reason matters only with 1008.
    assert should_reconnect(CloseCode.NORMAL_CLOSURE, "token expired", fresh_token=True) is False
    assert should_reconnect(CloseCode.GOING_AWAY, "token expired") is True
