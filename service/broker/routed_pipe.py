"""The publish script, run on the node that serves its keys: a `ScriptPipe` per node.

With one Redis there is one node and every call goes to its pipe. On a Redis Cluster a
call goes to the pipe of the primary that serves its first key's slot (all its keys
and its channel share that slot: their hash tag is the channel). When that node
answers that the slot moved or is moving (MOVED, ASK, TRYAGAIN) or that the cluster is
down for it (CLUSTERDOWN), the call did not run there: the slots are learnt again and
the call goes to the pipe of the node that serves it now, a few times at most, with a
pause that grows (a slot being moved is served again once the move ends). Every
attempt runs through a node's pipe, which tells the script its server's run id. A call
whose node is unreachable fails as it would with one Redis (its pipe already retried),
and the slots are learnt again for the next ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from redis.exceptions import AskError, ClusterDownError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from service.broker.redis_pipe import OnReply, PipeClosed, Redirect, ScriptPipe, settle
from service.broker.redis_topology import Node, Topology

logger = logging.getLogger(__name__)

#: What a node answers when the call's slot is served elsewhere (or by nobody, for now).
_REDIRECTED = (AskError, TryAgainError, ClusterDownError)
#: Seconds before each new attempt of a redirected call: about 1.5 s in all, within
#: which a slot's move or a shard's failover usually ends.
_PAUSES = (0.0, 0.05, 0.15, 0.3, 0.5, 0.5)


class RedisClusterDown(ClusterDownError):
    """No node is known to serve the call's slot: it did not run."""


class _Redirected:
    """A call's `OnReply`, once the call was redirected: how many times so far."""

    __slots__ = ("hops", "on_reply")

    def __init__(self, on_reply: OnReply, hops: int) -> None:
        # Redirected again: the original callback, not a wrapper of a wrapper.
        self.on_reply: OnReply = (
            on_reply.on_reply if isinstance(on_reply, _Redirected) else on_reply
        )
        self.hops = hops

    def __call__(self, reply: Any) -> None:
        self.on_reply(reply)


class RoutedPipe:
    """Runs one Lua script where its keys live, over each node's own `ScriptPipe`."""

    def __init__(
        self,
        topology: Topology,
        pipe_to: Callable[[Node, Redirect], ScriptPipe],
        *,
        on_misrouted: Callable[[], None],
    ) -> None:
        """`pipe_to` makes a node's pipe; `on_misrouted` asks to learn the topology again.

        A node's pipe asks `redirect` before it fails a call.
        """
        self._topology = topology
        self._pipe_to = pipe_to
        self._on_misrouted = on_misrouted
        self._pipes: dict[str, ScriptPipe] = {}
        # Calls that went on in a task; held here, as the loop keeps only weak references.
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: list[EncodableT], args: list[EncodableT]) -> Any:
        """Run the script and return its reply: `start` with a future as its callback."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.start(keys, args, partial(settle, future))
        return await future

    def start(self, keys: list[EncodableT], args: list[EncodableT], on_reply: OnReply) -> None:
        """Run the script on its keys' node; `on_reply` gets what `ScriptPipe.start` hands.

        Later, never from inside this call.
        """
        node = self._topology.node_for(keys[0] if keys else b"")  # no keys: anywhere
        if node is None:  # the slots are not known yet
            self._on_misrouted()
            error = RedisClusterDown("the cluster's slots are not known yet")
            asyncio.get_running_loop().call_soon(on_reply, error)
            return
        pipe = self._pipes.get(node.name)
        if pipe is None:
            pipe = self._pipes[node.name] = self._pipe_to(node, self.redirect)
        pipe.start(keys, args, on_reply)

    def redirect(self, parts: list[EncodableT], on_reply: OnReply, failure: Exception) -> bool:
        """A node's pipe is about to fail a call: send it where its slot is, if it is elsewhere.

        True: the call goes on (its `on_reply` is answered later); False: it fails.
        """
        if isinstance(failure, (RedisConnectionError, RedisTimeoutError)):
            self._on_misrouted()  # the node may be gone: the next calls go where it went
            return False
        if not isinstance(failure, _REDIRECTED):
            return False
        self._on_misrouted()
        hops = on_reply.hops if isinstance(on_reply, _Redirected) else 0
        if hops >= len(_PAUSES):
            return False  # it fails with the last answer: the call did not run
        count = int(parts[0])
        keys, args = parts[1 : 1 + count], parts[1 + count :]
        again = _Redirected(on_reply, hops + 1)
        task = asyncio.ensure_future(self._again(keys, args, again, _PAUSES[hops]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _again(
        self, keys: list[EncodableT], args: list[EncodableT], on_reply: _Redirected, pause: float
    ) -> None:
        try:
            await asyncio.sleep(pause)
            await self._topology.refresh()
        except asyncio.CancelledError:
            on_reply(PipeClosed("the call was cancelled: the pipe is closing"))
            raise
        except Exception as exc:  # the slots stay as they were: the call goes on anyway
            logger.debug("the cluster's slots not learnt before a redirected call: %r", exc)
        self.start(keys, args, on_reply)

    async def close(self) -> None:
        """Close every node's pipe; calls in flight fail (`PipeClosed`)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        for pipe in self._pipes.values():
            await pipe.close()
