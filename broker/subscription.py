"""A subscription: replay what the client missed from the log, then tail live events.

The switch from replay to live has no gap and no duplicate: the subscription
attaches to the hub *before* it reads the log, so every entry appended after
that reaches its buffer; the catch-up read then covers everything before, and
positions drop what both delivered.

A topic goes back to the log ("resync") whenever live delivery cannot be
trusted: at the start, when the buffer overflowed while replaying, or when an
entry of another epoch shows that the log was recreated. A resync judges the
cursor again (``broker.resume``) and sends a gap notice when the truth needs one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Literal

import orjson

from broker import constants as c
from broker.errors import StoreUnavailable
from broker.fanout import Hub
from broker.framing import HEARTBEAT, id_line
from broker.heartbeat import HeartbeatClock
from broker.ids import EventId, format_cursor
from broker.model import LogEntry, LogState
from broker.observer import Observer
from broker.resume import Gap, earliest_point, latest_point, resume_point
from broker.store import Store

StartFrom = EventId | Literal["earliest", "now"]
"""Where one topic starts: after an id, at the oldest retained event, or at the end."""


class SubscriberTooSlow(Exception):
    """The subscriber's buffer overflowed; it was dropped and should resume by id."""


class Subscription:
    """One client's stream over one or more topics."""

    def __init__(
        self,
        store: Store,
        hub: Hub,
        starts: dict[str, StartFrom],
        *,
        buffer_bytes: int = c.DEFAULT_SUBSCRIBER_BUFFER_BYTES,
        heartbeats: HeartbeatClock | None = None,
        observer: Observer | None = None,
    ) -> None:
        self._store = store
        self._hub = hub
        self._multi = len(starts) > 1
        self._starts: dict[str, StartFrom] = dict(starts)
        self._positions: dict[str, EventId] = {}
        self._buffer_limit = buffer_bytes
        self._heartbeats = heartbeats or HeartbeatClock(c.DEFAULT_HEARTBEAT_SECONDS)
        self._last_sent = time.monotonic()
        self._observer = observer or Observer()
        self._pending: list[LogEntry] = []
        self._pending_bytes = 0
        self._resync: set[str] = set(starts)
        self._catching_up = True
        self._replayed = 0
        self._dropped = False
        self._closed = False
        self._attached: list[str] = []
        self._waiter: asyncio.Future[bool] | None = None
        self._consumer_idle = False
        """The consumer holds nothing and is not running: parked in ``_wait``, or (an edge
        consuming with ``until_idle``) its pump has ended. A live entry may then be
        written directly without overtaking anything."""
        self.on_drop: Callable[[], None] | None = None
        """Called once when the subscriber is dropped for being too slow."""
        self.write_now: Callable[[bytes], bool] | None = None
        """Set by the edge when it can write to the client synchronously: True if it
        wrote the chunk, False if it wrote nothing (the socket is full)."""
        self.on_wanted: Callable[[], None] | None = None
        """Set by an edge that consumes with ``chunks(until_idle=True)``: called when
        there is something to send and no consumer is running, to start one."""

    @property
    def topics(self) -> Sequence[str]:
        return list(self._starts)

    @property
    def is_live(self) -> bool:
        """Caught up with the log: what comes now comes from the live reader."""
        return not self._catching_up and not self._resync

    async def open(self) -> None:
        """Attach to every topic; raises StoreUnavailable if the store cannot answer."""
        try:
            self._heartbeats.add(self)
            for topic in self._starts:
                await self._hub.attach(topic, self)
                self._attached.append(topic)
            for topic, start in self._starts.items():
                if start == "now":  # "now" is now: read once attached, not when first iterated
                    self._positions[topic] = latest_point(await self._store.state(topic))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Free the subscription at once: no reader registration or buffer is left."""
        self._closed = True
        self._heartbeats.discard(self)
        for topic in self._attached:
            self._hub.detach(topic, self)
        self._attached.clear()
        self._pending = []
        self._wake(False)

    async def chunks(self, *, until_idle: bool = False) -> AsyncIterator[bytes]:
        """What to write to the client, coalesced; a heartbeat when idle.

        With ``until_idle`` it ends instead of waiting, once live with nothing to
        send: from then on the hub writes through ``write_now`` and ``on_wanted``
        asks for a new consumer, so an idle stream holds no task.
        Raises SubscriberTooSlow when the client could not keep up.
        """
        self._consumer_idle = False
        while not self._closed:
            if self._dropped:
                raise SubscriberTooSlow()
            if self._resync:
                async for chunk in self._catch_up():
                    self._last_sent = time.monotonic()
                    yield chunk
                continue
            chunk = self._drain_live()
            if chunk:
                self._last_sent = time.monotonic()
                yield chunk
            elif until_idle and not self._resync:  # (draining may have found a new epoch)
                self._consumer_idle = True
                return
            elif not await self._wait() and not self._closed:
                self._last_sent = time.monotonic()
                yield HEARTBEAT

    # -- what the hub calls ------------------------------------------------

    def offer(self, entries: list[LogEntry], size: int) -> int:
        if self._dropped or self._closed:
            return 0
        if self.write_now is not None and self._parked_live():
            written = self._write_directly(entries)
            if written is not None:
                return written
        self._pending += entries
        self._pending_bytes += size
        if self._pending_bytes > self._buffer_limit:
            self._overflow()
        self._wake(True)
        return 0

    def _parked_live(self) -> bool:
        """Live, nothing queued, and the consumer idle: nothing can be overtaken."""
        return self._consumer_idle and not self._pending and not self._resync

    def _write_directly(self, entries: list[LogEntry]) -> int | None:
        """The steady state of a stream, with no task wake-up per event: the reader's
        call writes the frames (shared, for a single topic) straight to the client.

        None when this cannot be done here (another epoch, or the client's socket
        is full): the entries then take the queued path.
        """
        if self.write_now is None:
            return None
        topic = entries[0].topic
        position = self._positions[topic]
        if any(e.epoch != position.epoch for e in entries):
            return None
        fresh = [e for e in entries if e.position > position.position]
        if not fresh:
            return 0
        if self._multi:
            positions = dict(self._positions)  # committed only once written
            chunk = b"".join(self._frame(e, positions) for e in fresh)
        elif len(fresh) == 1:
            chunk = fresh[0].frame
        else:
            chunk = b"".join(e.frame for e in fresh)
        if not self.write_now(chunk):
            return None
        self._last_sent = time.monotonic()
        self._positions[topic] = fresh[-1].id
        return len(fresh)

    def beat_if_idle(self, now: float, idle_for: float) -> None:
        """The heartbeat clock's call: beat straight to the socket if we can."""
        if now - self._last_sent < idle_for or self._closed:
            return
        if self.write_now is not None and self._parked_live() and self.write_now(HEARTBEAT):
            self._last_sent = now
        else:
            self._wake(False)

    def log_reset(self, topic: str) -> None:
        self._resync.add(topic)
        self._wake(True)

    def _overflow(self) -> None:
        self._pending = []
        self._pending_bytes = 0
        if self._catching_up:
            # Still reading the log: forget the live copies, the log has them too.
            self._resync.update(self._starts)
        else:
            self._dropped = True
            self._observer.subscriber_dropped()
            if self.on_drop is not None:
                self.on_drop()

    # -- catching up from the log -------------------------------------------

    async def _catch_up(self) -> AsyncIterator[bytes]:
        """Judge every topic in resync first (so a multi-topic cursor is whole), then replay."""
        self._catching_up = True
        self._replayed = 0
        backoff = c.RECONNECT_BACKOFF_MIN
        while self._resync and not self._closed:
            topics = sorted(self._resync)
            self._resync.clear()
            try:
                for topic in topics:
                    gap = self._judge_start(topic, await self._store.state(topic))
                    if gap is not None:
                        yield self._gap_frame(topic, gap)
                for topic in topics:
                    async for chunk in self._replay_topic(topic):
                        yield chunk
            except StoreUnavailable:
                # Keep the stream open and try again once the store is back;
                # the heartbeat tells the client (and proxies) we are alive.
                self._resync.update(topics)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, c.RECONNECT_BACKOFF_MAX)
                yield HEARTBEAT
        self._catching_up = False
        if self._replayed:
            self._observer.replayed(self._replayed)  # one catch-up, one size

    async def _replay_topic(self, topic: str) -> AsyncIterator[bytes]:
        """Page through the log after the topic's position, up to its end."""
        while not self._closed:
            position = self._positions[topic]
            page = await self._store.read_range(topic, position.position, c.REPLAY_PAGE_SIZE)
            frames = self._accept_replayed(topic, page)
            if frames is None:  # the log changed under us: judge the cursor again
                self._resync.add(topic)
                return
            if frames:
                self._replayed += len(frames)
                self._observer.delivered(len(frames))
                yield b"".join(frames)
            if len(page) < c.REPLAY_PAGE_SIZE:
                return

    def _judge_start(self, topic: str, state: LogState) -> Gap | None:
        """Set the topic's position from its cursor; the gap notice it needs, if any."""
        position = self._positions.get(topic)
        if position is None:
            start = self._starts[topic]
            if start == "earliest":
                self._positions[topic] = earliest_point(state)
                return None
            assert isinstance(start, EventId)
            position = start
        self._positions[topic], gap = resume_point(position, state)
        return gap

    def _accept_replayed(self, topic: str, page: list[LogEntry]) -> list[bytes] | None:
        frames: list[bytes] = []
        for entry in page:
            position = self._positions[topic]
            if entry.epoch != position.epoch and not position.is_origin:
                return None
            if position.is_origin or entry.position > position.position:
                frames.append(self._advance(entry))
        return frames

    def _gap_frame(self, topic: str, gap: Gap) -> bytes:
        self._observer.gap_sent(gap.reason)
        data = {
            "reason": gap.reason,
            "requested": str(gap.requested),
            "resumed_after": str(gap.resumed_after) if gap.resumed_after else None,
            "topic": topic,
        }
        return (
            id_line(self._current_id(topic))
            + b"event: "
            + c.GAP_EVENT.encode()
            + b"\ndata: "
            + orjson.dumps(data)
            + b"\n\n"
        )

    # -- live ------------------------------------------------------------------

    def _drain_live(self) -> bytes:
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        frames: list[bytes] = []
        for entry in pending:
            topic = entry.topic
            if topic in self._resync:
                continue
            position = self._positions[topic]
            if entry.epoch != position.epoch:
                # Another log than the one we follow: go back to the log to judge.
                self._resync.add(topic)
            elif entry.position > position.position:
                frames.append(self._advance(entry))
        if frames:
            self._observer.delivered(len(frames))
        return b"".join(frames)

    def _advance(self, entry: LogEntry) -> bytes:
        return self._frame(entry, self._positions)

    def _frame(self, entry: LogEntry, positions: dict[str, EventId]) -> bytes:
        """Move ``positions`` past the entry; its frame, with the cursor of every
        topic as its id on a multi-topic stream."""
        positions[entry.topic] = entry.id
        if not self._multi:
            return entry.frame
        return id_line(format_cursor(positions)) + entry.body

    def _current_id(self, topic: str) -> str:
        if self._multi:
            return format_cursor(self._positions)
        return str(self._positions[topic])

    async def _wait(self) -> bool:
        """Wait for something to send; False when it is time for a heartbeat."""
        if self._pending or self._resync or self._dropped or self._closed:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self._consumer_idle = True
        try:
            return await waiter
        finally:
            self._waiter = None
            self._consumer_idle = False

    def _wake(self, woken: bool) -> None:
        """Get the idle consumer going: resolve its wait, or (``woken`` only) ask the
        edge for a new one. A running consumer needs nothing: it looks again anyway."""
        if not self._consumer_idle:
            return
        waiter = self._waiter
        if waiter is not None:
            self._consumer_idle = False
            waiter.set_result(woken)
        elif woken and self.on_wanted is not None:
            self._consumer_idle = False
            self.on_wanted()
