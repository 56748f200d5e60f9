"""The app's say on connections, subscriptions and publishes: in-process hooks.

An app that embeds the service (`Realtime`) passes async callables; each sees who the
client is (its `Principal`) and may let the action through, refuse it by raising
`Refused` (the client gets an `error` frame with the app's code, or at connect a 403),
or, for a publish, return the data to publish instead. Standalone, `ProxyHooks`
(service/hooks_proxy.py) makes the same calls over HTTP to the app's backend.

A channel no hook covers costs one method call and a `None` test per command.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from pydantic import JsonValue

from service.auth import Principal
from service.auth.principal import matches_any
from service.errors import HookUnavailable, Ref, Refused, ServiceError

logger = logging.getLogger(__name__)

#: `await connect(client)`: raise `Refused` to refuse the connection.
ConnectHook = Callable[[Principal], Awaitable[None]]
#: `await subscribe(client, channel)`: raise `Refused` to refuse the subscription.
SubscribeHook = Callable[[Principal, str], Awaitable[None]]
#: `await publish(client, channel, data)`: the data to publish (`data` itself to keep it).
PublishHook = Callable[[Principal, str, JsonValue], Awaitable[JsonValue]]

#: Seconds, as HOOK_TIMEOUT's default for the HTTP hooks.
DEFAULT_TIMEOUT = 2.0

T = TypeVar("T")


class Hooks:
    """Async callables the service awaits before a connect, a subscribe and a publish.

    `channels`: the channel patterns (`*` is the wildcard) whose subscribes and publishes
    the hooks see; others go through untouched. `timeout`: seconds a hook may take
    before the client is told `unavailable`.
    """

    def __init__(
        self,
        *,
        connect: ConnectHook | None = None,
        subscribe: SubscribeHook | None = None,
        publish: PublishHook | None = None,
        channels: Sequence[str] = ("*",),
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if timeout <= 0:
            raise ValueError("Hooks timeout must be positive (seconds)")
        self._connect = connect
        self._subscribe = subscribe
        self._publish = publish
        self._channels = tuple(channels)
        self.timeout = timeout

    def connect_hook(self) -> ConnectHook | None:
        """The hook to await before a connection is accepted, if any."""
        return self._connect

    def subscribe_hook(self, channel: str) -> SubscribeHook | None:
        """The hook to await before a subscription to `channel`, if any."""
        if self._subscribe is None or not matches_any(channel, self._channels):
            return None
        return self._subscribe

    def publish_hook(self, channel: str) -> PublishHook | None:
        """The hook to await before a publish to `channel`, if any."""
        if self._publish is None or not matches_any(channel, self._channels):
            return None
        return self._publish

    async def start(self) -> None:
        """Acquire what the hooks need while the service runs (nothing, in-process)."""

    async def stop(self) -> None:
        """Release what `start` acquired."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


#: No hooks: every action goes through as the settings and tokens allow.
NO_HOOKS = Hooks()


async def ask(
    hooks: Hooks,
    what: str,
    hook: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    ref: Ref | None = None,
) -> T:
    """`await hook(*args)`; what goes wrong becomes an error the client is told.

    `Refused` (anew, with `ref`: the app may raise one shared instance) and our own
    errors pass through; a timeout, or anything else the hook raises (a bug of the app's,
    or a hook that is not async), becomes `unavailable`, logged with its traceback.
    """
    try:
        async with asyncio.timeout(hooks.timeout):
            return await hook(*args)
    except Refused as exc:
        refusal = Refused(exc.message, exc.wire_code())
        refusal.ref = ref
        raise refusal from None
    except ServiceError as exc:
        exc.ref = ref
        raise
    except TimeoutError:
        raise HookUnavailable(
            f"the app's {what} hook did not answer within {hooks.timeout:g} s: retry later",
            ref=ref,
        ) from None
    except Exception:
        logger.exception("the app's %s hook failed", what)
        raise HookUnavailable(f"the app's {what} hook failed: retry later", ref=ref) from None


__all__ = ["NO_HOOKS", "ConnectHook", "Hooks", "PublishHook", "Refused", "SubscribeHook", "ask"]
