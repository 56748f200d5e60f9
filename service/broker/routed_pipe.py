"""The publish script, run on the node that serves its keys: a `ScriptPipe` per node.

With one Redis there is one node and every call goes to its pipe. On a Redis Cluster a
call goes to the pipe of the primary that serves its first key's slot (all its keys
and its channel share that slot: their hash tag is the channel). When that node
answers that the slot moved or is moving (MOVED, ASK, TRYAGAIN) or that the cluster is
down for it (CLUSTERDOWN), the call did not run there: it is run once more through
redis-py's cluster client, which follows redirections itself, and the router is asked
to learn the slots again, so that the next calls go to the right pipe. A call whose
node is unreachable fails as it would with one Redis (its pipe already retried), and
the router learns the topology again for the next ones.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from functools import partial
from typing import Any

from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from service.broker.redis_pipe import OnReply, PipeClosed, Redirect, ScriptPipe, settle
from service.broker.redis_topology import Node, Topology

#: What a node answers when the call's slot is served elsewhere (or by nobody, for now).
_REDIRECTED = (AskError, TryAgainError, ClusterDownError)


class RoutedPipe:
    """Runs one Lua script where its keys live, over each node's own `ScriptPipe`."""

    def __init__(
        self,
        script: str,
        topology: Topology,
        pipe_to: Callable[[Node, Redirect], ScriptPipe],
        *,
        on_misrouted: Callable[[], None],
    ) -> None:
        """`pipe_to` makes a node's pipe; `on_misrouted` asks to learn the topology again.

        A node's pipe asks `redirect` before it fails a call.
        """
        self._script = script
        self._sha = hashlib.sha1(script.encode()).hexdigest()
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
            self._through_client(keys, args, on_reply)
            return
        pipe = self._pipes.get(node.name)
        if pipe is None:
            pipe = self._pipes[node.name] = self._pipe_to(node, self.redirect)
        pipe.start(keys, args, on_reply)

    def redirect(self, parts: list[EncodableT], on_reply: OnReply, failure: Exception) -> bool:
        """A node's pipe is about to fail a call: take it over if its slot is elsewhere."""
        if isinstance(failure, _REDIRECTED):
            self._on_misrouted()
            count = int(parts[0])
            keys, args = parts[1 : 1 + count], parts[1 + count :]
            self._through_client(keys, args, on_reply)
            return True
        if isinstance(failure, (RedisConnectionError, RedisTimeoutError)):
            self._on_misrouted()  # the node may be gone: the next calls go where it went
        return False

    def _through_client(
        self, keys: list[EncodableT], args: list[EncodableT], on_reply: OnReply
    ) -> None:
        task = asyncio.ensure_future(self._client_call(keys, args, on_reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _client_call(
        self, keys: list[EncodableT], args: list[EncodableT], on_reply: OnReply
    ) -> None:
        # Without the server's run id (the script's last ARGV): which node runs it is the
        # client's choice, and a script told no server keeps the channel's epoch as is.
        client = self._topology.client
        try:
            try:
                reply = await client.evalsha(self._sha, len(keys), *keys, *args)
            except NoScriptError:
                reply = await client.eval(self._script, len(keys), *keys, *args)
        except asyncio.CancelledError:
            on_reply(PipeClosed("the call was cancelled: the pipe is closing"))
            raise
        except RedisError as exc:
            reply = exc
        except RedisClusterException as exc:  # not a RedisError, yet Redis's failure
            reply = RedisError(f"the cluster did not take the call: {exc}")
        on_reply(reply)

    async def close(self) -> None:
        """Close every node's pipe; calls in flight fail (`PipeClosed`)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        for pipe in self._pipes.values():
            await pipe.close()
