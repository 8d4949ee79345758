"""A subscription: replay what the client missed from the log, then tail live events.

The switch from replay to live has no gap and no duplicate: the subscription
attaches to the hub *before* it reads the log, so every entry appended after
that reaches its buffer; the catch-up read then covers everything before, and
positions drop what both delivered.

A topic goes back to the log ("resync") whenever live delivery cannot be
trusted: at the start, when the buffer overflowed while replaying, or when an
entry of another epoch shows that the log was recreated. A resync judges the
cursor again (``broker.resume``) and sends a gap notice when the truth needs one.
Every topic in resync is judged before any gap notice goes out, so the id of a
notice on a multi-topic stream names every topic (a client that drops right
after it resumes each topic where it was).

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
from dataclasses import dataclass
from typing import Literal

from broker import constants as c
from broker.errors import StoreUnavailable, StreamOver
from broker.fanout import Hub
from broker.framing import HEARTBEAT, gap_frame, id_line, position_frame
from broker.heartbeat import HeartbeatClock
from broker.ids import EventId, StreamPosition, format_cursor
from broker.model import LiveBatch, LogEntry, LogPage, LogState
from broker.observer import Observer
from broker.origins import HeldOrigins
from broker.resume import (
    Gap,
    earliest_point,
    foreign_point,
    latest_point,
    refreshed_origin,
    resume_point,
)
from broker.sink import PulledSink, StreamSink
from broker.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ForeignCursor:
    """A cursor that names none of the stream's topics: another stream's. Each topic is
    told ``unknown`` (with the cursor's first id), and read from its oldest event."""

    requested: EventId


StartFrom = EventId | ForeignCursor | Literal["earliest", "now"]
"""Where one topic starts: after an id, at the oldest retained event, or at the end."""


class SubscriberTooSlow(Exception):
    """The subscriber's buffer overflowed; it was dropped and should resume by id."""


class Subscription:
    """One client's stream over one or more topics."""

    # Slots, not a dict: the hub's direct write reads a dozen fields of every subscriber
    # of a topic in a row. With 33 fields an instance outgrew CPython's shared-key dict
    # (30 keys) and carried a dict of its own, a second object to fetch per read.
    __slots__ = (
        "_announce",
        "_announce_start",
        "_attached",
        "_backlog_at_tick",
        "_buffer_limit",
        "_catching_up",
        "_closed",
        "_consumer_idle",
        "_deleted_before",
        "_deletion_notices",
        "_dropped",
        "_ends_at",
        "_heartbeats",
        "_hub",
        "_last_beat",
        "_log_starts",
        "_multi",
        "_observer",
        "_opening_states",
        "_origins",
        "_origins_due",
        "_over",
        "_pending",
        "_pending_bytes",
        "_position_events",
        "_positions",
        "_replayed",
        "_resync",
        "_seen_at_origin",
        "_sink",
        "_starts",
        "_store",
        "_told_loss_at",
        "_trusted",
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
    def is_live(self) -> bool:
        """Caught up with the log: what comes now comes from the live reader."""
        return not self._catching_up and not self._resync

    async def open(self) -> None:
        """Attach to every topic, then read where each log stands (once attached, so
        nothing appended from now on is missed). Raises StoreUnavailable if the store
        cannot answer, StreamOver if every topic is closed and its cursor at the end."""
        try:
            self._heartbeats.add(self)
            for topic in self._starts:
                await self._hub.attach(topic, self)
                if self._closed:  # ended meanwhile (its credentials): nothing left behind
                    self._hub.detach(topic, self)
                    return
                self._attached.append(topic)
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
                yield HEARTBEAT

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
        return HEARTBEAT + chunk

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

    def _parked_live(self) -> bool:
        """Live, nothing queued, and the consumer idle: nothing can be overtaken."""
        return self._consumer_idle and not self._pending and not self._resync

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

    def beat_if_due(self, now: float, due_after: float) -> None:
        """The heartbeat clock's call: end the stream if its credentials expired, else
        beat straight to the socket if we can."""
        if (self._ends_at is not None and now >= self._ends_at) or (
            self._trusted is not None and not self._trusted()
        ):
            self.expire()
            return
        if self._closed:
            return
        if self._stopped_reading():
            self._overflow()
            self._wake(True)  # (its consumer sees the drop)
            return
        if now - self._last_beat < due_after:
            return
        if self._parked_live() and self._sink.write(HEARTBEAT):
            self._last_beat = now
        else:
            self._wake(False)

    def look_at_origins(self, now: float) -> None:
        """The clock's call, more often than its beats when topics expire sooner: ask
        the consumer for later origins when one the client holds is due."""
        if self._closed or self._origins_due or self._origins is None:
            return
        if self._origins.due(self._positions, now):
            self._origins_due = True
            self._wake(True)  # (its consumer reads the store: see _later_origins)
        elif not self._origins:  # (left the origin: its log came; looked at no more)
            self._origins = None
            self._heartbeats.unwatch_origins(self)

    def _stopped_reading(self) -> bool:
        """Past the buffer limit at two of the clock's ticks in a row (a third of a
        heartbeat interval apart), with nothing read between them: a burst taken whole
        that its client does not read. Without this, a client that stopped reading
        held it until its topic's next event (review: 18 MB each, for a multi-topic
        stream's own frames); judged at one tick, a reader at full speed, caught
        mid-burst, was dropped (second review). Not while catching up: ``offer``
        bounds the queue then, and the consumer is running."""
        if self._dropped or self._catching_up:
            self._backlog_at_tick = None
            return False
        backlog = self._sink.unsent_bytes() + self._pending_bytes
        before, self._backlog_at_tick = self._backlog_at_tick, backlog
        limit = self._buffer_limit
        return backlog > limit and before is not None and before > limit and backlog >= before

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

    # -- catching up from the log -------------------------------------------

    async def _catch_up(self) -> AsyncIterator[bytes]:
        """Judge every topic in resync first (so a multi-topic cursor is whole), then replay."""
        self._catching_up = True
        self._replayed = 0
        backoff = c.RECONNECT_BACKOFF_MIN
        while self._resync and not self._closed:
            topics = sorted(self._resync - self._over)
            self._resync.clear()
            try:
                # Framed only once every topic is judged: each notice's id is a cursor
                # that names every topic, at its new position once its notice is sent,
                # else at its requested one (a client that drops between two notices
                # must be told the second when it comes back).
                judged = await self._judge_all(topics)
                for index, (topic, gap) in enumerate(judged):
                    yield self._gap_frame(topic, gap, unsent=judged[index + 1 :])
                if self._announce_start and not self._closed:
                    self._announce_start = False  # (after the notices: it is past them)
                    yield self._position_frame()
                for topic in topics:
                    if topic not in self._over:
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
        if self._announce and not self._closed and self._positions:
            self._announce = False
            yield self._position_frame()

    async def _judge_all(self, topics: list[str]) -> list[tuple[str, Gap]]:
        """Judge each topic's cursor against its log; the gap notices they need.

        Every state is read before any position moves: a store failure part-way
        must leave every topic at its cursor, for the retry to judge (and notify)
        again. Moved one by one, a topic judged before the failure was retried from
        its new position, and its gap was never told."""
        opening = [self._opening_states.pop(topic, None) for topic in topics]
        states = [
            known if known is not None else await self._store.state(topic)
            for topic, known in zip(topics, opening, strict=True)
        ]
        gaps: list[tuple[str, Gap]] = []
        for topic, state in zip(topics, states, strict=True):
            gap = self._judge_start(topic, state)
            if gap is not None:
                gaps.append((topic, gap))
                if gap.reason == "deleted":
                    self._end_topic(topic)  # deleted while we were away: over
        return gaps

    async def _replay_topic(self, topic: str) -> AsyncIterator[bytes]:
        """Page through the log after the topic's position, up to its end.

        A page is at most half the subscriber's buffer (``REPLAY_PAGE_MIN_BYTES`` at
        least): a client that stops reading mid-replay holds what it was last handed
        twice (here, and framed in its socket's buffer) for as long as it stays
        connected, so it holds about its buffer, as a live one may (1 MiB pages held
        3 MB each, whatever the limit). Smaller pages would each wait for company
        (``READ_COALESCE_MS``): one event a page replayed some 135 events a second.
        """
        half = max(self._buffer_limit // 2, c.REPLAY_PAGE_MIN_BYTES)
        page_bytes = min(c.REPLAY_PAGE_BYTES, half)
        while not self._closed:
            position = self._positions[topic]
            page = await self._store.read_range(
                topic, position.stream_after, c.REPLAY_PAGE_SIZE, page_bytes
            )
            if not _continues(page, position):
                # Trimmed past us since the cursor was judged (a replay slower than
                # retention), or another log: judge again, and say so if needed.
                self._resync.add(topic)
                return
            if page.lost(position.stream_after):
                # The log lost the event at our position, and went on past it: what
                # else it lost is unknown. Say so, and go on after it (as after a lost
                # tail: replaying the whole history would flood a client that saw it).
                yield self._gap_frame(topic, Gap("unknown", position, position))
            frames = self._replay_frames(topic, page, position)
            last = len(page.entries) < c.REPLAY_PAGE_SIZE and not page.cut_short
            if last and self._lost_ahead(topic, page):
                # The log lost what followed its last event (a failover a live reader
                # found), and nothing came since: a client caught up to here went live
                # and on with nothing said (the gap came only with a later event).
                there = self._positions[topic]
                frames.append(self._gap_frame(topic, Gap("unknown", there, there)))
            del page  # (not held while the client takes its frames, maybe for good)
            if frames:
                chunk = b"".join(frames)
                del frames
                yield chunk
            if last:
                return

    def _replay_frames(self, topic: str, page: LogPage, position: EventId) -> list[bytes]:
        """The frames of a page read after ``position``; where the page goes on past
        events the log lost (a failover a live reader found), an ``unknown`` gap there:
        a client that was away before them would pass them in silence."""
        after = position.stream_after
        events = [e for e in page.entries if e.position > after]
        told = self._told_loss_at.get(topic)
        losses = [p for p in page.losses_passed(after) if p != told]
        if not losses:
            frames = [self._advance(e) for e in events]
        else:
            frames = []
            for entry in events:
                if losses and entry.position > losses[0]:
                    there = self._positions[topic]  # the last event kept
                    frames.append(self._gap_frame(topic, Gap("unknown", there, there)))
                    while losses and entry.position > losses[0]:
                        losses.pop(0)
                frames.append(self._advance(entry))
        delivered = self._events_among(len(events))
        self._replayed += delivered
        self._observer.delivered(delivered)
        return frames

    def _events_among(self, entries_framed: int) -> int:
        """How many of the entries just framed went out as events: all but the deletion
        markers (a stream told of a deletion as it resumed counts none either)."""
        notices, self._deletion_notices = self._deletion_notices, 0
        return entries_framed - notices

    def _lost_ahead(self, topic: str, page: LogPage) -> bool:
        """Whether the log lost events after where the replay of its last page left the
        topic, and this stream was not told there already."""
        told = self._told_loss_at.get(topic)
        at = self._positions[topic].stream_after
        return any(place != told for place in page.losses_ahead(at))

    def _judge_start(self, topic: str, state: LogState) -> Gap | None:
        """Set the topic's position from its cursor; the gap notice it needs, if any."""
        self._positions[topic], gap = self._start_point(topic, state)
        position = self._positions[topic]
        if position.is_origin:
            self._deleted_before[topic] = {marker.epoch for marker in state.deletions}
            self._hold_origin(topic, position, state)
        return gap

    def _hold_origin(self, topic: str, origin: EventId, state: LogState) -> None:
        """Hold the origin the client was left at, as old as the state says it is (the
        state of no log has the store's time); one with no time (``0.0-0``), as old as
        this stream, whose later origins give it one."""
        ms = origin.position[0]
        age_ms = max((state.clock_ms or ms) - ms, 0) if ms else 0
        taken_at = time.monotonic() - age_ms / 1000
        ttl_ms = self._ttl_ms(topic)
        if self._origins is None:
            if not ttl_ms or self._closed:  # (closed while its state was read: not watched)
                return
            self._origins = HeldOrigins()  # (~100 bytes: not for a stream of topics without TTL)
            self._heartbeats.watch_origins(self)
        self._origins.hold(topic, origin, taken_at, ttl_ms)

    def _ttl_ms(self, topic: str) -> int:
        return self._store.policies.for_topic(topic).ttl_ms

    async def _later_origins(self) -> bytes:
        """The stream's cursor with a later origin for each topic whose origin is due
        (``broker.origins``), as an ``id:`` line with no data; empty if none moved.

        Only a topic still at that origin, with nothing queued or to judge, moves: a
        log's entries that came meanwhile are delivered from the origin it holds. A
        store that cannot answer now is asked again at the clock's next tick.

        Due until the store answered or failed: cleared before, a tick that came during
        a read that then failed found it set (its wake-up, of a busy consumer, lost),
        and the clock never looked at the stream again (review: a Redis stall, and a
        page that stayed open was told ``unknown`` a TTL later, for nothing)."""
        asked_at = time.monotonic()
        assert self._origins is not None  # (due: some origin was held)
        topics = self._origins.due(self._positions, asked_at)
        try:
            states = await asyncio.gather(*(self._store.state(topic) for topic in topics))
        except StoreUnavailable:
            return b""
        finally:
            self._origins_due = False
        queued = {entry.topic for entry in self._pending}
        moved = False
        for topic, state in zip(topics, states, strict=True):
            held = self._positions[topic]
            if topic in self._resync or topic in self._over or topic in queued:
                continue
            later = refreshed_origin(held, state) if held.is_origin else None
            if later is not None:
                self._positions[topic] = later
                self._origins.hold(topic, later, asked_at, self._ttl_ms(topic))
                moved = True
        return self._position_frame() if moved and not self._closed else b""

    def _position_frame(self) -> bytes:
        return position_frame(self._cursor(), as_event=self._position_events)

    def _start_point(self, topic: str, state: LogState) -> tuple[EventId, Gap | None]:
        position = self._positions.get(topic)
        if position is None:
            start = self._starts[topic]
            if start == "earliest":
                return earliest_point(state), None
            if isinstance(start, ForeignCursor):
                return foreign_point(start.requested, state)
            assert isinstance(start, EventId)
            position = start
        seen = self._seen_at_origin.pop(topic, None) if position.is_origin else None
        return resume_point(position, state, seen=seen, ttl_ms=self._ttl_ms(topic))

    def _gap_frame(self, topic: str, gap: Gap, unsent: Sequence[tuple[str, Gap]] = ()) -> bytes:
        """A notice; ``unsent``: the notices still to send, whose topics its id names at
        their requested cursors."""
        self._observer.gap_sent(gap.reason)
        if gap.reason == "unknown" and gap.resumed_after is not None:
            self._told_loss_at[topic] = gap.resumed_after.stream_after
        if not (self._multi and unsent):
            return gap_frame(self._current_id(topic), topic, gap)
        positions = self._positions | {later: notice.requested for later, notice in unsent}
        return gap_frame(format_cursor(positions), topic, gap)

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

    def _advance(self, entry: LogEntry) -> bytes:
        if entry.is_control:
            return self._control_frame(entry)
        return self._frame(entry, self._positions)

    def _end_topic(self, topic: str) -> None:
        """Nothing more will come of this topic: free its live registration."""
        self._over.add(topic)
        self._resync.discard(topic)
        if topic in self._attached:
            self._attached.remove(topic)
            self._hub.detach(topic, self)

    def _control_frame(self, entry: LogEntry) -> bytes:
        """A topic's last entry: its end is delivered as it is (``broker.end``, with its
        id); a deletion marker becomes a ``deleted`` gap. Either way the topic is over."""
        topic = entry.topic
        self._end_topic(topic)
        if entry.event_type == c.DELETED_EVENT:
            self._deletion_notices += 1
            requested = self._positions[topic]
            self._positions[topic] = entry.id
            return self._gap_frame(topic, Gap("deleted", requested, None))
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

    def _cursor(self) -> str:
        """Where the stream stands: an id that resumes every topic from here."""
        return self._current_id(next(iter(self._positions)))

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


def _continues(page: LogPage, position: EventId) -> bool:
    """Whether the page follows ``position`` in the same log, with nothing between
    trimmed away. A position at the origin (before any log) follows into any log."""
    if position.is_origin:
        return page.trimmed_through == (0, 0)
    return page.epoch == position.epoch and page.trimmed_through <= position.position


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
