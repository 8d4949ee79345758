"""The Redis Streams store: the only module that imports ``redis``.

One topic is one stream (``broker:{topic}:log``) with a meta hash beside it; the
hash tag keeps both, and the idempotency records, on one Cluster slot so the
append script can touch them atomically.

With no URL the same code runs over fakeredis in this process: the embedded
default store, for trying the broker out. Single instance, not durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import unquote

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from broker import constants as c
from broker.errors import StoreUnavailable
from broker.ids import EventId, StreamPosition, format_stream_id, new_epoch, parse_stream_id
from broker.model import AppendResult, LogEntry, LogState, NewEvent

log = logging.getLogger(__name__)
T = TypeVar("T")

_LOG_KEY_HEAD = len(f"{c.KEY_PREFIX}:{{")
_LOG_KEY_TAIL = len("}:log")


def _lua(name: str) -> str:
    return resources.files("broker").joinpath("lua", name).read_text()


def _topic_of(key: bytes) -> str:
    return key[_LOG_KEY_HEAD:-_LOG_KEY_TAIL].decode()


def _position_or_none(raw: bytes | None) -> StreamPosition | None:
    return parse_stream_id(raw) if raw else None


class _SingleFlight:
    """Concurrent identical reads share one Redis round trip.

    A reconnect storm sends thousands of subscribers after the same range at
    once; they get one XRANGE between them, and one parsed result.
    """

    def __init__(self) -> None:
        self._inflight: dict[tuple[Any, ...], asyncio.Future[Any]] = {}

    async def run(self, key: tuple[Any, ...], call: Callable[[], Awaitable[T]]) -> T:
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await call()
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: no "never retrieved" warning if nobody waits
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[key]


class _LiveReader:
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
            await _drop_idle_connections(self._commands)
            raise StoreUnavailable(f"live read failed: {error}") from error
        return {
            _topic_of(key): [LogEntry(_topic_of(key), parse_stream_id(i), f) for i, f in entries]
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


class _ClusterLiveReader:
    """One live reader per cluster primary: an XREAD may only name keys of one node.

    All nodes are read at once; when the first answers, the others are
    interrupted and their answers (if any) kept, so nothing read is dropped.
    A MOVED or a failover surfaces as StoreUnavailable, after which the slot map
    is refreshed and the hub reads again from the positions it delivered.
    """

    def __init__(self, cluster: RedisCluster, options: dict[str, Any]) -> None:
        self._cluster = cluster
        self._options = options
        self._readers: dict[str, _LiveReader] = {}

    def _reader_for(self, node: Any) -> _LiveReader:
        reader = self._readers.get(node.name)
        if reader is None:
            client = redis.Redis(host=node.host, port=int(node.port), **self._options)
            commands = redis.Redis(host=node.host, port=int(node.port), **_client_options())
            reader = self._readers[node.name] = _LiveReader(client, commands)
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
        self, readers: list[_LiveReader], tasks: list[asyncio.Future[dict[str, list[LogEntry]]]]
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


LiveReader = _LiveReader | _ClusterLiveReader


class RedisStreamStore:
    """The event log on Redis Streams (or on fakeredis, for the embedded store)."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        live: LiveReader,
        *,
        retention_maxlen: int = c.DEFAULT_RETENTION_MAXLEN,
        retention_seconds: float | None = None,
        idempotency_seconds: int = c.DEFAULT_IDEMPOTENCY_SECONDS,
        durable: bool = True,
        description: str = "redis",
        replicas_to_confirm: int = 0,
    ) -> None:
        self._client = client
        self._live = live
        self._replicas_to_confirm = replicas_to_confirm
        self._node_clients: dict[str, redis.Redis] = {}
        self._node_options: dict[str, Any] = _client_options()
        self._maxlen = retention_maxlen
        self._trim_slack = max(1, min(1000, retention_maxlen // 100))
        self._max_age_ms = int((retention_seconds or 0) * 1000)
        self._idempotency_seconds = idempotency_seconds
        self._append_script = client.register_script(_lua("append.lua"))
        self._state_script = client.register_script(_lua("state.lua"))
        self._reads = _SingleFlight()
        self.durable = durable
        self.description = description

    async def append(
        self, topic: str, events: Sequence[NewEvent], *, idempotency_key: str | None = None
    ) -> AppendResult:
        keys = [c.log_key(topic), c.meta_key(topic)]
        if idempotency_key is not None:
            keys.append(c.idempotency_key(topic, idempotency_key))
        args: list[str | int] = [
            new_epoch(),
            self._maxlen,
            self._trim_slack,
            self._max_age_ms,
            self._idempotency_seconds,
        ]
        for event in events:
            retry = "" if event.retry is None else str(event.retry)
            args += [event.kind, event.data, event.event or "", retry]
        if self._replicas_to_confirm:
            replayed, answer = await self._append_and_wait(keys, args)
        else:
            replayed, answer = await self._call(self._append_script(keys=keys, args=args))
        return AppendResult(ids=_parse_answer(answer), replayed=bool(replayed))

    async def _append_and_wait(self, keys: list[str], args: list[str | int]) -> Any:
        """Append, then WAIT on the same connection until a replica has it, or refuse.

        WAIT counts the writes of its own connection, hence one pipeline. A
        refused publish may have been stored on the primary: a retry with the
        same Idempotency-Key answers its ids once a replica confirms them.
        """
        pipe = (await self._node_client(keys[0])).pipeline(transaction=False)
        await self._append_script(keys=keys, args=args, client=pipe)  # queued, not sent yet
        pipe.execute_command("WAIT", self._replicas_to_confirm, c.REPLICA_CONFIRM_MS)
        answer, confirmed = await self._call(pipe.execute())
        if int(confirmed) < self._replicas_to_confirm:
            raise StoreUnavailable("no replica confirmed the write in time")
        return answer

    async def _node_client(self, key: str) -> Any:
        """The client whose single connection can both write ``key`` and WAIT for it."""
        if not isinstance(self._client, RedisCluster):
            return self._client
        try:
            if not self._client.nodes_manager.slots_cache:
                await self._client.initialize()
            node = self._client.get_node_from_key(key)
        except (RedisError, OSError) as error:
            raise StoreUnavailable(f"cluster slot map unavailable: {error}") from error
        if node is None:
            raise StoreUnavailable(f"no cluster node serves {key}")
        client = self._node_clients.get(node.name)
        if client is None:
            client = redis.Redis(host=node.host, port=int(node.port), **self._node_options)
            self._node_clients[node.name] = client
        return client

    async def read_range(self, topic: str, after: StreamPosition, count: int) -> list[LogEntry]:
        return await self._reads.run(
            ("range", topic, after, count), lambda: self._read_range(topic, after, count)
        )

    async def _read_range(self, topic: str, after: StreamPosition, count: int) -> list[LogEntry]:
        start = "-" if after == (0, 0) else "(" + format_stream_id(after)
        raw: Any = await self._call(self._client.xrange(c.log_key(topic), start, "+", count=count))
        return [LogEntry(topic, parse_stream_id(id_), fields) for id_, fields in raw]

    async def read_live(
        self, positions: dict[str, StreamPosition], block_ms: int
    ) -> dict[str, list[LogEntry]]:
        streams = {c.log_key(t): format_stream_id(pos) for t, pos in positions.items()}
        return await self._live.read(streams, block_ms)

    async def interrupt_live_read(self) -> bool:
        """Unblock the live XREAD; False when it was not (yet) blocked."""
        return await self._live.interrupt()

    async def state(self, topic: str) -> LogState:
        return await self._reads.run(("state", topic), lambda: self._state(topic))

    async def _state(self, topic: str) -> LogState:
        keys = [c.log_key(topic), c.meta_key(topic)]
        epoch, trimmed, length, first, last = await self._call(self._state_script(keys=keys))
        return LogState(
            epoch=epoch.decode() if epoch else None,
            length=int(length),
            first=_position_or_none(first),
            last_entry=_position_or_none(last),
            trimmed_through=_position_or_none(trimmed) or (0, 0),
        )

    async def ping(self) -> None:
        await self._call(self._client.ping())

    async def close(self) -> None:
        await self._live.close()
        for node_client in self._node_clients.values():
            await node_client.aclose()
        await self._client.aclose()

    async def _call(self, command: Awaitable[T]) -> T:
        try:
            return await command
        except ResponseError as error:
            if "UNBLOCKED" in str(error):
                raise
            raise StoreUnavailable(f"redis refused the command: {error}") from error
        except (RedisError, OSError) as error:
            await _drop_idle_connections(self._client)
            raise StoreUnavailable(f"redis is unreachable: {error}") from error


async def _drop_idle_connections(client: Any) -> None:
    """After a connection failed, the pooled ones likely did too (Redis restarted):
    drop them now, so the first commands once Redis is back do not fail on them."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        with contextlib.suppress(RedisError, OSError):
            await pool.disconnect(inuse_connections=False)


def _parse_answer(answer: bytes) -> list[EventId]:
    epoch, _, ids = answer.decode().partition("|")
    return [EventId(epoch, parse_stream_id(raw)) for raw in ids.split(",") if raw]


def _client_options() -> dict[str, Any]:
    # No automatic retries: a retried append after a timeout could store twice.
    # Callers retry with an Idempotency-Key; the live reader reconnects itself.
    return {
        "socket_connect_timeout": 2.0,
        "socket_timeout": 5.0,
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
    }


def _reader_options() -> dict[str, Any]:
    """A blocking XREAD must outlive its BLOCK time before the socket times out."""
    return _client_options() | {"socket_timeout": c.LIVE_BLOCK_MS / 1000 + 5}


def open_store(url: str | None, *, durability: str = "leader", **options: Any) -> RedisStreamStore:
    """A store for a URL: one Redis, Sentinel, Cluster; the embedded store when empty.

    - ``redis://``, ``rediss://``, ``unix://``: one Redis server;
    - ``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]``:
      the primary that the Sentinels name ``service``, followed across failovers;
    - ``redis+cluster://[:password@]host:port[,host:port...]`` (or ``rediss+cluster``):
      a Redis Cluster, from any of its nodes.
    """
    if not url:
        return _embedded_store(**options)
    replicas = 1 if durability == "replicated" else 0
    options |= {"description": _redact(url), "replicas_to_confirm": replicas}
    scheme = url.partition("://")[0].lower()
    if scheme.endswith("+sentinel"):
        return _sentinel_store(url, **options)
    if scheme.endswith("+cluster"):
        return _cluster_store(url, **options)
    client = redis.Redis.from_url(url, **_client_options())
    reader = redis.Redis.from_url(url, single_connection_client=True, **_reader_options())
    return RedisStreamStore(client, _LiveReader(reader, client), **options)


def _hosts_and_rest(url: str) -> tuple[list[tuple[str, int]], str | None, str]:
    """``scheme://[:pw@]h1:p1,h2:p2/rest`` -> hosts, password, rest."""
    netloc, _, rest = url.partition("://")[2].partition("/")
    credentials, _, hosts = netloc.rpartition("@")
    password = unquote(credentials.partition(":")[2]) if credentials else None
    pairs = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        pairs.append((name or host, int(port or 6379)) if name else (host, 26379))
    return pairs, password or None, rest


def _sentinel_store(url: str, **options: Any) -> RedisStreamStore:
    hosts, password, rest = _hosts_and_rest(url)
    service, _, db = rest.partition("/")
    if not service:
        raise ValueError("a Sentinel URL names its service: redis+sentinel://h:26379/mymaster")
    kwargs = _client_options() | {"password": password, "db": int(db or 0)}
    sentinel = Sentinel(hosts, sentinel_kwargs=_client_options(), **kwargs)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(service)
    reader_pool = SentinelConnectionPool(service, sentinel, **(kwargs | _reader_options()))  # type: ignore[no-untyped-call]
    reader = redis.Redis(connection_pool=reader_pool, single_connection_client=True)
    return RedisStreamStore(client, _LiveReader(reader, client), **options)


def _cluster_store(url: str, **options: Any) -> RedisStreamStore:
    hosts, password, _ = _hosts_and_rest(url)
    tls = url.lower().startswith("rediss")
    common: dict[str, Any] = {"password": password, "ssl": tls}
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in hosts],
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        **common,
    )
    live = _ClusterLiveReader(
        cluster, _reader_options() | common | {"single_connection_client": True}
    )
    return RedisStreamStore(cluster, live, **options)


def _embedded_store(**options: Any) -> RedisStreamStore:
    import fakeredis

    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    reader = fakeredis.FakeAsyncRedis(server=server, single_connection_client=True)
    return RedisStreamStore(
        client,
        _LiveReader(reader, client),
        durable=False,
        description="embedded (in-process, not durable)",
        **options,
    )


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"
