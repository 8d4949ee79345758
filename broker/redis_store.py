"""The event log on Redis Streams: append (pipelined, one script per append), read, state.

One topic is one stream (``broker:{topic}:log``) with a meta hash beside it; the
hash tag keeps both, and the idempotency records, on one Cluster slot so the
append script can touch them atomically.

With no URL the same code runs over fakeredis in this process: the embedded
default store, for trying the broker out. Single instance, not durable.
``redis_open.open_store`` builds a store from a URL.

Its parts, each in a module of its own: the listing of topics (``redis_listing``),
the append pipeline (``redis_append_pipeline``), the Lua scripts
(``redis_scripts``), and their replies read (``redis_replies``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import ClusterError, OutOfMemoryError, ResponseError

from broker import constants as c
from broker.errors import (
    BrokerError,
    StoreFull,
    StoreMisconfigured,
    StoreUnavailable,
)
from broker.health import ThrottledLog
from broker.ids import StreamPosition, format_stream_id, new_epoch
from broker.listing import Listing
from broker.model import AppendResult, IngestLines, LogEntry, LogPage, LogState, NewEvent
from broker.policy import Policies, Retention, TopicPolicy
from broker.redis_append_pipeline import AppendPipeline
from broker.redis_checks import (
    EvictionGuard,
    is_misconfiguration,
    probe_rights,
    probe_rights_when_reachable,
    try_rights,
)
from broker.redis_listing import NodeClientFactory, TopicListing
from broker.redis_live import AnyLiveReader, LiveReader
from broker.redis_live_links import LocalWrites
from broker.redis_options import REDIS_FAILURES, drop_idle_connections, pool_options
from broker.redis_pools import BoundedCluster, FixedPool, PoolBusy, open_cluster_pools
from broker.redis_primary import PrimaryWatch
from broker.redis_replies import page_of, parse_answer, parse_ingest_answer, refusal, state_of
from broker.redis_scripts import StoreScripts
from broker.redis_slots import CLUSTER_REDIRECTED, SlotCommands
from broker.single_flight import SingleFlight

log = logging.getLogger(__name__)
T = TypeVar("T")


TOPIC_KEYS_KEPT = 4096
"""Topics whose keys an append keeps made (six strings, some 400 bytes a topic: 1.6 MB
at most); past that they start again. Made each append, they cost a line of a streaming
ingest 1,500 instructions, and the packer hashed its first key anew each time
(callgrind); kept, the strings keep their hashes."""

STORE_FULL = (
    "redis is out of memory (maxmemory): the write was refused whole; retry later "
    "(with the same Idempotency-Key)"
)


class RedisStreamStore:
    """The event log on Redis Streams (or on fakeredis, for the embedded store)."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        live: AnyLiveReader,
        *,
        retention_maxlen: int = c.DEFAULT_RETENTION_MAXLEN,
        retention_seconds: float | None = None,
        topic_ttl_seconds: float | None = None,
        topic_policies: Sequence[TopicPolicy] = (),
        idempotency_seconds: int = c.DEFAULT_IDEMPOTENCY_SECONDS,
        durable: bool = True,
        description: str = "redis",
        replicas_to_confirm: int = 0,
        also_close: Sequence[redis.Redis] = (),
        pool_size: int = c.REDIS_POOL_SIZE,
        node_client: NodeClientFactory | None = None,
        local_writes: LocalWrites | None = None,
        primary_watch: PrimaryWatch | None = None,
        allow_eviction: bool = False,
        append_timeout: float | None = None,
    ) -> None:
        """``primary_watch``: a Sentinel store's (see ``redis_primary``);
        ``allow_eviction``: run on a Redis that may evict keys (see ``redis_checks``);
        ``append_timeout``: how long appends' replies may take before their connection
        is taken for dead (default: the reply timeout of every command, 5 s; a
        publisher allowed longer, ``BROKER_PUBLISH_TIMEOUT_SECONDS``, got a 503 at 5 s)."""
        self._client = client
        self._primary_watch = primary_watch
        self._watching: asyncio.Task[None] | None = None
        self._local_writes = local_writes  # (the embedded store's: see LocalWrites)
        self._pool_size = pool_size
        # On a Cluster: a client of one node, logged in as the cluster client is.
        self._open_node_client = node_client or self._plain_node_client
        self._live = live
        self._also_close = list(also_close)  # e.g. the connections to the Sentinels
        self._replicas_to_confirm = replicas_to_confirm
        default = Retention(
            maxlen=retention_maxlen,
            max_age_ms=int((retention_seconds or 0) * 1000),
            ttl_ms=int((topic_ttl_seconds or 0) * 1000),
        )
        self.policies = Policies(default, topic_policies)
        self.idempotency_seconds = idempotency_seconds
        self._scripts = StoreScripts.registered_on(client)
        self._keys_of: dict[str, list[str]] = {}  # (see _topic_keys)
        self._pipeline = (
            AppendPipeline(client, self._scripts.append, raw=durable, timeout=append_timeout)
            if not isinstance(client, RedisCluster)
            else None
        )
        # On a Cluster the topics' scripts go by SlotCommands: through a slot's migration.
        self._slots = (
            SlotCommands(client, client.turns, c.CLUSTER_MIGRATION_PATIENCE_S)
            if isinstance(client, BoundedCluster)
            else None
        )
        self._reads = SingleFlight(
            c.READ_COALESCE_MS / 1000, max_window_s=c.READ_COALESCE_MAX_MS / 1000
        )
        self.durable = durable
        self.description = description
        self._listing = TopicListing(
            client, self._call, self.state, self._open_node_client, durable=durable
        )
        self._sweeper: asyncio.Task[None] | None = None
        self._rights_probe: asyncio.Task[None] | None = None  # (Redis out of reach at open)
        self._eviction = EvictionGuard(self._memory_infos, allow=allow_eviction)
        self._memory_warning = ThrottledLog(c.EVICTION_CHECK_S, log)
        self._refusal_warning = ThrottledLog(c.EVICTION_CHECK_S, log)

    async def append(
        self,
        topic: str,
        events: Sequence[NewEvent],
        *,
        idempotency_key: str | None = None,
        lines: IngestLines | None = None,
        close: bool = False,
        streaming: bool = False,
        log_epoch: str | None = None,
        after_entry: StreamPosition | None = None,
    ) -> AppendResult:
        if self._eviction.refusal is not None:
            raise StoreMisconfigured(self._eviction.refusal, retry_after=c.EVICTING_RETRY_AFTER_S)
        keys = self._keys_of.get(topic)
        if keys is None:
            keys = self._topic_keys(topic)
        if lines is not None:  # the ingest's key, then each event's line number
            names: list[str] = [lines.key, *[str(number) for number in lines.numbers]]
        else:
            names = [] if idempotency_key is None else [idempotency_key]
        retention = self.policies.for_topic(topic)
        args: list[str | int] = [
            # An append that must find its log (an ingest under way) never creates one
            # (append.lua refuses it first): no fresh epoch drawn for it, each line.
            "" if log_epoch else new_epoch(),
            retention.maxlen,
            retention.trim_slack,
            retention.max_age_ms,
            self.idempotency_seconds,
            retention.ttl_ms,
            int(close),
            int(lines is not None),
            len(names),
            *names,
            log_epoch or "",
            _stored_last(lines, after_entry),
        ]
        for event in events:
            retry = "" if event.retry is None else str(event.retry)
            args += [event.kind, event.data, event.event or "", retry]
        try:
            if self._replicas_to_confirm:
                status, answer = await self._append_and_wait(keys, args)
            else:
                linger = c.STREAMING_APPEND_LINGER_MS / 1000 if streaming else 0.0
                status, answer = await self._call(self._append_once(keys, args, linger))
        finally:
            # (cancelled, a publish past its deadline, the append may have landed all
            # the same: its live readers must hear of it now, not at their next poll)
            if self._local_writes is not None:
                self._local_writes.written(keys[0])
        if status < 0:
            raise refusal(status, answer.decode(), topic, lines)
        if lines is not None:
            return parse_ingest_answer(answer, replayed=status == 1)
        return parse_answer(answer, replayed=status == 1)

    def _topic_keys(self, topic: str) -> list[str]:
        """``constants.topic_keys``, kept for the topic's next append (never changed once
        made: the pipeline and the packer only read them)."""
        if len(self._keys_of) >= TOPIC_KEYS_KEPT:
            self._keys_of.clear()
        keys = self._keys_of[topic] = c.topic_keys(topic)
        return keys

    def _append_once(self, keys: list[str], args: list[str | int], linger: float) -> Awaitable[Any]:
        """The append script's reply, to await: no coroutine of its own (each level of
        coroutines an append awaits through is made, resumed and unwound per append)."""
        if self._pipeline is not None:
            return self._pipeline.call(keys, args, linger)
        return self._run(self._scripts.append, keys, args)

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """A script of one topic's keys: on a Cluster, through its slot's migration."""
        if self._slots is not None:
            return await self._slots.run_script(script, keys, args)
        return await script(keys=keys, args=args)

    async def _append_and_wait(self, keys: list[str], args: list[str | int]) -> Any:
        """Append, then WAIT on the same connection until a replica has it, or refuse.

        WAIT counts the writes of its own connection, hence one pipeline; on a
        Cluster, one exchange with the slot's node (SlotCommands: during a migration
        the importing node, after ASKING, whose replicas the WAIT then counts). A
        refused publish may have been stored on the primary: a retry with the same
        Idempotency-Key answers its ids once a replica confirms them.
        """
        wait = ("WAIT", self._replicas_to_confirm, c.REPLICA_CONFIRM_MS)
        if self._slots is not None:
            answer, confirmed = await self._call(
                self._slots.run_script(self._scripts.append, keys, args, then=wait)
            )
        else:
            # (one server: a Cluster client is always a BoundedCluster, with SlotCommands)
            # `async with`: a pipeline that fails while loading its script (SCRIPT EXISTS)
            # keeps its pooled connection checked out, and warns when collected, unless reset.
            async with cast(redis.Redis, self._client).pipeline(transaction=False) as pipe:
                await self._scripts.append(keys=keys, args=args, client=pipe)  # queued
                pipe.execute_command(*wait)
                answer, confirmed = await self._call(pipe.execute())
        if int(confirmed) < self._replicas_to_confirm:
            # (A primary demoted since: on Sentinel the store's watch drops the
            # connections to it within a quarter second; dropped here, on every refusal, a
            # lagging replica would have every connection reopened again and again.)
            raise StoreUnavailable("no replica confirmed the write in time")
        return answer

    def _plain_node_client(self, host: str, port: int) -> redis.Redis:
        """A node client with no password and no TLS (a store given no factory)."""
        pool = redis.BlockingConnectionPool(host=host, port=port, **pool_options(self._pool_size))
        return redis.Redis.from_pool(pool)

    async def read_range(
        self,
        topic: str,
        after: StreamPosition,
        count: int,
        max_bytes: int = c.REPLAY_PAGE_BYTES,
    ) -> LogPage:
        return await self._reads.run(
            ("range", topic, after, count, max_bytes),
            lambda: self._read_range(topic, after, count, max_bytes),
        )

    async def _read_range(
        self, topic: str, after: StreamPosition, count: int, max_bytes: int
    ) -> LogPage:
        position = "" if after == (0, 0) else format_stream_id(after)
        start = "(" + position if position else "-"
        keys = [c.log_key(topic), c.meta_key(topic)]
        reply = await self._call(
            self._run(self._scripts.range, keys, [start, count, position, max_bytes])
        )
        return page_of(topic, reply)

    def may_have_trimmed(
        self, topic: str, after: StreamPosition, entries: list[LogEntry], away_ms: float
    ) -> bool:
        """Trimming keeps at least ``maxlen`` entries, so if it removed any after ``after``
        a read after it returns a full count. Trimming by age happens on an append (the
        newest entry read would then be ``max_age`` younger than ``after``) and on any
        read of the topic's state (a subscriber opening, ``GET /topics/t``): an entry
        appended since the reader's previous read is younger than ``away_ms``, so it
        cannot have aged out unless the reader was away that long."""
        retention = self.policies.for_topic(topic)
        if len(entries) >= min(c.LIVE_READ_COUNT, retention.maxlen):
            return True
        max_age = retention.max_age_ms
        if not max_age:
            return False
        aged_on_append = entries[-1].position[0] - after[0] >= max_age
        return aged_on_append or away_ms + c.LIVE_AWAY_MARGIN_MS >= max_age

    async def list_topics(
        self,
        listing: Listing,
        cursor: str | None,
        limit: int,
        shown: Callable[[str], bool] = lambda _: True,
    ) -> tuple[list[tuple[str, LogState]], str | None]:
        """A page of ``listing``'s topics and the cursor past it: ``TopicListing``."""
        return await self._listing.list_topics(listing, cursor, limit, shown)

    async def keep_lines(self, topic: str, key: str, log_epoch: str) -> bool:
        """Keep the line records of the open ingest ``key`` answering, as if it had just
        written a line (lua/keep_lines.lua); False if they answer no more, or its log is
        gone: nothing written then.

        Never WAITed for a replica, even under ``replicated`` durability: it answers no
        producer (the promise of ``WAIT`` is an answer given only once a replica has
        the write), and a keep a failover lost costs nothing. Kept a quarter window
        after the write before it (``api.ingest_records``), the records on the replica
        still answer for three quarters of the window, and the next keep, a quarter
        window on, lands on the new primary. Only a replica behind by a quarter window
        (seconds: the appends' own WAITs were failing meanwhile) loses two in a row;
        then the records lapse, and the ingest's next line is refused and told so
        (409 ingest-records-lapsed: no line stored twice). A WAIT here would hold the
        keeper a replica's round trip for nothing it could do better: a keep it found
        unconfirmed is tried again at the next look all the same."""
        keys = c.topic_keys(topic)
        keys = [keys[0], keys[1], keys[4], keys[5]]  # (log, meta, lines, lines-at: one slot)
        args = [key, log_epoch, self.idempotency_seconds]
        return bool(await self._call(self._run(self._scripts.keep_lines, keys, args)))

    async def delete(self, topic: str) -> bool:
        """Delete the topic now; False if it had no log. Its live readers see a marker."""
        keys = c.topic_keys(topic)
        marker = await self._call(self._run(self._scripts.delete, keys, [c.DELETED_LINGER_MS]))
        if self._local_writes is not None:
            self._local_writes.written(keys[0])
        return bool(marker)

    async def read_live(
        self, positions: dict[str, StreamPosition], block_ms: int
    ) -> dict[str, list[LogEntry]]:
        return await self._live.read(positions, block_ms)

    def take_unread_spells(self) -> dict[str, float]:
        return self._live.take_unread_spells()

    async def interrupt_live_read(self) -> bool:
        """Unblock the live XREAD; False when it was not (yet) blocked."""
        return await self._live.interrupt()

    async def state(self, topic: str) -> LogState:
        return await self._reads.run(("state", topic), lambda: self._state(topic))

    async def revalidate(
        self, topic: str, epoch: str, read_through: StreamPosition, number: int | None = None
    ) -> LogState:
        """The state, and whether the log lost events the live reader read (see
        lua/state.lua): not coalesced with ``state``, whose readers ask no such thing."""
        read_number = "" if number is None else str(number)
        return await self._state(topic, [epoch, format_stream_id(read_through), read_number])

    async def _state(self, topic: str, reader: list[str] | None = None) -> LogState:
        keys = [c.log_key(topic), c.meta_key(topic)]
        max_age = self.policies.for_topic(topic).max_age_ms
        reply = await self._call(self._run(self._scripts.state, keys, [max_age, *(reader or ())]))
        return state_of(reply)

    async def ping(self) -> None:
        await self._call(self._client.ping())

    async def clock_ms(self) -> int:
        seconds, microseconds = await self._call(self._client.time())
        return int(seconds) * 1000 + int(microseconds) // 1000

    async def open(self) -> None:
        """Open the connections now rather than on first use (the command pool, whole,
        and the live reader's) and try what the broker needs of Redis (``redis_checks``):
        raises StoreMisconfigured for a refusal that waiting will not mend, or a Redis
        that may evict. Redis unreachable: the connections open once it answers."""
        follows = self._primary_watch is not None
        probed = await try_rights(self._open_connections_and_probe, follows_primary=follows)
        if not probed and self._rights_probe is None:
            # (the probe alone: the connections open by themselves once Redis answers)
            later = probe_rights_when_reachable(self._probe_rights, follows_primary=follows)
            self._rights_probe = asyncio.get_running_loop().create_task(later)
        if self.durable:
            await self._eviction.start()
        if not self.durable and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_expired())
        if self._primary_watch is not None and self._watching is None:
            watching = self._primary_watch.run(self._primary_moved)
            self._watching = asyncio.get_running_loop().create_task(watching)

    async def _open_connections_and_probe(self) -> None:
        if isinstance(self._client, RedisCluster):
            await open_cluster_pools(self._client)
        elif isinstance(self._client.connection_pool, FixedPool):
            await self._client.connection_pool.fill()
        if self._pipeline is not None:
            await self._pipeline.open()
        await self._live.open()
        await self._probe_rights()

    async def _probe_rights(self) -> None:
        if self.durable:
            scripts = self._scripts
            loaded = [scripts.state, scripts.append, scripts.range, scripts.delete]
            await probe_rights(self._client, loaded, scripts.probe)

    async def _memory_infos(self) -> list[dict[str, Any]]:
        """``INFO memory`` of each server that holds topics (over the command pools)."""
        if not isinstance(self._client, RedisCluster):
            return [await self._client.info("memory")]
        replies = await self._client.info("memory", target_nodes=RedisCluster.PRIMARIES)
        # (a reply per primary, by node name; one primary's alone)
        return [replies] if "maxmemory_policy" in replies else list(replies.values())

    async def _primary_moved(self) -> None:
        """The Sentinels name another primary: every connection to the old one goes
        now (appends, commands, the live reader's; what was under way fails, as in
        any outage, and the live reader revalidates its topics), and each opens
        again where they say."""
        steps: list[Callable[[], Awaitable[None]]] = []
        pipeline = self._pipeline
        if pipeline is not None:
            steps.append(lambda: pipeline.close("the primary moved"))
        if not isinstance(self._client, RedisCluster):
            steps.append(self._client.connection_pool.disconnect)
        if isinstance(self._live, LiveReader):
            steps.append(self._live.drop_connections)
        for step in steps:  # each whatever another raised: none may stay on the old one
            try:
                await step()
            except Exception:
                log.exception("redis: could not drop connections to the old primary")

    async def _sweep_expired(self) -> None:
        """The embedded store (fakeredis) drops an expired key only when that key is
        touched, or when the key space is counted: a topic's TTL freed nothing until
        somebody listed the topics, and a process of short-lived topics grew without
        bound. Counting it every second frees what is due, as Redis's own expiry
        cycle does (fakeredis keeps a heap of expiries: the count costs what it frees)."""
        while True:
            await asyncio.sleep(c.EMBEDDED_EXPIRY_SWEEP_S)
            try:
                await self._client.dbsize()
            except REDIS_FAILURES:  # (in process: not expected; never a reason to stop)
                log.exception("embedded store: the expiry sweep failed")

    async def close(self) -> None:
        await self._eviction.close()
        for task in (self._watching, self._sweeper, self._rights_probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watching = self._sweeper = self._rights_probe = None
        await self._live.close()
        if self._pipeline is not None:
            await self._pipeline.close()
        if self._slots is not None:
            await self._slots.close()
        await self._listing.close()
        await self._client.aclose()
        for extra in self._also_close:
            await extra.aclose()

    async def _call(self, command: Awaitable[T]) -> T:
        try:
            return await command
        except OutOfMemoryError as error:
            self._memory_warning.say("redis refused a write: out of memory (maxmemory): %s", error)
            raise StoreFull(STORE_FULL, retry_after=c.STORE_FULL_RETRY_AFTER_S) from error
        except ResponseError as error:
            if "UNBLOCKED" in str(error):
                raise
            if is_misconfiguration(error):  # (an ACL changed while it ran, a right unlisted)
                self._refusal_warning.say("redis refused a command: %s", error)
            raise StoreUnavailable(f"redis refused the command: {error}") from error
        except PoolBusy as error:  # (the connections are sound: none is dropped)
            raise StoreUnavailable(f"redis: {error}") from error
        except REDIS_FAILURES as error:
            await drop_idle_connections(self._client)
            raise StoreUnavailable(_unreachable_reason(error)) from error
        except BrokerError:
            raise
        except Exception as error:
            # The client failing in its own code (a connection closed under a command
            # it sends: an AttributeError; audit): still the store failing, so a 503
            # and a retry with the Idempotency-Key, never a 500; and said loudly.
            log.exception("redis: the client failed unexpectedly")
            raise StoreUnavailable(f"the redis client failed: {error!r}") from error


def _unreachable_reason(error: BaseException) -> str:
    """A 503's detail. redis-py's Cluster client gives up on a command redirected 16
    times (MOVED, ASK, TRYAGAIN: never run) with "TTL exhausted.", which said nothing an
    operator could act on (audit); any other failure is the store out of reach."""
    if isinstance(error, ClusterError) and "TTL exhausted" in str(error):
        return CLUSTER_REDIRECTED
    return f"redis is unreachable: {error}"


def _stored_last(lines: IngestLines | None, after_entry: StreamPosition | None) -> str | int:
    """What the append must find of its ingest's earlier appends (append.lua): the line
    it stored last, if it has lines, and the entry it stored last (and its last line,
    once its body ended with blank lines; then the ingest they went to, once known); else 0."""
    if lines is not None:
        entry = format_stream_id(after_entry or (0, 0))
        if lines.since:
            return f"{lines.after}:{entry}:{lines.blank_through or ''}:{lines.since}"
        stored_last = f"{lines.after}:{entry}"
        return f"{stored_last}:{lines.blank_through}" if lines.blank_through else stored_last
    return 0 if after_entry is None else format_stream_id(after_entry)
