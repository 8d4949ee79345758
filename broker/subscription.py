"""A subscription: replay what the client missed from the log, then tail live events.

The switch from replay to live has no gap and no duplicate: the subscription
attaches to the hub *before* it reads the log, so every entry appended after
that reaches its buffer; the catch-up read then covers everything before, and
positions drop what both delivered.

Going back to the log (at the start, and whenever live delivery cannot be
trusted: judge each cursor, tell the gaps, replay) is ``CatchUp``'s part
(``broker.subscription_replay``); what the heartbeat clock calls on each tick (a beat,
the end of its credentials, the drop of a client that stopped reading) is
``ClockCalls``' (``broker.subscription_clock``), which extends it, and which
``Subscription`` extends.

How an edge consumes a subscription (its ``StreamSink``, given at construction):

- *pulled*: the edge iterates ``chunks()`` for the stream's life; between chunks
  the consumer is parked in ``_wait`` and everything new wakes it.
- *pushed*: the edge iterates ``chunks(until_idle=True)`` in a short-lived pump,
  which ends once the stream is live with nothing to send. While it is parked
  (``_consumer_idle``) and nothing is queued, the hub's call writes live entries
  straight through ``sink.write`` (no task wake-up per event) and the heartbeat
  clock beats the same way; anything that cannot be written so is queued and
  ``sink.wanted()`` starts a new pump.
- either way, a subscriber whose queue overflows while live is dropped
  (``sink.dropped()``; ``chunks`` raises SubscriberTooSlow), and one that ends
  (its token expired, ``expire``) calls ``sink.ended()`` once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

from broker import constants as c
from broker.errors import StreamOver
from broker.fanout import Hub
from broker.framing import HEARTBEAT
from broker.heartbeat import HeartbeatClock
from broker.ids import EventId, StreamPosition
from broker.model import LiveBatch, LogEntry, LogState
from broker.observer import Observer
from broker.origins import HeldOrigins
from broker.resume import (
    latest_point,
)
from broker.sink import PulledSink, StreamSink
from broker.store import Store
from broker.subscription_clock import ClockCalls
from broker.subscription_replay import ForeignCursor, StartFrom

log = logging.getLogger(__name__)


class SubscriberTooSlow(Exception):
    """The subscriber's buffer overflowed; it was dropped and should resume by id."""


class Subscription(ClockCalls):
    """One client's stream over one or more topics."""

    # Slots, not a dict: the hub's direct write reads a dozen fields of every subscriber
    # of a topic in a row. With 33 fields an instance outgrew CPython's shared-key dict
    # (30 keys) and carried a dict of its own, a second object to fetch per read. (The
    # state its catching up reads and moves is in ``CatchUp``'s slots; the heartbeat
    # clock's own, in ``ClockCalls``'.)
    __slots__ = (
        "_attached",
        "_consumer_idle",
        "_dropped",
        "_heartbeats",
        "_hub",
        "_log_starts",
        "_pending_bytes",
        "_sink",
        "_waiter",
    )

    def __init__(
        self,
        store: Store,
        hub: Hub,
        starts: dict[str, StartFrom],
        *,
        sink: StreamSink | None = None,
        buffer_bytes: int = c.DEFAULT_SUBSCRIBER_BUFFER_BYTES,
        heartbeats: HeartbeatClock | None = None,
        observer: Observer | None = None,
        expires_at: float | None = None,
        trusted: Callable[[], bool] | None = None,
        positions: bool = False,
        beat_events: bool = False,
    ) -> None:
        self._store = store
        self._trusted = trusted  # False once its credentials are revoked: it ends
        self._sink: StreamSink = sink or PulledSink()
        self._hub = hub
        self._multi = len(starts) > 1
        self._starts: dict[str, StartFrom] = dict(starts)
        self._positions: dict[str, EventId] = {}
        self._buffer_limit = buffer_bytes
        self._heartbeats = heartbeats or HeartbeatClock(c.DEFAULT_HEARTBEAT_SECONDS)
        self._beat = self._heartbeats.beat_event if beat_events else HEARTBEAT
        """What a beat writes: the ``:`` comment, or (the client asked: ``?heartbeat=event``)
        a ``broker.beat`` event its script sees. Chosen here, once: a beat on the direct
        path writes these bytes and branches on nothing."""
        self._last_beat = time.monotonic()
        # When its credentials expire (unix time), as a deadline of the monotonic clock.
        self._ends_at = None if expires_at is None else self._last_beat + expires_at - time.time()
        self._observer = observer or Observer()
        self._pending: list[LogEntry] = []
        self._pending_bytes = 0
        self._log_starts: dict[str, LogEntry] = {}
        """Per topic, the first entry of a new log, queued as the live reader read it from
        its start: a topic at the origin takes it (and what follows) as it is, as the
        direct write does, rather than go back to a log that may be gone by then."""
        self._deleted_before: dict[str, set[str]] = {}
        """Per topic at the origin, the epochs of logs deleted before the stream stood
        there: their markers linger in the log a while, and are not this stream's."""
        self._seen_at_origin: dict[str, str] = {}
        """Per topic at the origin, the epoch of a log whose entries came live but were
        not delivered (it went back to the log to judge them): owed, or told."""
        self._origins: HeldOrigins | None = None  # (made for the first: most hold none)
        """The origins its client holds of expiring topics, sent a later one when due
        (see ``broker.origins``): on the heartbeat clock's tick, which sets
        ``_origins_due``, by the consumer, which reads the store."""
        self._origins_due = False
        self._resync: set[str] = set(starts)
        self._catching_up = True
        self._replayed = 0
        self._deletion_notices = 0
        """Deletion markers framed since the last count of events delivered: each is told
        as a ``broker.gap``, counted as one (``gap_sent``), not as an event delivered."""
        self._dropped = False
        self._closed = False
        self._attached: list[str] = []
        self._over: set[str] = set()
        """Topics whose stream is over: their end (or deletion) was delivered, or the
        cursor was already at the end of a closed topic. All over: the stream ends."""
        # Where each topic's client was told of an unknown loss (the gap's resumed_after):
        # a replay from there, past a loss the log recorded, tells it no second time.
        self._told_loss_at: dict[str, StreamPosition] = {}
        self._opening_states: dict[str, LogState] = {}
        self._position_events = positions
        """Where the stream stands goes as a ``broker.position`` event, not an ``id:``
        line with no data: the client asked (see ``framing.position_frame``)."""
        self._announce = positions or "now" in self._starts.values()
        """A topic starts "now": once caught up, the stream's cursor is sent (an ``id:``
        with no data, which ``EventSource`` keeps without firing an event), so that a
        client dropping before its first event resumes from there, not from a new now.
        A client that asks for positions is sent it whatever its start: a page at the
        origin of a topic with no log keeps the store's time then, by which it is told
        of a log that came and expired while it was away (``resume.origin_point``)."""
        self._announce_start = len(self._starts) > 1 and "earliest" in self._starts.values()
        """A multi-topic stream from the earliest: its starting cursor is sent before the
        replay (an ``id:`` with no data), so that a client tells the topic of its first
        event as of any other, by the cursor in which only that topic moved (a client
        took every other topic to be at the origin, a trimmed one is not: audit)."""
        self._backlog_at_tick: int | None = None  # (see _stopped_reading)
        self._awaiting_store = False  # (see CatchUp._from_store)
        self._waiter: asyncio.Future[bool] | None = None
        self._consumer_idle = False
        """The consumer holds nothing and is not running: parked in ``_wait``, or (an edge
        consuming with ``until_idle``) its pump has ended. A live entry may then be
        written directly without overtaking anything."""

    @property
    def topics(self) -> Sequence[str]:
        return list(self._starts)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def opening_beat(self) -> bytes:
        """What the edge writes after the retry hint: a stream whose beats are events
        starts with one, so that its client learns the interval at once (and can watch
        from the start); a stream of comments starts as it always did, with nothing."""
        return b"" if self._beat is HEARTBEAT else self._beat

    @property
    def is_live(self) -> bool:
        """Caught up with the log: what comes now comes from the live reader."""
        return not self._catching_up and not self._resync

    async def open(self) -> None:
        """Attach to every topic, then read where each log stands (once attached, so
        nothing appended from now on is missed). Raises StoreUnavailable if the store
        cannot answer, StreamOver if every topic is closed and its cursor at the end."""
        try:
            self._heartbeats.add(self)
            if len(self._starts) == 1:
                await self._attach(next(iter(self._starts)))
            else:
                # At once: a new topic's feed is a store read, and one after another a
                # stream of N topics waited N+1 round trips before its head (a page
                # gives up connecting after a bound that covers two).
                await asyncio.gather(*(self._attach(topic) for topic in self._starts))
            if self._closed:  # ended meanwhile (its credentials): nothing left behind
                return
            states = await asyncio.gather(*(self._store.state(t) for t in self._starts))
            for (topic, start), state in zip(self._starts.items(), states, strict=True):
                self._opening_states[topic] = state  # the first catch-up judges with it
                if start == "now":  # "now" is now, not when first iterated
                    self._positions[topic] = latest_point(state)
                    # (what the log lost before now is no loss to this stream)
                    self._told_loss_at[topic] = self._positions[topic].stream_after
                if _at_end(start, state):
                    # Over already: no live registration either (a log of that name
                    # made again would fill this stream's queue with what it drops).
                    self._end_topic(topic)
                    self._positions[topic] = (
                        start if isinstance(start, EventId) else latest_point(state)
                    )
            if len(self._over) == len(self._starts):
                raise StreamOver("every topic of this stream is closed, and it saw the end")
            self._resync -= self._over
        except BaseException:
            self.close()
            raise

    async def _attach(self, topic: str) -> None:
        await self._hub.attach(topic, self)
        if self._closed:  # ended meanwhile (its credentials, or another topic failed)
            self._hub.detach(topic, self)
        else:
            self._attached.append(topic)

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
        send: from then on the hub writes through ``sink.write`` and ``sink.wanted()``
        asks for a new consumer, so an idle stream holds no task.
        Raises SubscriberTooSlow when the client could not keep up.
        """
        self._consumer_idle = False
        while not self._closed:
            if self._dropped:
                raise SubscriberTooSlow()
            if self._resync:
                async for chunk in self._catch_up():
                    yield self._beating_if_due(chunk)
                    if self._all_over():
                        self._finish()
                        return
                continue
            chunk = await self._live_chunk()
            if chunk:
                yield self._beating_if_due(chunk)
                if self._all_over():
                    self._finish()
                    return
            elif until_idle and not self._resync:  # (draining may have found a new epoch)
                self._consumer_idle = True
                return
            elif not await self._wait() and not self._closed:
                self._last_beat = time.monotonic()
                yield self._beat

    async def _live_chunk(self) -> bytes:
        """What the live path has to send: what came, else a later origin when due."""
        chunk = self._drain_live()
        if not chunk and self._origins_due:
            # What came while the store was read was queued (this consumer was busy, so
            # nothing woke it): it goes now, after the id line, not at the next refresh.
            return await self._later_origins() + self._drain_live()
        return chunk

    def _beating_if_due(self, chunk: bytes) -> bytes:
        """``chunk``, after a heartbeat if one is due (the clock's beat waits for an idle
        consumer: a long replay would have none)."""
        now = time.monotonic()
        if now - self._last_beat < self._heartbeats.due_after:
            return chunk
        self._last_beat = now
        return self._beat + chunk

    # -- what the hub calls ------------------------------------------------

    def offer(self, batch: LiveBatch) -> int:
        if self._dropped or self._closed:
            return 0
        if self._told_loss_at:
            # Events past where it was told of a loss (or a "now" start at one): lost
            # in turn before it wrote them (a second failover), the log records that
            # loss at the same place, and only this tells it apart from the first.
            # (A stream from now offered events before its first catch-up ends may
            # then be told of the first loss too: told, never silent.)
            self._told_loss_at.pop(batch.topic, None)
        if self._consumer_idle and not self._pending and not self._resync:  # _parked_live()
            written = self._write_directly(batch)
            if written is not None:
                return written
        if batch.from_origin and batch.epoch is not None:
            self._log_starts.setdefault(batch.topic, batch.entries[0])
        backlog = self._pending_bytes
        self._pending += batch.entries
        self._pending_bytes += batch.size
        if backlog and self._pending_bytes > self._buffer_limit:
            # Too slow: what it was handed before is still queued. One burst alone,
            # however large, is taken whole (a reader at full speed was dropped by a
            # few large events at once: audit).
            self._overflow()
        self._wake(True)
        return 0

    def _write_directly(self, batch: LiveBatch) -> int | None:
        """The steady state of a stream, with no task wake-up per event: the reader's
        call writes the frames (shared, for a single topic) straight to the client.

        None when this cannot be done here (another log than the cursor's, the
        topic's end, or the client's socket is full): the entries then take the
        queued path. What the socket could not send at once stays in the edge's
        buffer, and counts against the same limit as a queue: past it when the next
        events come, the subscriber is dropped (one burst is written whole).
        """
        if batch.ends:
            return None  # the queued path delivers an end or a deletion, then ends the stream
        entries = batch.entries
        topic = batch.topic
        position = self._positions[topic]
        if batch.epoch == position.epoch:
            if batch.first > position.position:
                fresh = entries
            else:
                fresh = [e for e in entries if e.position > position.position]
        elif batch.from_origin and batch.epoch is not None and position.is_origin:
            fresh = entries  # a new log, read from its first entry; the cursor saw no log
        else:
            return None  # another log: the cursor is judged against it on the queued path
        if not fresh:
            return 0
        sink = self._sink
        if sink.unsent_bytes() > self._buffer_limit:
            # What it was written before is still unsent, past the limit: too slow. (Judged
            # before this write, not after: one burst larger than the limit, written whole
            # to a client reading at full speed, dropped it; audit.)
            self._overflow()
            return 0
        if self._multi:
            positions = dict(self._positions)  # committed only once written
            chunk = b"".join(self._frame(e, positions) for e in fresh)
        elif fresh is entries:
            chunk = batch.frames  # the same bytes for every subscriber of the topic
        else:
            chunk = b"".join(e.frame for e in fresh)
        if not sink.write(chunk):
            return None
        self._positions[topic] = batch.last_id if fresh is entries else fresh[-1].id
        return len(fresh)

    def _all_over(self) -> bool:
        return len(self._over) == len(self._starts)

    def _finish(self) -> None:
        """Every topic delivered its end: close, and have the edge end the response."""
        self.close()
        self._sink.ended()

    def expire(self) -> None:
        """End the stream now (its token expired); the client comes back with a new one."""
        if self._closed:
            return
        self.close()
        self._sink.ended()

    def abandon(self) -> None:
        """Handing this subscriber entries or a beat failed: it cannot be trusted to
        have them, so cut its connection; the client resumes by id and loses nothing."""
        log.error("a subscriber failed; cutting its stream so that it resumes")
        self._dropped = True
        self.close()
        self._sink.dropped()

    def log_reset(self, topic: str) -> None:
        self._resync.add(topic)
        self._wake(True)

    def _overflow(self) -> None:
        self._pending = []
        self._pending_bytes = 0
        self._log_starts.clear()
        if self._catching_up:
            # Still reading the log: forget the live copies, the log has them too.
            self._resync.update(self._starts)
        else:
            self._dropped = True
            self._observer.subscriber_dropped()
            self._sink.dropped()

    # -- live ------------------------------------------------------------------

    def _drain_live(self) -> bytes:
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        log_starts, self._log_starts = self._log_starts, {}
        frames: list[bytes] = []
        for entry in pending:
            topic = entry.topic
            if topic in self._resync or topic in self._over:
                continue
            position = self._positions[topic]
            if entry.epoch != position.epoch:
                if position.is_origin and entry.epoch in self._deleted_before.get(topic, ()):
                    continue  # the marker of a log deleted before this stream was here
                if position.is_origin and log_starts.get(topic) is entry:
                    # A new log from its first entry, and the stream saw no log: its
                    # own (judged again, it could be gone: deleted, expired, in silence).
                    frames.append(self._advance(entry))
                    continue
                # Another log than the one we follow: go back to the log to judge.
                if position.is_origin:
                    self._seen_at_origin.setdefault(topic, entry.epoch)
                self._resync.add(topic)
            elif entry.position > position.position:
                frames.append(self._advance(entry))
        if frames:
            self._observer.delivered(self._events_among(len(frames)))
        return b"".join(frames)

    def _end_topic(self, topic: str) -> None:
        """Nothing more will come of this topic: free its live registration."""
        self._over.add(topic)
        self._resync.discard(topic)
        if topic in self._attached:
            self._attached.remove(topic)
            self._hub.detach(topic, self)

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
            if not waiter.done():  # (done: cancelled with its consumer, not run yet)
                waiter.set_result(woken)
        elif woken:
            self._consumer_idle = False
            self._sink.wanted()


def _at_end(start: StartFrom, state: LogState) -> bool:
    """Whether a topic's stream starting at ``start`` has nothing left: it is closed,
    and the cursor is at or past its end (or there is none: only new events wanted);
    or it was deleted, and the cursor is the deletion's (the client was told)."""
    if isinstance(start, ForeignCursor):
        return False
    deletion = state.deletion_of(start.epoch) if isinstance(start, EventId) else None
    if deletion is not None:
        assert isinstance(start, EventId)
        return start.position >= deletion.position  # told of the deletion already
    if state.end is None or start == "earliest":
        return False
    if start == "now":
        return True
    return start.epoch == state.epoch and start.position >= state.end
