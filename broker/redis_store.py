"""The Redis Streams store (with ``redis_live``, the only modules that import ``redis``).

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

import hiredis
import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import MaxConnectionsError, NoScriptError, RedisError, ResponseError

from broker import constants as c
from broker.errors import StoreUnavailable
from broker.ids import EventId, StreamPosition, format_stream_id, new_epoch, parse_stream_id
from broker.model import AppendResult, LogEntry, LogPage, LogState, NewEvent
from broker.redis_live import (
    AnyLiveReader,
    ClusterLiveReader,
    LiveReader,
    client_options,
    drop_idle_connections,
    reader_options,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def _lua(name: str) -> str:
    return resources.files("broker").joinpath("lua", name).read_text()


def _position_or_none(raw: bytes | None) -> StreamPosition | None:
    return parse_stream_id(raw) if raw else None


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
                *(self.get_connection() for _ in range(free)),  # type: ignore[no-untyped-call]
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
        except (RedisError, OSError) as error:  # the next reconnect tries again
            log.info("redis: could not reopen the connection pool yet: %s", error)

    async def aclose(self) -> None:
        self._keep_full = False
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        await super().aclose()


class FixedSentinelPool(SentinelConnectionPool, FixedPool):
    """The fixed pool, connected to wherever the Sentinels say the primary is."""


class BoundedCluster(RedisCluster):
    """The cluster client, whose commands wait for one of ``max_connections`` turns.

    Its per-node pools hold up to ``max_connections`` each and raise when all are
    in use; with as many commands in flight at most (across the whole cluster, as
    the node of a command is only known inside the client), none is ever refused.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._turns = asyncio.Semaphore(kwargs["max_connections"])

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._turns:
            return await super().execute_command(*args, **kwargs)


async def _open_cluster_pools(cluster: RedisCluster) -> None:
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


class _SingleFlight:
    """Concurrent identical reads share one Redis round trip.

    A reconnect storm sends thousands of subscribers after the same range at
    once; they get one XRANGE between them, and one parsed result.

    A caller may only join a read that has not been sent yet: a subscriber
    reads the log *after* it attached to the live reader, and a read sent
    before that could miss an event that the live reader had also dispatched
    before it attached. So a read waits a few milliseconds for company, closes
    to newcomers, and only then goes to Redis.

    The read runs in a task of its own, which every caller awaits shielded:
    a caller that goes away (its client disconnected) cancels only its own
    wait, never the read the others are waiting for.
    """

    def __init__(self, window_s: float) -> None:
        self._window = window_s
        self._forming: dict[tuple[Any, ...], asyncio.Task[Any]] = {}

    async def run(self, key: tuple[Any, ...], call: Callable[[], Awaitable[T]]) -> T:
        read = self._forming.get(key)
        if read is None:
            read = asyncio.get_running_loop().create_task(self._read(key, call))
            read.add_done_callback(_retrieve_outcome)
            self._forming[key] = read
        return await asyncio.shield(read)

    async def _read(self, key: tuple[Any, ...], call: Callable[[], Awaitable[T]]) -> T:
        try:
            await asyncio.sleep(self._window)
        finally:
            del self._forming[key]  # closed: whoever asks from now on reads anew
        return await call()


def _retrieve_outcome(task: asyncio.Task[Any]) -> None:
    """No "exception never retrieved" when every caller of a failed read went away."""
    if not task.cancelled():
        task.exception()


class _AppendPipeline:
    """Concurrent appends travel to Redis together: one write, one read for all.

    Appends made in the same event-loop turn (many requests arrive together
    under load) are queued and sent as one pipeline at the end of the turn;
    each caller gets its own script's answer. Scripts run one by one in Redis,
    so each stays atomic. A NOSCRIPT (Redis restarted) reloads the script and
    re-sends those appends, which were not executed.
    """

    def __init__(self, client: redis.Redis, script: AsyncScript, *, raw: bool) -> None:
        self._client = client
        self._raw = raw  # real Redis: pack with hiredis; fakeredis: redis-py's pipeline
        self._script = script  # registered once by the store: its text and SHA
        self._queue: list[tuple[list[str], list[str | int], asyncio.Future[Any]]] = []
        self._in_flight: set[asyncio.Future[None]] = set()

    async def call(self, keys: list[str], args: list[str | int]) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((keys, args, future))
        if len(self._queue) == 1:
            asyncio.get_running_loop().call_soon(self._send_queued)
        return await future

    def _send_queued(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.ensure_future(self._send(batch))
        self._in_flight.add(task)  # a reference, so the task is not collected mid-flight
        task.add_done_callback(self._in_flight.discard)

    async def _send(
        self, batch: list[tuple[list[str], list[str | int], asyncio.Future[Any]]]
    ) -> None:
        try:
            results = await self._execute(batch)
        except BaseException as error:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(
        self, batch: list[tuple[list[str], list[str | int], asyncio.Future[Any]]]
    ) -> list[Any]:
        sha = self._script.sha
        commands = [("EVALSHA", sha, len(keys), *keys, *args) for keys, args, _ in batch]
        if self._raw:
            results = await self._send_raw(commands)
        else:
            pipe = self._client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            results = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, NoScriptError) for r in results):
            await self._client.script_load(self._script.script)
            return await self._execute(batch)
        return results

    async def _send_raw(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The pipeline on one pooled connection, packed by hiredis (C).

        redis-py's asyncio client packs commands in Python: measured, the largest
        single cost of a publish in this process. Replies are read one per command.
        """
        pool = self._client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(
                b"".join(hiredis.pack_command(command) for command in commands)
            )
            results: list[Any] = []
            for _ in commands:
                try:
                    results.append(await connection.read_response())
                except ResponseError as error:  # this command's error; the others stand
                    results.append(error)
            return results
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)


class RedisStreamStore:
    """The event log on Redis Streams (or on fakeredis, for the embedded store)."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        live: AnyLiveReader,
        *,
        retention_maxlen: int = c.DEFAULT_RETENTION_MAXLEN,
        retention_seconds: float | None = None,
        idempotency_seconds: int = c.DEFAULT_IDEMPOTENCY_SECONDS,
        durable: bool = True,
        description: str = "redis",
        replicas_to_confirm: int = 0,
        also_close: Sequence[redis.Redis] = (),
        pool_size: int = c.REDIS_POOL_SIZE,
    ) -> None:
        self._client = client
        self._pool_size = pool_size
        self._live = live
        self._also_close = list(also_close)  # e.g. the connections to the Sentinels
        self._replicas_to_confirm = replicas_to_confirm
        self._node_clients: dict[str, redis.Redis] = {}
        self._maxlen = retention_maxlen
        self._trim_slack = max(1, min(1000, retention_maxlen // 100))
        self._max_age_ms = int((retention_seconds or 0) * 1000)
        self._idempotency_seconds = idempotency_seconds
        self._append_script = client.register_script(_lua("append.lua"))
        self._pipeline = (
            _AppendPipeline(client, self._append_script, raw=durable)
            if not isinstance(client, RedisCluster)
            else None
        )
        self._state_script = client.register_script(_lua("state.lua"))
        self._range_script = client.register_script(_lua("range.lua"))
        self._reads = _SingleFlight(c.READ_COALESCE_MS / 1000)
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
            replayed, answer = await self._call(self._append_once(keys, args))
        return AppendResult(ids=_parse_answer(answer), replayed=bool(replayed))

    async def _append_once(self, keys: list[str], args: list[str | int]) -> Any:
        if self._pipeline is not None:
            return await self._pipeline.call(keys, args)
        return await self._append_script(keys=keys, args=args)

    async def _append_and_wait(self, keys: list[str], args: list[str | int]) -> Any:
        """Append, then WAIT on the same connection until a replica has it, or refuse.

        WAIT counts the writes of its own connection, hence one pipeline. A
        refused publish may have been stored on the primary: a retry with the
        same Idempotency-Key answers its ids once a replica confirms them.
        """
        # `async with`: a pipeline that fails while loading its script (SCRIPT EXISTS)
        # keeps its pooled connection checked out, and warns when collected, unless reset.
        try:
            async with (await self._node_client(keys[0])).pipeline(transaction=False) as pipe:
                await self._append_script(keys=keys, args=args, client=pipe)  # queued
                pipe.execute_command("WAIT", self._replicas_to_confirm, c.REPLICA_CONFIRM_MS)
                answer, confirmed = await self._call(pipe.execute())
        except StoreUnavailable:
            await self._forget_slot_owner(keys[0])
            raise
        if int(confirmed) < self._replicas_to_confirm:
            raise StoreUnavailable("no replica confirmed the write in time")
        return answer

    async def _forget_slot_owner(self, key: str) -> None:
        """On a Cluster, the node we wrote to may be gone or no longer own the slot
        (failover, MOVED): drop its client and rebuild the slot map, so the
        publisher's retry (same Idempotency-Key) reaches the new owner."""
        if not isinstance(self._client, RedisCluster):
            return
        node = self._client.get_node_from_key(key)
        stale = self._node_clients.pop(node.name, None) if node is not None else None
        if stale is not None:
            with contextlib.suppress(RedisError, OSError):
                await stale.aclose()
        with contextlib.suppress(RedisError, OSError):
            await self._client.nodes_manager.initialize()

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
            pool = redis.BlockingConnectionPool(
                host=node.host, port=int(node.port), **_pool_options(self._pool_size)
            )
            client = self._node_clients[node.name] = redis.Redis.from_pool(pool)
        return client

    async def read_range(self, topic: str, after: StreamPosition, count: int) -> LogPage:
        return await self._reads.run(
            ("range", topic, after, count), lambda: self._read_range(topic, after, count)
        )

    async def _read_range(self, topic: str, after: StreamPosition, count: int) -> LogPage:
        start = "-" if after == (0, 0) else "(" + format_stream_id(after)
        keys = [c.log_key(topic), c.meta_key(topic)]
        epoch, trimmed, raw = await self._call(self._range_script(keys=keys, args=[start, count]))
        return LogPage(
            entries=[LogEntry(topic, parse_stream_id(id_), _pairs(flat)) for id_, flat in raw],
            epoch=epoch.decode() if epoch else None,
            trimmed_through=_position_or_none(trimmed) or (0, 0),
        )

    def may_have_trimmed(self, topic: str, after: StreamPosition, entries: list[LogEntry]) -> bool:
        """Trimming keeps at least ``maxlen`` entries, so if it removed any after ``after``
        a read after it returns a full count; and trimming by age happens on append,
        so the newest entry read would be ``max_age`` younger than ``after``."""
        if len(entries) >= min(c.LIVE_READ_COUNT, self._maxlen):
            return True
        return bool(self._max_age_ms) and entries[-1].position[0] - after[0] >= self._max_age_ms

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

    async def open(self) -> None:
        """Open the connections now rather than on first use: the command pool, whole,
        and the live reader's. Best effort: while Redis is down they open later."""
        try:
            if isinstance(self._client, RedisCluster):
                await _open_cluster_pools(self._client)
            elif isinstance(self._client.connection_pool, FixedPool):
                await self._client.connection_pool.fill()
            await self._live.open()
        except (RedisError, OSError) as error:
            log.warning("redis: could not open the connections yet: %s", error)

    async def close(self) -> None:
        await self._live.close()
        for node_client in self._node_clients.values():
            await node_client.aclose()
        await self._client.aclose()
        for extra in self._also_close:
            await extra.aclose()

    async def _call(self, command: Awaitable[T]) -> T:
        try:
            return await command
        except ResponseError as error:
            if "UNBLOCKED" in str(error):
                raise
            raise StoreUnavailable(f"redis refused the command: {error}") from error
        except (RedisError, OSError) as error:
            await drop_idle_connections(self._client)
            raise StoreUnavailable(f"redis is unreachable: {error}") from error


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """A stream entry's fields as Lua returns them (name, value, ...)."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _parse_answer(answer: bytes) -> list[EventId]:
    epoch, _, ids = answer.decode().partition("|")
    return [EventId(epoch, parse_stream_id(raw)) for raw in ids.split(",") if raw]


def open_store(
    url: str | None,
    *,
    durability: str = "leader",
    pool_size: int = c.REDIS_POOL_SIZE,
    **options: Any,
) -> RedisStreamStore:
    """A store for a URL: one Redis, Sentinel, Cluster; the embedded store when empty.

    - ``redis://``, ``rediss://``, ``unix://``: one Redis server;
    - ``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]``:
      the primary that the Sentinels name ``service``, followed across failovers;
    - ``redis+cluster://[:password@]host:port[,host:port...]`` (or ``rediss+cluster``):
      a Redis Cluster, from any of its nodes.

    Each process keeps ``pool_size`` command connections per Redis server (per
    Cluster primary), all opened by ``RedisStreamStore.open``, and one for the live
    reader (one per primary on a Cluster); see ``FixedPool``.
    """
    if not url:
        return _embedded_store(**options)
    replicas = 1 if durability == "replicated" else 0
    options |= {
        "description": _redact(url),
        "replicas_to_confirm": replicas,
        "pool_size": pool_size,
    }
    scheme = url.partition("://")[0].lower()
    if scheme.endswith("+sentinel"):
        return _sentinel_store(url, **options)
    if scheme.endswith("+cluster"):
        return _cluster_store(url, **options)
    pool = FixedPool.from_url(url, **_pool_options(pool_size))
    client = redis.Redis.from_pool(pool)
    reader = redis.Redis.from_url(url, single_connection_client=True, **reader_options())
    return RedisStreamStore(client, LiveReader(reader, client), **options)


def _pool_options(size: int) -> dict[str, Any]:
    return client_options() | {"max_connections": size, "timeout": c.REDIS_POOL_WAIT_SECONDS}


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
    kwargs = client_options() | {"password": password, "db": int(db or 0)}
    sentinel = Sentinel(hosts, sentinel_kwargs=client_options(), **kwargs)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(
        service, connection_pool_class=FixedSentinelPool, **_pool_options(options["pool_size"])
    )
    reader_pool = SentinelConnectionPool(service, sentinel, **(kwargs | reader_options()))  # type: ignore[no-untyped-call]
    # Not single_connection_client: that client reconnects to the address it had
    # (redis-py skips the Sentinel lookup there), i.e. to a dead primary forever.
    # Through the pool every reconnect asks the Sentinels; from_pool also closes it.
    reader = redis.Redis.from_pool(reader_pool)
    live = LiveReader(reader, client)
    return RedisStreamStore(client, live, also_close=sentinel.sentinels, **options)


def _cluster_store(url: str, **options: Any) -> RedisStreamStore:
    hosts, password, _ = _hosts_and_rest(url)
    tls = url.lower().startswith("rediss")
    common: dict[str, Any] = {"password": password, "ssl": tls}
    cluster = BoundedCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in hosts],
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        retry=Retry(NoBackoff(), 0),  # a retried append could store twice; MOVED is still followed
        max_connections=options["pool_size"],  # per node; see _open_cluster_pools
        **common,
    )
    live = ClusterLiveReader(
        cluster, reader_options() | common | {"single_connection_client": True}
    )
    return RedisStreamStore(cluster, live, **options)


def _embedded_store(**options: Any) -> RedisStreamStore:
    import fakeredis

    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    reader = fakeredis.FakeAsyncRedis(server=server, single_connection_client=True)
    return RedisStreamStore(
        client,
        LiveReader(reader, client),
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
