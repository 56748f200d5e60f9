"""Deaf-worker detection: the worker must hear back a nonce it publishes to itself.

A subscription can stop delivering with no error anywhere: python-socketio issue
#1581 is one worker of eight that stopped hearing Redis while nothing was logged. The
connection stays up and PINGs are answered, so the watchdog cannot see it. Every
`interval` seconds the canary publishes a fresh nonce, through the command connection,
to a channel only this worker subscribes to, and expects it back on the subscription
connection within `timeout`. PUBLISH answering "0 receivers" or the nonce not coming
back means the worker is deaf: `on_deaf` makes it not ready and rebuilds the
subscription connection (whose reconnect re-subscribes and sends `gap` frames).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


class Canary:
    """Periodic round trip through Redis pub/sub, back to this worker."""

    def __init__(
        self,
        *,
        interval: float,
        timeout: float,
        publish: Callable[[bytes], Awaitable[int]],
        generation: Callable[[], int | None],
        on_deaf: Callable[[str], Awaitable[None]],
        on_heard: Callable[[], None],
    ) -> None:
        self._interval = interval
        self._timeout = timeout
        self._publish = publish
        # Which subscription connection is up (None: none). A check that spans a
        # reconnect proves nothing either way.
        self._generation = generation
        self._on_deaf = on_deaf
        self._on_heard = on_heard
        self._nonce = b""
        self._heard = asyncio.Event()
        self._wake = asyncio.Event()
        self.checks = 0

    def heard(self, payload: bytes) -> None:
        """Called by the reader for every message on the canary channel."""
        if payload == self._nonce:
            self._heard.set()

    def check_soon(self) -> None:
        """Run the next check now rather than at the end of the interval."""
        self._wake.set()

    async def run(self) -> None:
        """Check every `interval` seconds (or sooner when asked), forever."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.check()
            except Exception:
                logger.exception("canary check failed")

    async def check(self) -> None:
        """One round trip; calls `on_deaf` or `on_heard` when the result is conclusive.

        `checks` counts the round trips that came back.
        """
        generation = self._generation()
        if generation is None:
            return  # not connected: the reader is already on it
        self._nonce = os.urandom(8).hex().encode()
        self._heard.clear()
        try:
            receivers = await self._publish(self._nonce)
        except Exception as exc:
            # Redis itself is unreachable: readiness and the reader report that.
            logger.debug("canary not published: %r", exc)
            return
        if receivers == 0:
            if self._generation() == generation:
                await self._on_deaf("Redis holds no subscription for this worker")
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._heard.wait()
        except TimeoutError:
            # If this loop itself stalled, the echo may be read but not yet handled: let
            # the reader run before concluding.
            for _ in range(3):
                await asyncio.sleep(0)
            if not self._heard.is_set():
                if self._generation() == generation:  # else inconclusive: it reconnected
                    await self._on_deaf(f"own canary not heard back within {self._timeout:g} s")
                return
        self.checks += 1
        self._on_heard()
