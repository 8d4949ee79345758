"""The live side of the Redis store: blocking XREADs that the hub re-arms.

One reader (one connection, one XREAD at a time) per Redis server; on a
Cluster, one per primary, since an XREAD may only name keys of one node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from broker import constants as c
from broker.errors import StoreUnavailable
from broker.ids import parse_stream_id
from broker.model import LogEntry

log = logging.getLogger(__name__)

_LOG_KEY_HEAD = len(f"{c.KEY_PREFIX}:{{")
_LOG_KEY_TAIL = len("}:log")


def topic_of(key: bytes) -> str:
    """``b"broker:{orders}:log"`` -> ``"orders"``."""
    return key[_LOG_KEY_HEAD:-_LOG_KEY_TAIL].decode()


def client_options() -> dict[str, Any]:
    """Options of every connection the store opens.

    No automatic retries: a retried append after a timeout could store twice.
    Callers retry with an Idempotency-Key; the live reader reconnects itself.
    """
    return {
        "socket_connect_timeout": 2.0,
        "socket_timeout": 5.0,
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
    }


def reader_options() -> dict[str, Any]:
    """A blocking XREAD must outlive its BLOCK time before the socket times out."""
    return client_options() | {"socket_timeout": c.LIVE_BLOCK_MS / 1000 + 5}


async def drop_idle_connections(client: Any) -> None:
    """After a connection failed, the pooled ones likely did too (Redis restarted):
    drop them now, so the first commands once Redis is back do not fail on them."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        with contextlib.suppress(RedisError, OSError):
            await pool.disconnect(inuse_connections=False)


class LiveReader:
    """One blocking XREAD at a time on a connection of its own, which it can interrupt."""

    def __init__(self, reader: redis.Redis, commands: redis.Redis) -> None:
        self._reader = reader
        self._commands = commands  # CLIENT UNBLOCK goes over another connection
        self._reader_id: int | None = None

    async def read(self, streams: dict[str, str], block_ms: int) -> dict[str, list[LogEntry]]:
        try:
            if self._reader_id is None:
                self._reader_id = int(await self._reader.client_id())
            reply: Any = await self._reader.xread(
                streams,  # type: ignore[arg-type]
                count=c.LIVE_READ_COUNT,
                block=block_ms,
            )
        except (RedisError, OSError) as error:
            self._reader_id = None
            await drop_idle_connections(self._commands)
            raise StoreUnavailable(f"live read failed: {error}") from error
        return {
            topic_of(key): [LogEntry(topic_of(key), parse_stream_id(i), f) for i, f in entries]
            for key, entries in (reply or [])
        }

    async def interrupt(self) -> bool:
        if self._reader_id is None:
            return False
        try:
            return bool(await self._commands.client_unblock(self._reader_id))
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._reader.aclose()


class ClusterLiveReader:
    """One live reader per cluster primary: an XREAD may only name keys of one node.

    All nodes are read at once; when the first answers, the others are
    interrupted and their answers (if any) kept, so nothing read is dropped.
    A MOVED or a failover surfaces as StoreUnavailable, after which the slot map
    is refreshed and the hub reads again from the positions it delivered.
    """

    def __init__(self, cluster: RedisCluster, options: dict[str, Any]) -> None:
        self._cluster = cluster
        self._options = options
        self._readers: dict[str, LiveReader] = {}

    def _reader_for(self, node: Any) -> LiveReader:
        reader = self._readers.get(node.name)
        if reader is None:
            client = redis.Redis(host=node.host, port=int(node.port), **self._options)
            commands = redis.Redis(host=node.host, port=int(node.port), **client_options())
            reader = self._readers[node.name] = LiveReader(client, commands)
        return reader

    async def read(self, streams: dict[str, str], block_ms: int) -> dict[str, list[LogEntry]]:
        try:
            if not self._cluster.nodes_manager.slots_cache:
                await self._cluster.initialize()
            by_node: dict[str, dict[str, str]] = {}
            nodes: dict[str, Any] = {}
            for key, position in streams.items():
                node = self._cluster.get_node_from_key(key)
                if node is None:
                    raise StoreUnavailable(f"no cluster node serves {key}")
                nodes[node.name] = node
                by_node.setdefault(node.name, {})[key] = position
        except (RedisError, OSError) as error:
            raise StoreUnavailable(f"cluster slot map unavailable: {error}") from error
        readers = [self._reader_for(nodes[name]) for name in by_node]
        tasks: list[asyncio.Future[dict[str, list[LogEntry]]]] = [
            asyncio.ensure_future(reader.read(by_node[name], block_ms))
            for reader, name in zip(readers, by_node, strict=True)
        ]
        return await self._gather_first(readers, tasks)

    async def _gather_first(
        self, readers: list[LiveReader], tasks: list[asyncio.Future[dict[str, list[LogEntry]]]]
    ) -> dict[str, list[LogEntry]]:
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for reader, task in zip(readers, tasks, strict=True):
                while not task.done() and not await reader.interrupt():
                    await asyncio.wait([task], timeout=0.005)
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
        merged: dict[str, list[LogEntry]] = {}
        failure: BaseException | None = None
        for result in results:
            if isinstance(result, BaseException):
                failure = result
            else:
                merged.update(result)
        if failure is not None and not merged:
            await self._refresh_slots()
            raise StoreUnavailable(f"live read failed: {failure}") from failure
        return merged

    async def _refresh_slots(self) -> None:
        try:
            await self._cluster.nodes_manager.initialize()
        except (RedisError, OSError):
            log.warning("cluster: could not refresh the slot map yet")

    async def interrupt(self) -> bool:
        answers = [await reader.interrupt() for reader in list(self._readers.values())]
        return any(answers)

    async def close(self) -> None:
        for reader in self._readers.values():
            await reader.close()


AnyLiveReader = LiveReader | ClusterLiveReader
