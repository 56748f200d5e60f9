"""The reconnect policy: which close codes to retry after, and how long to wait.

Pure functions, no I/O, so the policy is tested on its own.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from websockets.frames import CloseCode

# Codes after which a client reconnects; any other code (1008 policy, 1009 too big,
# 1000 done, ...) means "do not come back as you are".
RECONNECT_CODES = frozenset(
    {
        CloseCode.GOING_AWAY,
        CloseCode.NO_STATUS_RCVD,
        CloseCode.ABNORMAL_CLOSURE,
        CloseCode.INTERNAL_ERROR,
        CloseCode.SERVICE_RESTART,
        CloseCode.TRY_AGAIN_LATER,
        CloseCode.BAD_GATEWAY,
    }
)

# The reason of the 1008 a worker closes with when the connection's token lapses: with a
# token provider, a new connection (with a fresh token) is the cure.
TOKEN_EXPIRED = "token expired"

# After 1013 the server asked for patience (slow consumer, broker down).
TRY_AGAIN_LATER_BASE = 1.0

# base * 2**62 is beyond any max_delay; capping the exponent keeps the float finite.
_MAX_EXPONENT = 62

Uniform = Callable[[float, float], float]


def should_reconnect(code: int | None, reason: str = "", *, fresh_token: bool = False) -> bool:
    """Whether to reconnect after a connection closed with `code` (None: attempt failed).

    `fresh_token`: the client can get a new token (it has a provider), so a 1008 with
    the reason `token expired` is worth a new connection.
    """
    if code == CloseCode.POLICY_VIOLATION and reason == TOKEN_EXPIRED:
        return fresh_token
    return code is None or code in RECONNECT_CODES


def backoff(
    attempt: int, base: float, max_delay: float, uniform: Uniform = random.uniform
) -> float:
    """The wait before the `attempt`-th (from 0) consecutive retry, jittered.

    `min(max_delay, base * 2**attempt) * uniform(0.5, 1)`: the jitter spreads clients
    that lost a worker at the same moment so that they do not all come back at once.
    """
    return min(max_delay, math.ldexp(base, min(attempt, _MAX_EXPONENT))) * uniform(0.5, 1.0)


def retry_delay(
    attempt: int,
    cause: int | None,
    *,
    min_delay: float,
    max_delay: float,
    uniform: Uniform = random.uniform,
) -> float:
    """The wait before reconnecting.

    `attempt` counts the retries since the last `welcome`; `cause` is the last close
    code received since then (None if only connection attempts failed).
    """
    if cause == CloseCode.SERVICE_RESTART and attempt == 0:
        # The worker is shutting down, not overloaded: go to the next one now, spread
        # over `min_delay` so that its clients do not all land on the others at once.
        return uniform(0.0, min_delay)
    base = max(min_delay, TRY_AGAIN_LATER_BASE) if cause == CloseCode.TRY_AGAIN_LATER else min_delay
    return backoff(attempt, base, max_delay, uniform)
