"""The subscribers' reconnect state (internal to ``brokerclient.subscriber``; no I/O here).

``_Resume`` decides where the next connection starts (``Last-Event-ID``, ``?from=earliest``,
or each topic's end for a subscription "from now"), how long to wait before it (the
backoff, ``retry:`` hints, ``give_up_after``), how long a stream may stay silent (the read
timeout: from the heartbeat the broker says, never under one the caller gave, else grown
by streams that timed out and set from the heartbeats they show), and which topic each
event belongs to. ``AsyncSubscriber`` and ``Subscriber`` do the I/O and tell it what
happened; it is tested on a fake clock (tests/unit/test_subscriber_resume.py).
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import InitVar, dataclass, field, replace
from typing import Final, Literal, TypeAlias

import httpx

from broker.errors import InvalidEventId
from broker.ids import ORIGIN, Cursor, EventId, format_cursor, parse_cursor
from brokerclient.errors import RequestFailed, Unreachable
from brokerclient.http import base_headers, doubled, stream_path
from brokerclient.sse import BEAT, POSITION, Event, SseDecoder

# The subscriber's logger: these are its messages ("subscription to ..."), and a program
# that set its level or a handler on it before the state moved here still gets them.
log = logging.getLogger("brokerclient.subscriber")


class NotGiven(enum.Enum):
    """What a subscriber's ``read_timeout`` is when the caller left it out: told apart
    from any number (the same 45 given on purpose is a floor under the heartbeat the
    broker says; left out, the heartbeat decides alone)."""

    READ_TIMEOUT = "DEFAULT_READ_TIMEOUT"

    def __repr__(self) -> str:
        return self.value


DEFAULT_READ_TIMEOUT: Final = NotGiven.READ_TIMEOUT
"""``read_timeout`` left out: a stream is read for what its broker's ``Broker-Heartbeat``
says (``SILENT_HEARTBEATS`` of it and ``SILENCE_MARGIN_S``), shorter or longer; a broker
that does not say it (an older one) for ``GUESSED_READ_TIMEOUT_S``, grown by the streams
that timed out."""
GUESSED_READ_TIMEOUT_S = 45.0
"""Three of the broker's default 15 s heartbeats."""
ReadTimeout: TypeAlias = float | Literal[NotGiven.READ_TIMEOUT] | None
"""A subscriber's ``read_timeout=``: seconds, None (never), or ``DEFAULT_READ_TIMEOUT``."""


def seconds_of(read_timeout: ReadTimeout) -> float | None:
    """A ``read_timeout=`` in seconds (None: never): left out, ``GUESSED_READ_TIMEOUT_S``."""
    return GUESSED_READ_TIMEOUT_S if isinstance(read_timeout, NotGiven) else read_timeout


HEARTBEAT_HEADER = "broker-heartbeat"
"""The broker's ``BROKER_HEARTBEAT_SECONDS``, said on each stream (an older broker does
not: the read timeout is then guessed, as before)."""
SILENT_HEARTBEATS = 2
SILENCE_MARGIN_S = 1.0
"""A stream whose broker says its heartbeat is dead once it sent nothing for this many of
them and the margin: the broker beats every stream at least once an interval, so a live
one is never silent for two (the margin: the network's and the broker's hiccups)."""
READ_TIMEOUT_GROWTH = 8
"""A stream that times out reading is taken for a broker whose heartbeat is longer than
the read timeout: the next ones wait twice as long, up to this many times the given one."""
WORKING_AFTER_S = 1.0
"""A stream open this long works (a come-back hint ends at once): failures start anew."""
FIRST_DELAY = 0.25
MIN_DELAY = 0.1
"""The shortest wait before a reconnect, whatever ``retry:`` says (an event's publisher
chooses it: ``retry: 1`` made a client that could not connect try a thousand times a
second)."""
MAX_DELAY = 5.0
MIN_ATTEMPT_S = 0.05
"""The shortest an attempt's timeouts get as ``give_up_after`` runs out."""


@dataclass
class _Resume:
    """Where the next connection starts, and how long to wait before it (no I/O here)."""

    topics: list[str]
    last_event_id: str | None
    from_earliest: bool
    give_up_after: float | None
    failures: int = 0
    failing_since: float | None = None
    connected_at: float | None = None  # (monotonic) the current stream's 200
    retry_hint_ms: int | None = None
    started: bool = field(default=False)
    topics_ended: set[str] = field(default_factory=set)  # by a broker.end, or a deleted gap
    refused_last: bool = False  # the last attempt was answered 401 (and no stream since)
    read_timeout_asked: InitVar[ReadTimeout] = DEFAULT_READ_TIMEOUT
    """The caller's ``read_timeout=``: a subscriber's, or its client's own
    (``subscriber._read_timeout_of``)."""
    read_timeout: float | None = field(init=False)
    """How long a stream may send nothing (no event, no heartbeat) before it is taken for
    dead and reconnected: set by the heartbeat its broker says (``_follow_heartbeat``);
    a broker that does not say it: the given one (``GUESSED_READ_TIMEOUT_S`` if none),
    doubled by each stream that timed out, and set from the heartbeats a stream shows
    (``heard``)."""
    given_read_timeout: float | None = field(init=False)
    read_timeout_given: bool = field(init=False)
    """The caller chose ``read_timeout`` (not ``DEFAULT_READ_TIMEOUT``): no heartbeat a
    broker says reads a stream for less (a proxy that holds heartbeats back, a slow
    link: the caller knows its network, the broker does not)."""
    read_timeout_cap: float | None = field(init=False)
    _comments_read: int = 0  # by the current stream's decoder
    _first_comment_at: float | None = None  # (monotonic) the current stream's first heartbeat
    _last_comment_at: float | None = None  # (monotonic) the current stream's last heartbeat
    _longest_beat: float | None = None  # the current stream's longest heartbeat interval
    heartbeat_s: float | None = None  # the current stream's, if its broker said it
    _guessed_read_timeout: float | None = None  # the read timeout in force before it did

    def __post_init__(self, read_timeout_asked: ReadTimeout) -> None:
        self.read_timeout_given = not isinstance(read_timeout_asked, NotGiven)
        given = seconds_of(read_timeout_asked)
        self.read_timeout = self.given_read_timeout = given
        self.read_timeout_cap = None if given is None else given * READ_TIMEOUT_GROWTH

    def all_ended(self) -> bool:
        """Each topic has ended (a multi-topic stream goes on past one topic's end)."""
        return self.topics_ended >= set(self.topics)

    def request(self, token: str | None) -> tuple[str, httpx.QueryParams, dict[str, str]]:
        """The stream's path, query and headers."""
        headers = base_headers(token) | {"Accept": "text/event-stream"}
        path, params = stream_path(self.topics)
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        elif self.from_earliest:
            params = params.add("from", "earliest")
        # Where the stream stands with no event comes as broker.position events, in line
        # with the events (an id: line with no data is sent only for a start from now):
        # a start from the earliest at a topic with no log keeps its origin, by which it
        # is told of a log that came and expired while it was away (it came back
        # ?from=earliest and waited in silence).
        return path, params.add("positions", "true"), headers

    def needs_start_point(self) -> bool:
        """A subscription "from now" that has no position yet."""
        return not self.started and not self.last_event_id and not self.from_earliest

    def start_at(self, last_ids: dict[str, str | None]) -> None:
        """After each topic's newest id; a topic with no event yet: from its beginning.
        Several topics: their cursor, a topic with no event at the origin. (A stream of
        several "from now" had no place until the broker sent one: a first connection
        that ended before that, a draining instance's come-back answer, came back from a
        new "now", and what was published between was lost in silence.)"""
        self.started = True
        if len(self.topics) > 1:
            self.last_event_id = format_cursor(
                {topic: _id_or_origin(last_ids[topic]) for topic in self.topics}
            )
        elif (last := last_ids[self.topics[0]]) is None:
            self.from_earliest = True
        else:
            self.last_event_id = last

    def attempting(self) -> None:
        """A connection is tried: ``give_up_after`` counts from the first try that does
        not work (a connect that times out is time spent failing)."""
        if self.failing_since is None:
            self.failing_since = time.monotonic()

    def attempt_timeout(self, usual: httpx.Timeout) -> httpx.Timeout:
        """An attempt's timeouts until its answer's head: the client's usual ones, but
        while failing none runs past ``give_up_after`` (a broker that accepts and never
        answers is given up on in time, not after the connect and read timeouts). A
        stream that answers reads its body with the usual ones (``_read_as_usual``):
        a quiet one is no failure."""
        if self.give_up_after is None or self.failing_since is None:
            return usual
        left = self.give_up_after - (time.monotonic() - self.failing_since)
        left = max(left, MIN_ATTEMPT_S)
        return httpx.Timeout(
            _at_most(usual.connect, left),
            read=_at_most(usual.read, left),
            write=_at_most(usual.write, left),
            pool=_at_most(usual.pool, left),
        )

    def connected(self, heartbeat_s: float | None = None) -> None:
        """A 200 stream: it works once it delivers, or stays open a while (a come-back
        hint, a 200 that ends at once while the broker drains or its store is down,
        does not: ``give_up_after`` still counts). ``heartbeat_s``: the interval its
        broker said (``HEARTBEAT_HEADER``), None if it did not."""
        self.started = True
        self.connected_at = time.monotonic()
        self.refused_last = False
        self._comments_read = 0
        self._first_comment_at = self._last_comment_at = self._longest_beat = None
        self._follow_heartbeat(heartbeat_s)

    def _follow_heartbeat(self, heartbeat_s: float | None) -> None:
        """A stream whose broker says its heartbeat is read for ``SILENT_HEARTBEATS`` of
        it (and the margin), whatever the read timeout guessed: a guess was either late
        to see a dead connection (45 s of silence against a 1 s heartbeat) or
        reconnected live streams (under a longer heartbeat) until it grew past it. A read
        timeout the caller gave is the least it reads for (``_said_read_timeout``). A
        stream that does not say it (an older broker: a fleet being upgraded) is read
        with the guess, kept as it was. A read timeout of None stays None (never)."""
        said = heartbeat_s is not None and self.given_read_timeout is not None
        if said and self.heartbeat_s is None:
            self._guessed_read_timeout = self.read_timeout
        elif not said and self.heartbeat_s is not None:
            self.read_timeout = self._guessed_read_timeout
        self.heartbeat_s = heartbeat_s if said else None
        if self.heartbeat_s is not None:
            self.read_timeout = self._said_read_timeout(self.heartbeat_s)

    def _said_read_timeout(self, heartbeat_s: float) -> float:
        """Two of the said heartbeat and the margin, or the read timeout the caller gave
        if longer: the broker knows its pace, not what lies between (a proxy that buffers
        heartbeats, a slow link), and a caller who gave more did so on purpose (it was
        cut down to 31 s, and streams behind such a proxy reconnected every 31 s for
        good). The default gives way to the heartbeat, shorter or longer."""
        from_heartbeat = SILENT_HEARTBEATS * heartbeat_s + SILENCE_MARGIN_S
        given = self.given_read_timeout
        if self.read_timeout_given and given is not None:
            return max(from_heartbeat, given)
        return from_heartbeat

    def after_error_answer(self, error: Exception, token_refreshes: bool) -> float:
        """The delay before trying again after an error answer, or the error raised.

        A 502/503/504 is a failure as any other; a 401 with a token that may be
        refreshed (a callable) is tried again at once, unless the attempt before was
        refused too (a token refused twice in a row raises: never a loop). The cursor
        stays as it is: nothing is lost or repeated across the refresh."""
        if isinstance(error, _Retryable):
            return self.failed(str(error))
        if not isinstance(error, RequestFailed) or error.status != 401:
            raise error
        if not token_refreshes or self.refused_last:
            raise error
        self.refused_last = True
        log.info("subscription to %s: 401; trying once more with a fresh token", self.topics)
        return 0.0  # (at once: a fresh token is no reason to wait)

    def _working(self) -> None:
        self.failures, self.failing_since = 0, None

    def _worked(self) -> bool:
        """Whether the connection just ended was a working one."""
        connected_at, self.connected_at = self.connected_at, None
        return connected_at is not None and time.monotonic() - connected_at >= WORKING_AFTER_S

    def read(self, decoder: SseDecoder) -> None:
        """A chunk was read whole: a cursor sent with no event (the stream caught up
        "from now") is where to resume from, as ``EventSource`` keeps it; and the
        ``retry:`` hint."""
        if decoder.dispatched_id is not None:
            self.last_event_id = decoder.dispatched_id
        if decoder.retry_ms is not None:  # (0 too: it was taken for no hint)
            self.retry_hint_ms = decoder.retry_ms
        if decoder.comments != self._comments_read:
            self._comments_read = decoder.comments
            self.heard(time.monotonic())

    def heard(self, now: float) -> None:
        """A heartbeat came. The broker beats every stream, busy or not, about once an
        interval, never less than two thirds of one apart; so the longest time between
        two on a stream tells its interval: the stream may stay silent for three of
        that, never less than the given read timeout, nor more than the cap. It applies
        to the stream being read too (``subscriber._read_as_usual``: it applied from
        the next stream, and the one that taught it timed out on the next long beat).

        The longest, not the shortest: heartbeats also come closer (held up by the
        network and let through at once, or sent at each backoff step, from 0.05 s,
        while the broker's store is down), and taken for the interval those set a read
        timeout grown for a long heartbeat back to the given one, and the stream timed
        out again. A shorter read timeout than the one in force (undoing the doubling
        of ``read_timed_out`` once heartbeats show it was connections that died, not a
        long heartbeat: kept, each later dead connection was noticed later) is taken
        only once the stream has beaten for as long as the one in force: a shorter
        longest interval over that long is no burst."""
        previous, self._last_comment_at = self._last_comment_at, now
        if self._first_comment_at is None:
            self._first_comment_at = now
        given, cap, current = self.given_read_timeout, self.read_timeout_cap, self.read_timeout
        if previous is None or given is None or cap is None or current is None:
            return
        if self.heartbeat_s is not None:
            return  # (its broker said its heartbeat: nothing to learn)
        beat = self._longest_beat = max(self._longest_beat or 0.0, now - previous)
        fits = min(max(given, 3 * beat), cap)
        if fits < current and now - self._first_comment_at < current:
            return  # (not yet: heard for less than the read timeout it would replace)
        if fits != current:
            log.info("subscription to %s: heartbeats up to %.3gs apart; reading for up to %gs",
                     self.topics, beat, fits)  # fmt: skip
            self.read_timeout = fits

    def received(self, events: list[Event]) -> Iterator[Event]:
        """A chunk's events to hand over: a ``broker.position`` is where the stream stands,
        kept as its cursor (before the next event's topic is told by it), and no event; a
        ``broker.beat`` (a URL that asked for them) is a heartbeat, and no event either."""
        for event in events:
            if event.event == POSITION:
                if event.id is not None:
                    self.last_event_id = event.id
                continue
            if event.event == BEAT:
                continue
            yield self.delivered(event)

    def delivered(self, event: Event) -> Event:
        """The event, with its topic (and an end counted once per topic: a topic closed,
        then deleted, is told twice)."""
        self._working()
        previous = self.last_event_id
        if event.id is not None:
            self.last_event_id = event.id
        topic = self._topic_of(event, previous)
        if event.ends_topic and topic is not None:
            self.topics_ended.add(topic)
        return replace(event, topic=topic)

    def _topic_of(self, event: Event, previous: str | None) -> str | None:
        """A gap names its topic; on a multi-topic stream any other event is told by its
        id, the cursor in which only its topic moved."""
        if len(set(self.topics)) == 1:
            return self.topics[0]
        if event.is_gap:
            topic = event.json().get("topic")
            return topic if isinstance(topic, str) else None
        before, after = _cursor_parts(previous), _cursor_parts(event.id)
        if before:
            moved = [t for t, place in after.items() if not _same_place(before.get(t), place)]
        else:  # a stream's first event, no cursor before it: the others are at their start
            moved = [topic for topic, place in after.items() if place.stream_after != (0, 0)]
        return moved[0] if len(moved) == 1 else None  # (None: it cannot be told)

    def broke(self, error: httpx.TransportError) -> float:
        """``failed``, for a connection that broke (or never was); a stream that timed out
        reading makes the next ones read longer first (``read_timed_out``), unless its
        broker said its heartbeat: then the connection died."""
        timed_out = isinstance(error, httpx.ReadTimeout) and self.connected_at is not None
        if timed_out and self.heartbeat_s is None:
            self.read_timed_out()
        return self.failed(repr(error))

    def read_timed_out(self) -> None:
        """A stream sent nothing for ``read_timeout``: most likely the broker's heartbeat
        (``BROKER_HEARTBEAT_SECONDS``) is longer, and every stream timed out and was
        reconnected, for ever. The stream did not say its heartbeat (an older broker),
        so the next ones wait twice as long, up to ``read_timeout_cap`` (a connection
        that died in silence is then noticed that much later)."""
        if self.read_timeout is None or self.read_timeout_cap is None:
            return
        longer = min(self.read_timeout * 2, self.read_timeout_cap)
        if longer > self.read_timeout:
            log.warning(
                "subscription to %s: nothing read for %gs (is the broker's heartbeat "
                "longer?); reading for up to %gs from now on (read_timeout= sets it)",
                self.topics, self.read_timeout, longer,
            )  # fmt: skip
            self.read_timeout = longer

    def failed(self, why: str) -> float:
        """The delay before reconnecting; raises Unreachable once past ``give_up_after``."""
        if self._worked():
            self._working()
        now = time.monotonic()
        self.failing_since = self.failing_since or now
        self.failures += 1
        if self.give_up_after is not None and now - self.failing_since >= self.give_up_after:
            raise Unreachable(f"no working connection for {self.give_up_after:g}s: {why}")
        # The first retry waits what ``retry:`` asks (as EventSource does), each next one
        # twice as long: a broker that stays down is not asked ever faster.
        delay = min(self._first_delay() * doubled(self.failures), MAX_DELAY)
        if self.give_up_after is not None:  # one last try when the time is up, not after
            delay = min(delay, self.give_up_after - (now - self.failing_since))
        log.info("subscription to %s: %s; reconnecting in %.2fs", self.topics, why, delay)
        return delay

    def ended(self) -> float:
        """A stream that ended without broker.end (a drain, a come-back hint): reconnect;
        one that ended at once with nothing delivered counts as a failure."""
        if not self._worked():
            return self.failed("the stream ended at once: the broker asks to come back later")
        self._working()
        self.failures += 1
        return min(self._first_delay(), MAX_DELAY)

    def _first_delay(self) -> float:
        hint = self.retry_hint_ms / 1000 if self.retry_hint_ms is not None else FIRST_DELAY
        return max(hint, MIN_DELAY)


class _Retryable(Exception):
    """An answer another try may change (502, 503, 504)."""


def heartbeat_of(said: str | None) -> float | None:
    """The heartbeat interval a stream's ``HEARTBEAT_HEADER`` says, in seconds; None if
    none is said, or none that can be used (a proxy's, or a broken, value)."""
    try:
        seconds = float(said) if said is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _at_most(timeout: float | None, limit: float) -> float:
    return limit if timeout is None else min(timeout, limit)


def _id_or_origin(last_id: str | None) -> EventId:
    """A topic's place in a cursor: after its newest id, or at the origin if it has none
    (its log read from its start, whatever the log's epoch)."""
    return ORIGIN if last_id is None else EventId.parse(last_id)


def _same_place(before: EventId | None, after: EventId) -> bool:
    """Whether a topic's part of the cursor did not move: the start of a log is one
    place whatever its epoch (a topic with no log yet, ``0.0-0`` or ``0.<ms>-<n>``, is
    sent with its new log's epoch once it has one, before its first event reaches the
    stream)."""
    if before is None:
        return False
    return before == after or before.stream_after == after.stream_after == (0, 0)


def _cursor_parts(cursor: str | None) -> Cursor:
    """A multi-topic stream's id, each topic's part ({} for none, or one not a cursor)."""
    try:
        return parse_cursor(cursor) if cursor else {}
    except InvalidEventId:
        return {}
