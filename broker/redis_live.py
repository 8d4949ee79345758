"""The live side of the Redis store: blocking XREADs that the hub re-arms.

One reader (one connection, one XREAD at a time) per Redis server; on a
Cluster, one per primary, since an XREAD may only name keys of one node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any, NamedTuple

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from broker import constants as c
from broker.errors import StoreUnavailable
from broker.ids import StreamPosition, format_stream_id, parse_stream_id
from broker.model import LogEntry
from broker.observer import Observer
from broker.redis_checks import is_misconfiguration
from broker.redis_options import REDIS_FAILURES, drop_idle_connections
from broker.redis_packing import (
    array_count,
    packed_bytes,
    packed_stream_id,
    packed_without_count,
)
from broker.redis_raw import RawConnection
from broker.redis_slots import LiveRead, MigratingReads

log = logging.getLogger(__name__)

# A node that keeps failing while the others answer is logged this often at most
# (a poll runs every few ms while events flow); each failure is still counted.
_NODE_FAILURE_LOG_EVERY_S = 10.0
# The slot map is refreshed at most this often after such failures (s).
_REFRESH_EVERY_S = 1.0

XREAD_HEAD = ("XREAD", "COUNT", c.LIVE_READ_COUNT, "BLOCK", c.LIVE_BLOCK_MS, "STREAMS")
XREAD_SHORT_HEAD = (
    *XREAD_HEAD[:4],
    c.LIVE_BLOCK_UNINTERRUPTIBLE_MS,
    "STREAMS",
)
_PACKED_HEADS = {head: packed_without_count(head) for head in (XREAD_HEAD, XREAD_SHORT_HEAD)}
_LOG_KEY_HEAD = len(f"{c.KEY_PREFIX}:{{")
_LOG_KEY_TAIL = len("}:log")


def topic_of(key: bytes) -> str:
    """``b"broker:{orders}:log"`` -> ``"orders"``."""
    return key[_LOG_KEY_HEAD:-_LOG_KEY_TAIL].decode()


class _RawLink:
    """A lane's connection to a real Redis: a ``RawConnection`` (through redis-py an
    XREAD of 128 keys cost 3-4 times the client CPU, most of it parsing its reply)."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._connection = RawConnection(pool)

    @property
    def client_id(self) -> int | None:
        return self._connection.client_id

    async def open(self) -> None:
        await self._connection.open()

    async def call(self, command: bytes) -> Any:
        """The reply to a command packed already, as Redis sent it (an error reply as an
        exception instance)."""
        [reply] = await self._connection.exchange([command])
        return reply

    async def close(self) -> None:
        await self._connection.close()


class LocalWrites:
    """Which keys the embedded store just wrote, for the lanes waiting on them.

    fakeredis wakes every blocked client on any write to its database: each lane's
    XREAD ran again over all its keys, in this process, for every publish (10 ms a
    publish with 4,000 idle live topics, 0.8 on Redis). The embedded store's writes
    are all made in this process, so a lane's read waits here instead, woken only by
    a write to one of its keys (``RedisStreamStore`` calls ``written``).
    """

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}

    def written(self, key: str) -> None:
        for woken in self._waiting.get(key, ()):
            woken.set()

    def watch(self, keys: list[str], woken: asyncio.Event) -> None:
        for key in keys:
            self._waiting.setdefault(key, set()).add(woken)

    def unwatch(self, keys: list[str], woken: asyncio.Event) -> None:
        for key in keys:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._waiting[key]


class _ClientLink:
    """A lane's connection to the embedded store: fakeredis has no socket to take
    over, so redis-py's client, with its XREAD reply left as Redis sends it. Given
    ``writes``, its XREADs do not block in fakeredis (see ``LocalWrites``)."""

    def __init__(self, client: redis.Redis, writes: LocalWrites | None = None) -> None:
        self._client = client
        client.set_response_callback("XREAD", _as_sent)
        self.client_id: int | None = None
        self._writes = writes
        self._woken: asyncio.Event | None = None  # while a read waits for a write

    async def open(self) -> None:
        self.client_id = int(await self._client.client_id())

    async def call(self, command: tuple[Any, ...]) -> Any:
        if self._writes is not None and command[: len(XREAD_HEAD)] == XREAD_HEAD:
            return await self._read_when_written(command)
        return await self._execute(command)

    async def _execute(self, command: tuple[Any, ...]) -> Any:
        try:
            if self.client_id is None:
                await self.open()
            return await self._client.execute_command(*command)  # type: ignore[no-untyped-call]
        except ResponseError as error:
            return error
        except REDIS_FAILURES:
            self.client_id = None  # a new connection has a new id
            raise

    async def _read_when_written(self, command: tuple[Any, ...]) -> Any:
        """The XREAD without its BLOCK; if it finds nothing, again once one of its keys
        was written (or ``unblock``), or nil once the block time passed."""
        assert self._writes is not None
        streams = command[len(XREAD_HEAD) :]
        keys = list(streams[: len(streams) // 2])
        at_once = ("XREAD", "COUNT", c.LIVE_READ_COUNT, "STREAMS", *streams)
        woken = self._woken = asyncio.Event()
        self._writes.watch(keys, woken)  # (before the first read: no write slips between)
        try:
            reply = await self._execute(at_once)
            if reply:
                return reply
            try:
                await asyncio.wait_for(woken.wait(), c.LIVE_BLOCK_MS / 1000)
            except TimeoutError:
                return None
            return await self._execute(at_once)
        finally:
            self._writes.unwatch(keys, woken)
            self._woken = None

    def unblock(self) -> bool:
        """CLIENT UNBLOCK's part for a read waiting here: False if none waits."""
        if self._woken is None:
            return False
        self._woken.set()
        return True

    async def close(self) -> None:
        await self._client.aclose()


def _as_sent(response: Any, **options: Any) -> Any:
    return response


def _packed_id(raw_id: object, position: StreamPosition) -> bytes:
    """The id of an entry read, packed: from its bytes as Redis sent them, which it
    writes as ``format_stream_id`` does (``<ms>-<seq>`` in decimal), or else from
    its position."""
    if type(raw_id) is bytes:
        return packed_bytes(raw_id)
    return packed_stream_id(position)


_Link = _RawLink | _ClientLink


class _Lane:
    """Some of the live topics, read by one blocking XREAD on a connection of its own.

    Its read outlives the ``LiveReader.read`` call that armed it: it is re-armed
    only when it returned, or when the keys or positions it should name changed.
    """

    __slots__ = ("armed", "connection", "order", "packed_keys", "task", "topics")

    def __init__(self, connection: _Link) -> None:
        self.connection = connection
        self.topics: set[str] = set()
        self.armed: dict[str, StreamPosition] = {}  # what the running read names, from where
        self.task: asyncio.Task[Any] | None = None
        # The order its read names its topics in, and their keys packed in it (raw
        # links): kept while its topics stay, so a read re-armed joins them as they are.
        self.order: tuple[str, ...] = ()
        self.packed_keys: bytes | None = None  # None: its topics changed since

    def join(self, topic: str) -> None:
        self.topics.add(topic)
        self.packed_keys = None

    def leave(self, topic: str) -> None:
        self.topics.discard(topic)
        self.packed_keys = None


class LiveReader:
    """The live topics spread over lanes, each one blocking XREAD at a time on a
    connection of its own, which it can interrupt.

    One XREAD over every live topic would have to be re-sent whole, every key
    named again, each time a topic comes or an event wakes it: with thousands of
    topics coming and going that is most of the process's and Redis's work. A
    lane holds at most ``LIVE_LANE_TOPICS``; a read returns whatever any lane
    returned, and only that lane (or one whose topics changed) is armed again.
    One topic: one lane, one connection, as before. A reader whose client is not
    pinned to one connection (Sentinel's, which looks the primary up at each
    connect) keeps one lane.
    """

    def __init__(
        self,
        reader: redis.Redis,
        commands: redis.Redis,
        *,
        lane_topics: int = c.LIVE_LANE_TOPICS,
        max_lanes: int = c.LIVE_LANES_MAX,
        raw: bool = True,
        local_writes: LocalWrites | None = None,
    ) -> None:
        """``raw``: the lanes' connections are ``RawConnection``s (False for fakeredis);
        ``local_writes``: the embedded store's, which wake its lanes."""
        self._local_writes = local_writes
        self._reader = reader  # its pool opens the lanes' connections
        self._commands = commands  # CLIENT UNBLOCK goes over another connection
        self._lane_topics = lane_topics
        self._max_lanes = max_lanes if getattr(reader, "single_connection_client", False) else 1
        self._raw = raw
        self._lanes = [self._new_lane(reader)]
        self._log_keys: dict[str, str] = {}  # each live topic's stream key, formatted once
        self._packed_keys: dict[str, bytes] = {}  # ... and packed for Redis, once
        self._lane_of: dict[str, _Lane] = {}
        self._last: dict[str, StreamPosition] = {}  # the topics and positions of the last read
        # Each of ``_last``'s positions packed for Redis, moved with it: a read re-armed
        # joins what is packed here rather than format and pack every id again.
        self._packed_ids: dict[str, bytes] = {}
        self._dirty: set[_Lane] = set()  # lanes whose keys or positions changed since armed
        self._wake: asyncio.Event | None = None  # set while a read waits
        self._xread_head = XREAD_HEAD  # with a short block when reads cannot be unblocked

    def _new_lane(self, client: redis.Redis | None = None) -> _Lane:
        """A lane on a connection of its own from the reader's pool (its socket timeout
        outlives a blocking read); on fakeredis, ``client`` or a new single-connection one."""
        pool = self._reader.connection_pool
        if self._raw:
            return _Lane(_RawLink(pool))
        client = client or redis.Redis(connection_pool=pool, single_connection_client=True)
        return _Lane(_ClientLink(client, self._local_writes))

    async def open(self) -> None:
        """Connect now rather than at the first live topic; learn whether reads can be
        unblocked (``CLIENT UNBLOCK`` of no client: 0, or refused by an ACL)."""
        await self._lanes[0].connection.open()
        if self._local_writes is None:
            with contextlib.suppress(*REDIS_FAILURES):
                await self._unblock_client(0)

    def _cannot_unblock(self, error: ResponseError) -> None:
        """``CLIENT UNBLOCK`` refused (an ACL without ``@dangerous``, where it belongs):
        a lane's read cannot be interrupted, so each blocks briefly instead. A topic
        joining a lane waited for the 5 s block to pass, the reader asking again
        every 2 ms meanwhile (about 1,250 refused commands a second; audit)."""
        if self._xread_head is XREAD_HEAD:
            log.error(
                "redis: CLIENT UNBLOCK refused (%s): live reads block %d ms at a time, and a "
                "topic joining one waits up to that long; grant +client|unblock",
                error,
                c.LIVE_BLOCK_UNINTERRUPTIBLE_MS,
            )
            self._xread_head = XREAD_SHORT_HEAD

    async def read(
        self, positions: dict[str, StreamPosition], block_ms: int
    ) -> dict[str, list[LogEntry]]:
        """Entries after each topic's position, from whichever lanes have some, waiting
        up to ``block_ms``; {} when interrupted or nothing came."""
        self._place(positions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        wake = self._wake = asyncio.Event()
        try:
            while True:
                stale = await self._arm(positions)
                timeout = max(0.0, deadline - loop.time())
                batches = await self._wait(positions, wake, timeout, stale)
                if batches or wake.is_set() or loop.time() >= deadline:
                    return batches
        finally:
            self._wake = None

    def _place(self, streams: dict[str, StreamPosition]) -> None:
        """Forget topics no longer read; give each new one a lane with room; mark the
        lanes whose topics came or moved.

        This is the part of a read that grows with the live topics, so it runs in C
        (set operations on dict views, one dict comparison) and allocates only for
        what changed: ``_last`` already holds where the lanes' reads moved the
        positions to (``_collect``), so it equals ``streams`` unless a position
        moved otherwise (a topic expired: rare). A key is formatted and packed for
        Redis once, when its topic comes; an id when its position moves (here, or
        in ``_collect``), so ``_packed_ids`` always packs ``_last``'s positions.
        """
        last, packed_ids = self._last, self._packed_ids
        if streams == last:
            return  # (as after most reads: nothing came, went or moved otherwise)
        for key in last.keys() - streams.keys():
            del last[key], self._log_keys[key], self._packed_keys[key], packed_ids[key]
            lane = self._lane_of.pop(key)
            lane.leave(key)
            if not lane.topics:
                self._dirty.add(lane)  # its read is ended, and the lane closed
        for key in streams.keys() - last.keys():
            position = last[key] = streams[key]
            packed_ids[key] = packed_stream_id(position)
            log_key = self._log_keys[key] = c.log_key(key)
            self._packed_keys[key] = packed_bytes(log_key.encode())
            lane = self._lane_of[key] = self._lane_with_room()
            lane.join(key)
            self._dirty.add(lane)
        if streams != last:
            for key, position in streams.items() - last.items():
                packed_ids[key] = packed_stream_id(position)
                self._dirty.add(self._lane_of[key])
        self._last = dict(streams)  # ours to move on in _collect; the caller's stays as given

    def _lane_with_room(self) -> _Lane:
        for lane in self._lanes:
            if len(lane.topics) < self._lane_topics:
                return lane
        if len(self._lanes) < self._max_lanes:
            self._lanes.append(self._new_lane())
            return self._lanes[-1]
        return min(self._lanes, key=lambda lane: len(lane.topics))

    async def _arm(self, streams: dict[str, StreamPosition]) -> bool:
        """Start a read on each idle lane with keys; interrupt each running read that
        no longer names what it should. True if one could not be interrupted yet."""
        await self._close_idle_lanes()
        stale = False
        for lane in self._lanes:
            if lane.task is None:
                self._dirty.discard(lane)
                if lane.topics:
                    lane.armed = self._positions_of(lane, streams)
                    packed = self._packed_streams(lane) if self._raw else None
                    lane.task = asyncio.create_task(self._xread(lane, lane.armed, packed))
            elif lane in self._dirty:
                wanted = self._positions_of(lane, streams)
                # A key new to it, or moved back; or none left (ended, it is closed).
                if wanted.items() - lane.armed.items() or not wanted:
                    stale |= not await self._unblock(lane)
                else:
                    self._dirty.discard(lane)
        return stale

    def _positions_of(
        self, lane: _Lane, streams: dict[str, StreamPosition]
    ) -> dict[str, StreamPosition]:
        """The lane's topics and their positions, in the order its read names them
        (made in C: this runs for every topic of a lane each time it is re-armed)."""
        if lane.packed_keys is None:
            lane.order = tuple(lane.topics)
            lane.packed_keys = b"".join(map(self._packed_keys.__getitem__, lane.order))
        order = lane.order
        return dict(zip(order, map(streams.__getitem__, order), strict=True))

    def _packed_streams(self, lane: _Lane) -> bytes:
        """The arguments after ``STREAMS`` of the lane's read, packed: its keys, as
        packed when its topics last changed, then each one's id, packed when its
        position last moved (``_positions_of`` has just ordered them)."""
        assert lane.packed_keys is not None
        return lane.packed_keys + b"".join(map(self._packed_ids.__getitem__, lane.order))

    async def _close_idle_lanes(self) -> None:
        """Close the extra lanes left with no topic and no read: once a burst of live
        topics was over, each held a Redis connection for as long as the process ran."""
        for lane in [lane for lane in self._lanes[1:] if not lane.topics and lane.task is None]:
            self._lanes.remove(lane)
            self._dirty.discard(lane)
            with contextlib.suppress(*REDIS_FAILURES):
                await lane.connection.close()

    async def _wait(
        self, streams: dict[str, StreamPosition], wake: asyncio.Event, timeout: float, stale: bool
    ) -> dict[str, list[LogEntry]]:
        running = {lane.task for lane in self._lanes if lane.task is not None}
        waiter = asyncio.ensure_future(wake.wait())
        try:
            # A lane that could not be interrupted yet (its XREAD had not reached
            # Redis) is asked again soon.
            await asyncio.wait(
                running | {waiter},
                timeout=min(timeout, 0.002) if stale else timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            waiter.cancel()
        return await self._collect(streams)

    async def _collect(self, streams: dict[str, StreamPosition]) -> dict[str, list[LogEntry]]:
        """What the lanes that returned read, for the keys they still read from where
        they were armed (a key re-armed elsewhere is read again from there)."""
        batches: dict[str, list[LogEntry]] = {}
        for lane in self._lanes:
            task = lane.task
            if task is None or not task.done():
                continue
            lane.task = None
            if task.cancelled() or task.exception() is not None:
                await self._reset()
                error = task.exception() if not task.cancelled() else None
                raise (
                    error
                    if isinstance(error, StoreUnavailable)
                    else StoreUnavailable("live read cancelled")
                )
            for key, entries in task.result():
                topic = topic_of(key)
                if (
                    entries
                    and self._lane_of.get(topic) is lane
                    and lane.armed.get(topic) == streams.get(topic)
                ):
                    batch = [LogEntry.from_redis(topic, i, f) for i, f in entries]
                    batches[topic] = batch
                    # Where the hub's next read will start this topic (see _place).
                    position = self._last[topic] = batch[-1].position
                    self._packed_ids[topic] = _packed_id(entries[-1][0], position)
        return batches

    async def _xread(
        self, lane: _Lane, positions: dict[str, StreamPosition], packed_streams: bytes | None
    ) -> list[Any]:
        """The XREAD's reply as Redis sent it, as [(key, [[id, [field, value, ...]], ...]), ...].

        ``packed_streams``: its keys and ids packed already, for a raw link; else the
        command is made of ``positions`` for redis-py (fakeredis)."""
        head = self._xread_head  # (taken when the read starts: it may have just been shortened)
        command: bytes | tuple[Any, ...]
        if packed_streams is not None:
            size = len(head) + 2 * len(positions)
            command = array_count(size) + _PACKED_HEADS[head] + packed_streams
        else:
            keys = self._log_keys
            command = (
                *head,
                *[keys[topic] for topic in positions],
                *[format_stream_id(position) for position in positions.values()],
            )
        try:
            # (bytes for a raw link, a tuple for a client link: as ``_arm`` packed it)
            reply = await lane.connection.call(command)  # type: ignore[arg-type]
        except REDIS_FAILURES as error:
            await drop_idle_connections(self._commands)
            raise StoreUnavailable(f"live read failed: {error}") from error
        if isinstance(reply, Exception):  # an error reply
            raise StoreUnavailable(f"live read refused: {reply}") from reply
        if isinstance(reply, dict):  # RESP3 (redis-py's default): a map of key to entries
            return list(reply.items())
        return reply or []  # RESP2: [[key, entries], ...]; nil: BLOCK passed, or CLIENT UNBLOCK

    async def _unblock(self, lane: _Lane) -> bool:
        if isinstance(lane.connection, _ClientLink) and self._local_writes is not None:
            return lane.connection.unblock()
        client_id = lane.connection.client_id
        if client_id is None:
            return False
        try:
            return await self._unblock_client(client_id)
        except REDIS_FAILURES:
            return False

    async def _unblock_client(self, client_id: int) -> bool:
        """Whether the client's blocking read was ended, or will end by itself soon."""
        if self._xread_head is XREAD_SHORT_HEAD:
            return True  # (waited for, not asked again every 2 ms)
        try:
            return bool(await self._commands.client_unblock(client_id))
        except ResponseError as error:  # refused by an ACL (NOPERM), or renamed away
            if not is_misconfiguration(error):
                raise
            self._cannot_unblock(error)
            return True

    async def _reset(self) -> None:
        """After a failed read: every lane's read ended, the extra lanes' connections
        closed, all topics placed again at the next read."""
        await self._end_reads(timeout=2)
        for lane in self._lanes[1:]:
            with contextlib.suppress(*REDIS_FAILURES):
                await lane.connection.close()
        self._lanes = [_Lane(self._lanes[0].connection)]  # (it reconnects when next used)
        self._lane_of, self._last, self._dirty, self._log_keys = {}, {}, set(), {}
        self._packed_keys, self._packed_ids = {}, {}

    def take_unread_spells(self) -> dict[str, float]:
        """One connection reads every topic: none goes unread while the others are read."""
        return {}

    async def interrupt(self) -> bool:
        """Make the waiting read return now; False when none is waiting."""
        if self._wake is None:
            return False
        self._wake.set()
        return True

    async def _end_reads(self, timeout: float | None) -> None:
        """Unblock and cancel every lane's running read, and wait for them to end
        (without taking their errors for ours, nor swallowing our own cancellation)."""
        tasks = [lane.task for lane in self._lanes if lane.task is not None]
        for lane in self._lanes:
            if lane.task is not None:
                await self._unblock(lane)
                lane.task.cancel()
                lane.task = None
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a failed read's error was already reported

    async def drop_connections(self) -> None:
        """Drop every lane's connection now (the primary moved): a read under way fails,
        as when Redis goes away, and the next read reconnects, asking the Sentinels."""
        for lane in self._lanes:
            with contextlib.suppress(*REDIS_FAILURES):
                await lane.connection.close()
        await self._reader.connection_pool.disconnect()

    async def close(self) -> None:
        await self._end_reads(timeout=2)
        for lane in self._lanes:
            await lane.connection.close()
        await self._reader.aclose()


_Reads = dict[LiveRead, dict[str, str]]
"""A node's live reads, each naming its keys and the positions after which to read."""
_Groups = dict[str, tuple[Any, _Reads]]
"""Each node's name: the node, and its reads."""


def _topics_of(slots: _Reads) -> list[str]:
    return [c.topic_of_key(key) for streams in slots.values() for key in streams]


class _NodeRead(NamedTuple):
    """A Cluster node's live read under way: its task, the slots (and positions) it
    asked, and when (loop time)."""

    task: asyncio.Task[Any]
    slots: _Reads
    asked_at: float


class ClusterLiveReader:
    """The live reader on a Redis Cluster: one connection per primary, polling.

    An XREAD may only name keys of one *slot* (CROSSSLOT otherwise), so one
    blocking XREAD per node is impossible, and one per slot would grow with the
    topics. Instead each primary gets one connection and one pipeline of
    non-blocking XREADs, one per slot, and all primaries are asked at once.
    While events flow it asks every ``CLUSTER_POLL_MIN_MS``; when nothing comes
    it backs off to ``CLUSTER_POLL_MAX_MS`` (the most a first event after a
    quiet spell waits).

    When no topic could be read (every node asked failed, or refused every
    slot), the read raises StoreUnavailable: the slot map is refreshed and the
    hub reads again from what it delivered. When some failed (a node, or one
    slot a node refused: migrating, moved) while others were read, what was
    read is returned (never dropped) and the failed topics are simply absent,
    so the hub reads them again from the same positions; each such failure is
    logged, counted as a ``live_read`` store error, and refreshes the slot map
    in the background (a failover or a migration's end moves the topics to the
    new owner at the next read), and the hub is told how long they went unread.
    A slot being migrated is no failure: its ``ASK`` and ``TRYAGAIN`` place its
    topics' reads anew (``MigratingReads``: key by key, a moved key asked of the
    importing node), read at the next poll, at once.
    """

    def __init__(
        self, cluster: RedisCluster, options: dict[str, Any], observer: Observer | None = None
    ) -> None:
        self._cluster = cluster
        self._options = options
        self._observer = observer or Observer()
        self._clients: dict[str, redis.Redis] = {}
        self._interrupted: asyncio.Event | None = None
        self._pause_ms = c.CLUSTER_POLL_MIN_MS
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = -math.inf
        self._logged_at: dict[str, float] = {}  # node name -> when its failure was last logged
        self._unread_since: dict[str, float] = {}  # a failed node's topics -> since when
        self._unread_spells: dict[str, float] = {}  # topics read again -> how long not (ms)
        self._failing: set[str] = set()  # nodes whose read failed (in part) at the last poll
        # Each node's read under way, and the slots it asked: one node that hangs (a fork,
        # swapping, a lost path, SIGSTOP) held every node's topics until its socket timed
        # out (10 s, again and again until the cluster failed it over: 15-20 s of every
        # topic of the cluster stalled); it is waited for CLUSTER_NODE_POLL_S at most.
        self._in_flight: dict[str, _NodeRead] = {}
        self._migrating = MigratingReads(cluster)
        self._rerouted = False  # a migration moved some reads at the last poll

    async def open(self) -> None:
        """Nothing yet: a primary's connection opens with its first live topic."""

    async def read(
        self, positions: dict[str, StreamPosition], block_ms: int
    ) -> dict[str, list[LogEntry]]:
        streams = {c.log_key(t): format_stream_id(pos) for t, pos in positions.items()}
        groups = await self._group_by_node_and_slot(streams)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        interrupted = self._interrupted = asyncio.Event()
        while True:
            entries = await self._poll(groups)
            if entries:
                self._pause_ms = c.CLUSTER_POLL_MIN_MS
                return entries
            if interrupted.is_set() or loop.time() >= deadline:
                return {}
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(interrupted.wait(), self._pause_ms / 1000)
            if self._rerouted:  # (a migration's reads, placed anew: asked again soon)
                self._pause_ms = c.CLUSTER_POLL_MIN_MS
            else:
                self._pause_ms = min(self._pause_ms * 2, c.CLUSTER_POLL_MAX_MS)
            if self._failing or self._rerouted:
                # Some went unread (a node or a slot failed): ask where the refreshed slot
                # map says, not the old node again until the block time ends (a moved
                # slot's topic stalled 5 s while the others were quiet; review).
                groups = await self._group_by_node_and_slot(streams)

    async def _group_by_node_and_slot(self, streams: dict[str, str]) -> _Groups:
        """Each node's reads: one per slot; a migrating slot's, per key (MigratingReads)."""
        self._rerouted = False
        groups: _Groups = {}
        try:
            if not self._cluster.nodes_manager.slots_cache:
                await self._cluster.initialize()
            for key, position in streams.items():
                owner = self._cluster.get_node_from_key(key)
                if owner is None:
                    raise StoreUnavailable(f"no cluster node serves {key}")
                node, read = self._migrating.place(key, self._cluster.keyslot(key), owner)
                reads = groups.setdefault(node.name, (node, {}))[1]
                reads.setdefault(read, {})[key] = position
        except REDIS_FAILURES as error:
            raise StoreUnavailable(f"cluster slot map unavailable: {error}") from error
        self._migrating.forget(streams, {read.slot for _, r in groups.values() for read in r})
        return groups

    async def _poll(self, groups: _Groups) -> dict[str, list[LogEntry]]:
        polls, fresh = self._node_polls(groups)
        if fresh:  # (a read asked at a poll before is not waited for again)
            await asyncio.wait(fresh, timeout=c.CLUSTER_NODE_POLL_S)
        merged: dict[str, list[LogEntry]] = {}
        failed: dict[str, Exception] = {}  # topic -> why it went unread
        failures: dict[str, Exception] = {}  # node -> its (first) failure
        for name, slots, result in self._answers(polls, groups):
            if isinstance(result, Exception):  # the node: every topic of it
                failures[name] = result
                failed.update(dict.fromkeys(_topics_of(slots), result))
            elif isinstance(result, BaseException):
                raise result  # a cancellation, not a node's failure
            else:
                entries, refused = result
                merged.update(entries)
                unread = self._not_followed(name, slots, refused)
                failed.update(unread)
                if unread:
                    failures[name] = next(iter(unread.values()))
        if failed or self._unread_since:
            self._note_unread(groups, failed, merged)
        failing, self._failing = self._failing, set(failures)
        if not failed:
            return merged
        if not merged and len(failed) == sum(len(_topics_of(s)) for _, s in groups.values()):
            # Nothing read at all: the hub counts it, waits, and reads again.
            await self._refresh_now()
            failure = next(iter(failures.values()))
            raise StoreUnavailable(f"live read failed: {failure}") from failure
        for name, failure in failures.items():
            self._node_failed(name, failure, again=name in failing)
        return merged

    def _answers(
        self,
        polls: dict[str, _NodeRead],
        groups: _Groups,
    ) -> list[tuple[str, _Reads, Any]]:
        """Each node's answer (entries, or its failure), with the slots it asked. A node
        still reading is left out (its topics keep their positions) until its read has
        taken CLUSTER_NODE_STUCK_S: then it has failed (a TimeoutError), and its topics
        go unread as a failed node's do. (Taken for a failure at once, a node slower
        than a poll's wait was never delivered from: each late answer came as after a
        failure, and was checked against retention and dropped.)"""
        answers = []
        now = asyncio.get_running_loop().time()
        for name, read in polls.items():
            slots, poll = read.slots, read.task
            if not poll.done():
                if now - read.asked_at >= c.CLUSTER_NODE_STUCK_S:
                    answers.append((name, slots, _outcome(poll)))
                continue
            self._in_flight.pop(name, None)
            outcome = _outcome(poll)  # (read even when dropped: no exception unretrieved)
            if slots != groups[name][1]:
                # A read from a poll before, asked from other positions or of other
                # topics (the slot map moved, the hub went on): its entries could
                # repeat what was delivered since. Dropped: asked anew next poll.
                continue
            answers.append((name, slots, outcome))
        return answers

    def _not_followed(
        self, name: str, reads: _Reads, refused: dict[LiveRead, Exception]
    ) -> dict[str, Exception]:
        """The topics of the node's refused reads, with why, but for those a slot's
        migration sends elsewhere (ASK, TRYAGAIN): those are read there at once."""
        self._migrating.settle(name, reads, refused)
        unread: dict[str, Exception] = {}
        for read, error in refused.items():
            if self._migrating.follow(name, read, reads[read], error):
                self._rerouted = True
            else:
                unread.update(dict.fromkeys(map(c.topic_of_key, reads[read]), error))
        return unread

    def _node_polls(self, groups: _Groups) -> tuple[dict[str, _NodeRead], set[asyncio.Task[Any]]]:
        """Each node's read: a new one, or the one still under way from a poll before (a
        node that does not answer is not asked again on top of it); and the new ones."""
        loop = asyncio.get_running_loop()
        for name in [n for n, r in self._in_flight.items() if n not in groups and r.task.done()]:
            _outcome(self._in_flight.pop(name).task)  # (a node no longer asked: answer read)
        fresh = set()
        for name, (node, slots) in groups.items():
            if name not in self._in_flight:
                task = loop.create_task(self._poll_node(node, slots))
                self._in_flight[name] = _NodeRead(task, slots, loop.time())
                fresh.add(task)
        return {name: self._in_flight[name] for name in groups}, fresh

    def _note_unread(
        self,
        groups: _Groups,
        failed: dict[str, Exception],
        merged: dict[str, list[LogEntry]],
    ) -> None:
        """Which topics a failed node (or slot: migrating) left unread, and since when;
        once read with entries again, for how long (``take_unread_spells``: retention
        by age may have removed what they had not read meanwhile, which the hub
        checks). Topics no longer read are forgotten."""
        now = asyncio.get_running_loop().time()
        unread: dict[str, float] = {}
        for _, slots in groups.values():
            for topic in _topics_of(slots):
                since = self._unread_since.get(topic)
                if topic in failed:
                    unread[topic] = now if since is None else since
                elif since is not None and topic in merged:
                    self._unread_spells[topic] = (now - since) * 1000
                elif since is not None:
                    unread[topic] = since  # nothing new yet: checked when it comes
        self._unread_since = unread

    def take_unread_spells(self) -> dict[str, float]:
        """Topics read again by the last read after their node failed, with how long
        (ms) they went unread; each is told once."""
        spells, self._unread_spells = self._unread_spells, {}
        return spells

    def _node_failed(self, name: str, failure: Exception, *, again: bool) -> None:
        """A node (or a slot of it) failed while others answered: said (at most every
        ``_NODE_FAILURE_LOG_EVERY_S``), counted once a spell, and the slot map refreshed."""
        if not again:  # (the same spell, polled again: already counted)
            self._observer.store_error("live_read")
        now = asyncio.get_running_loop().time()
        if now - self._logged_at.get(name, -math.inf) >= _NODE_FAILURE_LOG_EVERY_S:
            self._logged_at[name] = now
            log.warning(
                "cluster: live read of node %s failed (its topics are read again): %s",
                name,
                failure,
            )
        self._start_refresh()

    async def _poll_node(
        self, node: Any, reads: _Reads
    ) -> tuple[dict[str, list[LogEntry]], dict[LiveRead, Exception]]:
        """The node's new entries, and the reads it refused (a slot migrating, or moved:
        ASK, MOVED, TRYAGAIN), with why: its other slots are read on (one refused read
        threw the node's whole answer away, and every topic of the node stalled while
        one slot moved). A read of an importing slot's key follows ``ASKING`` in the
        same write, on the same connection. Raises if the node fails."""
        client = self._clients.get(node.name)
        if client is None:
            client = redis.Redis(host=node.host, port=int(node.port), **self._options)
            self._clients[node.name] = client
        async with client.pipeline(transaction=False) as pipe:
            for read, streams in reads.items():
                if read.asking:
                    pipe.execute_command("ASKING")
                pipe.xread(streams, count=c.LIVE_READ_COUNT)  # type: ignore[arg-type]
            replies = iter(await pipe.execute(raise_on_error=False))
        entries: dict[str, list[LogEntry]] = {}
        refused: dict[LiveRead, Exception] = {}
        for read in reads:
            if read.asking:
                next(replies)  # (an ASKING refused: its XREAD is refused too, MOVED)
            reply = next(replies)
            if isinstance(reply, Exception):
                refused[read] = reply
                continue
            for key, items in reply or []:
                topic = topic_of(key)
                entries[topic] = [LogEntry(topic, parse_stream_id(i), f) for i, f in items]
        return entries, refused

    def _start_refresh(self) -> None:
        """Refresh the slot map in the background: the entries in hand go out first.

        One at a time and at most every ``_REFRESH_EVERY_S``: while events flow a
        poll runs every few milliseconds, and each would refresh again.
        """
        now = asyncio.get_running_loop().time()
        if (self._refresh and not self._refresh.done()) or now - self._refreshed_at < (
            _REFRESH_EVERY_S
        ):
            return
        self._refreshed_at = now
        self._refresh = asyncio.get_running_loop().create_task(self._refresh_slots())

    async def _refresh_now(self) -> None:
        """Refresh the slot map before going on (or wait for the refresh under way)."""
        if self._refresh is not None and not self._refresh.done():
            await asyncio.shield(self._refresh)
            return
        self._refreshed_at = asyncio.get_running_loop().time()
        await self._refresh_slots()

    async def _refresh_slots(self) -> None:
        try:
            await self._cluster.nodes_manager.initialize()
        except REDIS_FAILURES:
            log.warning("cluster: could not refresh the slot map yet")

    async def interrupt(self) -> bool:
        if self._interrupted is None:
            return False
        self._interrupted.set()
        return True

    async def close(self) -> None:
        for task in [self._refresh, *(read.task for read in self._in_flight.values())]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, *REDIS_FAILURES):
                    await task
        self._in_flight.clear()
        for client in self._clients.values():
            await client.aclose()


def _outcome(poll: asyncio.Task[Any]) -> Any:
    """A node's read: its answer, its failure, or (still under way) a TimeoutError."""
    if not poll.done():
        return TimeoutError(f"no answer in {c.CLUSTER_NODE_STUCK_S:g} s (asked again when it does)")
    if poll.cancelled():
        return asyncio.CancelledError()
    return poll.exception() or poll.result()


AnyLiveReader = LiveReader | ClusterLiveReader
