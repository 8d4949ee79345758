"""The live side of the Redis store: blocking XREADs that the hub re-arms.

One reader (a few lanes, each one connection and one XREAD at a time) per Redis
server. On a Cluster, one connection per primary, polled, since an XREAD may only
name keys of one node: ``redis_live_cluster``. A lane's connection, to Redis or
to the embedded store, and the XREAD it sends: ``redis_live_links``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as redis
from redis.exceptions import ResponseError

from broker import constants as c
from broker.errors import StoreUnavailable
from broker.ids import StreamPosition, format_stream_id
from broker.model import LogEntry
from broker.redis_checks import is_misconfiguration
from broker.redis_live_cluster import ClusterLiveReader
from broker.redis_live_links import (
    XREAD_HEAD,
    XREAD_SHORT_HEAD,
    ClientLink,
    Link,
    LocalWrites,
    RawLink,
)
from broker.redis_options import REDIS_FAILURES, drop_idle_connections
from broker.redis_packing import (
    array_count,
    packed_bytes,
    packed_stream_id,
    packed_without_count,
)

log = logging.getLogger(__name__)

_PACKED_HEADS = {head: packed_without_count(head) for head in (XREAD_HEAD, XREAD_SHORT_HEAD)}


def _packed_id(raw_id: object, position: StreamPosition) -> bytes:
    """The id of an entry read, packed: from its bytes as Redis sent them, which it
    writes as ``format_stream_id`` does (``<ms>-<seq>`` in decimal), or else from
    its position."""
    if type(raw_id) is bytes:
        return packed_bytes(raw_id)
    return packed_stream_id(position)


class _Lane:
    """Some of the live topics, read by one blocking XREAD on a connection of its own.

    Its read outlives the ``LiveReader.read`` call that armed it: it is re-armed
    only when it returned, or when the keys or positions it should name changed.
    """

    __slots__ = ("armed", "connection", "order", "packed_keys", "task", "topics")

    def __init__(self, connection: Link) -> None:
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
            return _Lane(RawLink(pool))
        client = client or redis.Redis(connection_pool=pool, single_connection_client=True)
        return _Lane(ClientLink(client, self._local_writes))

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
                topic = c.topic_of_log_key(key)
                if (
                    entries
                    and self._lane_of.get(topic) is lane
                    and lane.armed.get(topic) == streams.get(topic)
                ):
                    if len(entries) == 1:  # (most: a token stream read as it comes)
                        batch = [LogEntry.from_redis(topic, *entries[0])]  # (no comprehension)
                    else:
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
        if isinstance(lane.connection, ClientLink) and self._local_writes is not None:
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


AnyLiveReader = LiveReader | ClusterLiveReader
