"""Connection pools that hold all their connections open, and a cluster client that waits its turn.

redis-py opens pooled connections lazily; these open them all when the store
opens and again after a reconnect, so a process holds as many connections idle
as under load, and a burst waits for a free one instead of opening more.

Private surface of redis-py relied on by the redis_* modules (checked without a
server by ``tests/unit/test_private_surfaces_redis.py``: a redis-py upgrade that
changes one fails that test first, naming it and its user):

- here: ``BlockingConnectionPool._in_use_connections`` (sized),
  ``.get_connection()`` / ``.release(connection)`` (async; its wait running out is a
  ConnectionError caused by a TimeoutError), ``.make_connection()``
  (sync); ``AbstractConnection.register_connect_callback(callback)`` (sync, kept
  by weak reference: a bound method) and ``.connect()`` (async);
  ``ClusterNode.acquire_connection()`` (sync, MaxConnectionsError when full),
  ``.release(connection)`` (sync), ``.max_connections``;
  ``RedisCluster.execute_command`` (async, overridden), ``.get_primaries()``;
- ``redis_raw``: a pool's ``make_connection()``, a connection's ``connect()``
  and its ``_writer``/``_reader`` (the socket taken over), ``BaseParser.parse_error``;
- ``redis_append_pipeline``: ``AsyncScript.sha``/``.script`` (commands packed as
  ``hiredis.pack_command`` does, by ``redis_packing``); ``Pipeline.execute(raise_on_error=)``;
  NOSCRIPT raised as ``NoScriptError``;
- ``redis_slots`` and ``redis_live_cluster``: ``RedisCluster.nodes_manager.slots_cache``
  and ``.nodes_manager.initialize()`` (async), ``get_node_from_key``, ``keyslot``;
- ``redis_options``: ``ConnectionPool.disconnect(inuse_connections=)`` (async).
- ``redis_slots``: ``ClusterNode.acquire_connection()``, ``.release()``,
  ``.parse_response(connection, command)`` (async); a connection's
  ``pack_command(s)``, ``send_packed_command``, ``read_response``,
  ``disconnect(nowait=)``; ``RedisCluster.get_node(host=, port=)``,
  ``.nodes_manager.move_slot(MovedError)`` (async).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError

from broker.redis_options import REDIS_FAILURES
from broker.redis_primary import WatchedSentinelPool

log = logging.getLogger(__name__)


class PoolBusy(RedisConnectionError):
    """Every connection of the pool stayed in use for the pool's whole wait: this process
    is busy, and Redis may well be fine. Not a reason to drop the idle connections, as a
    connection that failed is (``drop_idle_connections``): dropped while other commands
    took them, they failed in turn ("TCPTransport closed"; bench review)."""


class FixedPool(redis.BlockingConnectionPool):
    """A blocking pool that keeps all of its ``max_connections`` connections open.

    redis-py opens pooled connections lazily, so their number follows the peak of
    concurrent commands. Once ``fill`` was called (when the store opens) this pool
    has them all open, and opens them all again as soon as one of them had to
    reconnect (Redis restarted, a Sentinel failover): a process holds as many
    connections idle as under load. A burst beyond them waits for a free one.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._keep_full = False  # until the first fill: lazy, as redis-py's
        self._filling = False
        self._refill: asyncio.Task[None] | None = None
        self._waiting = 0  # callers in redis-py's own get_connection
        self.fast_takes = 0  # connections handed out by the fast path (tests read it)

    # -- the fast path ----------------------------------------------------------
    #
    # redis-py's blocking pool takes an asyncio.Condition twice, opens a timeout,
    # tries a non-blocking read and records three observability figures for each
    # command: measured, 18% of an append's client CPU. When a connection is idle
    # and no caller waits, handing it out (and taking it back) is a list operation;
    # everything else goes the library's way.
    #
    # And its check of an idle connection is off while its maintenance
    # notifications are (its default): a connection the server closed while idle
    # (a restart, CLIENT KILL, an idle timeout) was handed out as it was, and the
    # append on it failed. Here such a connection is opened again first.

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        connection = self._take_idle()
        if connection is not None:
            if not _sound(connection):
                await self._reopen(connection)
            return connection
        self._waiting += 1
        try:
            connection = await self._wait_for_connection()
            if not _sound(connection):
                await self._reopen(connection)
            return connection
        finally:
            self._waiting -= 1

    async def _wait_for_connection(self) -> AbstractConnection:
        try:
            connection: AbstractConnection = await super().get_connection()  # type: ignore[no-untyped-call]
        except RedisConnectionError as error:
            if isinstance(error.__cause__, asyncio.TimeoutError):
                raise PoolBusy(
                    f"every one of its {self.max_connections} connections was in use for "
                    f"{self.timeout:g} s (this process is busy)"
                ) from error
            raise
        return connection

    def _take_idle(self) -> AbstractConnection | None:
        """The most recently released connection (as redis-py would take), if any."""
        if self._in_maintenance or not self._available_connections:
            return None
        connection: AbstractConnection = self._available_connections.pop()
        self._in_use_connections.add(connection)
        self.fast_takes += 1
        return connection

    async def _reopen(self, connection: AbstractConnection) -> None:
        """Connect it afresh; on failure it goes back to the pool and the error is raised."""
        try:
            await connection.disconnect()
            await connection.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await self.release(connection)
            raise

    async def release(self, connection: AbstractConnection) -> None:
        if (
            self._waiting
            or self._in_maintenance
            or connection not in self._in_use_connections
            or connection.should_reconnect()  # type: ignore[no-untyped-call]
        ):
            await super().release(connection)  # wakes a waiter; its checks and events
            return
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)

    async def fill(self) -> None:
        """Open every connection not in use (one in use is open, or reconnects itself).

        All at once: opened one by one, each would hold a healthy connection back
        from commands while the next one connects (a slow reconnect, seconds).
        """
        self._keep_full = True
        self._filling = True
        try:
            free = self.max_connections - len(self._in_use_connections)
            opened = await asyncio.gather(
                *(self.get_connection() for _ in range(free)),
                return_exceptions=True,
            )
        finally:
            self._filling = False
        failures = [each for each in opened if isinstance(each, BaseException)]
        for connection in opened:
            if not isinstance(connection, BaseException):
                await self.release(connection)
        if failures:
            raise failures[0]

    def make_connection(self) -> AbstractConnection:
        connection: AbstractConnection = super().make_connection()  # type: ignore[no-untyped-call]
        connection.register_connect_callback(self._connected)  # type: ignore[no-untyped-call]
        return connection

    def _connected(self, connection: AbstractConnection) -> None:
        """One connection (re)connected: after an outage the idle ones are down too."""
        if not self._keep_full or self._filling or (self._refill and not self._refill.done()):
            return
        self._refill = asyncio.get_running_loop().create_task(self._fill_quietly())

    async def _fill_quietly(self) -> None:
        try:
            await self.fill()
        except REDIS_FAILURES as error:  # the next reconnect tries again
            log.info("redis: could not reopen the connection pool yet: %s", error)

    async def aclose(self) -> None:
        self._keep_full = False
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        await super().aclose()


def _sound(connection: AbstractConnection) -> bool:
    """Open, with nothing unread on it, and not closed by the server."""
    reader = connection._reader
    if not connection.is_connected or reader is None:
        return False
    return not reader.at_eof() and not reader._buffer  # type: ignore[attr-defined]


class FixedSentinelPool(WatchedSentinelPool, FixedPool):
    """The fixed pool, connected to wherever the Sentinels say the primary is."""


class BoundedCluster(RedisCluster):
    """The cluster client, whose commands wait for one of ``max_connections`` turns.

    Its per-node pools hold up to ``max_connections`` each and raise when all are
    in use; with as many commands in flight at most (across the whole cluster, as
    the node of a command is only known inside the client), none is ever refused.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # (public: the store's SlotCommands, which take a node's connection, wait here too)
        self.turns = asyncio.Semaphore(kwargs["max_connections"])

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turns:
            return await super().execute_command(*args, **kwargs)


async def open_cluster_pools(cluster: RedisCluster) -> None:
    """Open every primary's ``max_connections`` connections of the cluster client.

    redis-py opens them lazily; a failover or a new node gets its connections so.
    """
    await cluster.initialize()
    for node in cluster.get_primaries():
        held: list[Connection] = []
        try:
            while len(held) < node.max_connections:
                held.append(node.acquire_connection())
        except MaxConnectionsError:
            pass  # the rest are in use, hence open
        try:
            await asyncio.gather(*(each.connect() for each in held))  # type: ignore[no-untyped-call]
        finally:
            for connection in held:
                node.release(connection)
