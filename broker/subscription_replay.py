"""A subscription's way back to the log: judge each cursor, tell the gaps, replay.

A topic goes back to the log ("resync") whenever live delivery cannot be
trusted: at the start, when the buffer overflowed while replaying, or when an
entry of another epoch shows that the log was recreated. A resync judges the
cursor again (``broker.resume``) and sends a gap notice when the truth needs one.
Every topic in resync is judged before any gap notice goes out, so the id of a
notice on a multi-topic stream names every topic (a client that drops right
after it resumes each topic where it was).

Here too, as they read the log's state or move the positions: the later origins
sent to a client at the origin of expiring topics (``broker.origins``), and the
frames of what a subscription delivers (an entry, a topic's end, a gap, where the
stream stands), for the replay and the live path alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from broker import constants as c
from broker.errors import StoreUnavailable
from broker.framing import gap_frame, id_line, position_frame
from broker.ids import EventId, StreamPosition, format_cursor
from broker.model import LogEntry, LogPage, LogState
from broker.observer import Observer
from broker.origins import HeldOrigins
from broker.resume import Gap, earliest_point, foreign_point, refreshed_origin, resume_point
from broker.store import Store


@dataclass(frozen=True, slots=True)
class ForeignCursor:
    """A cursor that names none of the stream's topics: another stream's. Each topic is
    told ``unknown`` (with the cursor's first id), and read from its oldest event."""

    requested: EventId


StartFrom = EventId | ForeignCursor | Literal["earliest", "now"]
"""Where one topic starts: after an id, at the oldest retained event, or at the end."""

T = TypeVar("T")


class CatchUp:
    """The part of a ``Subscription`` that goes back to the log (``_catch_up``): it judges
    each topic's cursor against its log, tells the gaps, and replays up to the log's
    end; and the frames that move its positions, which its live path sends too.

    A mixin: the state it reads and moves is in its slots, set by
    ``Subscription.__init__`` (slots, not a dict: see ``Subscription.__slots__``).
    """

    __slots__ = (
        "_announce",
        "_announce_start",
        "_awaiting_store",
        "_beat",
        "_buffer_limit",
        "_catching_up",
        "_closed",
        "_deleted_before",
        "_deletion_notices",
        "_multi",
        "_observer",
        "_opening_states",
        "_origins",
        "_origins_due",
        "_over",
        "_pending",
        "_position_events",
        "_positions",
        "_replayed",
        "_resync",
        "_seen_at_origin",
        "_starts",
        "_store",
        "_told_loss_at",
    )
    # (their types; ``Subscription.__init__`` sets them)
    _store: Store
    _observer: Observer
    _starts: dict[str, StartFrom]
    _multi: bool
    _buffer_limit: int
    _positions: dict[str, EventId]
    _resync: set[str]
    _over: set[str]
    _closed: bool
    _catching_up: bool
    _replayed: int
    _deletion_notices: int
    _announce: bool
    _announce_start: bool
    _position_events: bool
    _opening_states: dict[str, LogState]
    _deleted_before: dict[str, set[str]]
    _seen_at_origin: dict[str, str]
    _told_loss_at: dict[str, StreamPosition]
    _origins: HeldOrigins | None
    _origins_due: bool
    _pending: list[LogEntry]
    _beat: bytes
    _awaiting_store: bool

    def _end_topic(self, topic: str) -> None:
        """Nothing more will come of this topic (``Subscription``'s: it leaves the hub)."""
        raise NotImplementedError

    def _watch_origins(self) -> None:
        """Have the heartbeat clock look at the origins held (``ClockCalls``')."""
        raise NotImplementedError

    async def _from_store(self, read: Awaitable[T]) -> T:
        """``read``'s answer, the heartbeat clock beating the stream meanwhile.

        Its consumer waits here holding no frame (what it yielded was written; what it
        frames next comes after), so the clock may write a beat straight to the socket
        (``ClockCalls.beat_if_due``) without overtaking anything, as for a parked live
        stream. Without it, a stalled store (5 s for a free connection, 5 s for the
        reply) held a catching-up stream silent past two short heartbeats, and its
        client (``/client.js``, the Python subscriber) dropped a stream the broker
        rode the stall out with (review)."""
        self._awaiting_store = True
        try:
            return await read
        finally:
            self._awaiting_store = False

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
                judged = await self._from_store(self._judge_all(topics))
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
                await self._from_store(asyncio.sleep(backoff))  # (beaten too)
                backoff = min(backoff * 2, c.RECONNECT_BACKOFF_MAX)
                yield self._beat  # (an event, to a client that watches for those)
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
            page = await self._from_store(
                self._store.read_range(topic, position.stream_after, c.REPLAY_PAGE_SIZE, page_bytes)
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

    def _position_frame(self) -> bytes:
        return position_frame(self._cursor(), as_event=self._position_events)

    def _ttl_ms(self, topic: str) -> int:
        return self._store.policies.for_topic(topic).ttl_ms

    # -- the origins its client holds -----------------------------------------

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
            self._watch_origins()
        self._origins.hold(topic, origin, taken_at, ttl_ms)

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
            reads = asyncio.gather(*(self._store.state(topic) for topic in topics))
            states = await self._from_store(reads)
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

    # -- frames: an entry, a topic's end, where the stream stands --------------

    def _advance(self, entry: LogEntry) -> bytes:
        if entry.is_control:
            return self._control_frame(entry)
        return self._frame(entry, self._positions)

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


def _continues(page: LogPage, position: EventId) -> bool:
    """Whether the page follows ``position`` in the same log, with nothing between
    trimmed away. A position at the origin (before any log) follows into any log."""
    if position.is_origin:
        return page.trimmed_through == (0, 0)
    return page.epoch == position.epoch and page.trimmed_through <= position.position
