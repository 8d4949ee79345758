"""Subscribing over HTTP: iterate a topic's events, resuming by itself after any drop.

``AsyncSubscriber`` (asyncio) and ``Subscriber`` (blocking) do what a browser's
``EventSource`` does, and a little more:

- after a dropped connection, a restarted instance, a load balancer's 502/503/504
  or a come-back-later stream, they reconnect with ``Last-Event-ID`` = the id of
  the last event handed to the caller, so nothing is lost or repeated;
- a subscription "from now" first asks where each of its topics ends (``GET
  /topics/{t}``) and starts after those ids, so that a drop before the first event
  loses nothing either (``EventSource`` would start "from now" again);
- ``broker.gap`` and ``broker.end`` events are yielded like any other
  (``Event.is_gap``, ``Event.is_end``); iteration stops once every topic has ended
  (its ``broker.end``, or a gap saying it was deleted: ``Event.ends_topic``), or
  when the broker answers 204 (the topic is closed and there is nothing left);
- an error answer that another try cannot change (400, 401, 403, 404) raises
  ``RequestFailed``; ``give_up_after`` seconds without a working connection raise
  ``Unreachable`` (None: keep trying, as ``EventSource`` does);
- ``token`` may be a callable returning the current token, asked at each connection:
  the broker ends a stream when its token expires, and the reconnect sends a fresh
  one. A 401 is then tried once more at once, with the callable asked again (the
  cursor kept: nothing lost or repeated); refused twice in a row, it raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace

import httpx

from broker.errors import InvalidEventId
from broker.ids import ORIGIN, Cursor, EventId, format_cursor, parse_cursor
from brokerclient.errors import RequestFailed, Unreachable
from brokerclient.http import (
    DEFAULT_URL,
    RETRY_STATUSES,
    AsyncToken,
    Token,
    async_token_now,
    base_headers,
    checked_url,
    doubled,
    failure,
    json_of,
    refreshes,
    stream_path,
    token_now,
    topic_path,
)
from brokerclient.sse import POSITION, Event, SseDecoder

log = logging.getLogger(__name__)
DEFAULT_READ_TIMEOUT = 45.0  # three of the broker's default 15 s heartbeats
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
CONNECT_TIMEOUT = 10.0
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
    read_timeout: float | None = DEFAULT_READ_TIMEOUT
    """How long a stream may send nothing (no event, no heartbeat) before it is taken for
    dead and reconnected: the given one, doubled by each stream that timed out, and set
    from the heartbeats a stream shows (``heard``)."""
    given_read_timeout: float | None = field(init=False)
    read_timeout_cap: float | None = field(init=False)
    _comments_read: int = 0  # by the current stream's decoder
    _last_comment_at: float | None = None  # (monotonic) the current stream's last heartbeat
    _shortest_beat: float | None = None  # the current stream's shortest heartbeat interval

    def __post_init__(self) -> None:
        given = self.given_read_timeout = self.read_timeout
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

    def connected(self) -> None:
        """A 200 stream: it works once it delivers, or stays open a while (a come-back
        hint, a 200 that ends at once while the broker drains or its store is down,
        does not: ``give_up_after`` still counts)."""
        self.started = True
        self.connected_at = time.monotonic()
        self.refused_last = False
        self._comments_read, self._last_comment_at, self._shortest_beat = 0, None, None

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
        """A heartbeat came. Two of them tell the broker's interval (every stream, busy or
        not, gets one every two thirds to one interval): the next streams read for three
        of the shortest seen, never less than the given read timeout. That undoes the
        doubling of ``read_timed_out`` once heartbeats show it was a connection that died,
        not a long heartbeat (kept, it made each later dead connection noticed later)."""
        previous, self._last_comment_at = self._last_comment_at, now
        if previous is None or self.given_read_timeout is None or self.read_timeout_cap is None:
            return
        beat = now - previous
        if self._shortest_beat is not None and beat >= self._shortest_beat:
            return
        self._shortest_beat = beat
        fits = min(max(self.given_read_timeout, 3 * beat), self.read_timeout_cap)
        if fits != self.read_timeout:
            log.info("subscription to %s: heartbeats %.3gs apart; reading for up to %gs",
                     self.topics, beat, fits)  # fmt: skip
            self.read_timeout = fits

    def received(self, events: list[Event]) -> Iterator[Event]:
        """A chunk's events to hand over: a ``broker.position`` is where the stream stands,
        kept as its cursor (before the next event's topic is told by it), and no event."""
        for event in events:
            if event.event == POSITION:
                if event.id is not None:
                    self.last_event_id = event.id
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
        reading makes the next ones read longer first (``read_timed_out``)."""
        if isinstance(error, httpx.ReadTimeout) and self.connected_at is not None:
            self.read_timed_out()
        return self.failed(repr(error))

    def read_timed_out(self) -> None:
        """A stream sent nothing for ``read_timeout``: most likely the broker's heartbeat
        (``BROKER_HEARTBEAT_SECONDS``) is longer, and every stream timed out and was
        reconnected, for ever. The stream does not say its heartbeat (only ``retry:``),
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


async def _backoff(closing: asyncio.Event, delay: float) -> None:
    """Wait ``delay`` before reconnecting, or less if the subscriber is closed meanwhile
    (from another task: it slept on for up to ``MAX_DELAY``)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(closing.wait(), delay)


def _read_as_usual(response: httpx.Response, read_timeout: float | None) -> None:
    """The body of a stream that answered is read with the stream's read timeout (its
    head may have been waited for with less; it may have grown since: ``_Resume``).
    httpx hands the request's timeout dict to httpcore, which takes the read timeout
    from it when the body is first read: the version ranges are pinned in
    pyproject.toml, and tests/unit/test_subscriber_resume.py's quiet-stream tests fail
    if this stops working."""
    timeouts = response.request.extensions.get("timeout")
    if isinstance(timeouts, dict):
        timeouts["read"] = read_timeout


def _at_most(timeout: float | None, limit: float) -> float:
    return limit if timeout is None else min(timeout, limit)


def _timeout(read_timeout: float | None) -> httpx.Timeout:
    return httpx.Timeout(CONNECT_TIMEOUT, read=read_timeout)


def _topics(topics: str | Sequence[str]) -> list[str]:
    names = [topics] if isinstance(topics, str) else list(topics)
    if not names:
        raise ValueError("name at least one topic")
    return names


class AsyncSubscriber:
    """The events of one topic (or several), resumed across drops. ``async for`` it.

    ``last_event_id`` resumes after that id; ``from_earliest`` starts from the
    oldest retained event; neither: only events published from now on. The
    attribute ``last_event_id`` always holds where the subscription stands (the
    id of the last event yielded, or a later place the broker sent with no event:
    a ``broker.position``, or where its topics ended when it began "from now"), so
    a program can store it and resume from it later. Close it (``async with``,
    or ``aclose()``), as any async generator holding a connection: one left to the
    garbage collector as the event loop ends is closed too late, and asyncio says so.

    ``token``: a JWT, or a callable returning the current one (a plain function, or
    an ``async def``), asked at each connection and once more after a 401.

    ``read_timeout``: how long a stream may send nothing, not even the broker's
    heartbeat, before it is taken for dead and reconnected (None: never); doubled by
    each stream that timed out, up to ``READ_TIMEOUT_GROWTH`` times (a broker whose
    ``BROKER_HEARTBEAT_SECONDS`` is longer made every stream time out, for ever).
    """

    def __init__(
        self,
        topics: str | Sequence[str],
        url: str = DEFAULT_URL,
        *,
        last_event_id: str | None = None,
        from_earliest: bool = False,
        token: AsyncToken = None,
        read_timeout: float | None = DEFAULT_READ_TIMEOUT,
        give_up_after: float | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._client = client or httpx.AsyncClient(
            base_url=checked_url(url), timeout=_timeout(read_timeout)
        )
        self._resume = _Resume(
            _topics(topics), last_event_id, from_earliest, give_up_after,
            read_timeout=self._client.timeout.read,  # (a client passed in: its own)
        )  # fmt: skip
        self._token = token
        self._own_client = client is None
        self._closed = False  # aclose() was called: iteration ends, it does not reconnect
        self._closing = asyncio.Event()  # (set by aclose: ends a backoff's wait at once)
        self._iterations: weakref.WeakSet[AsyncGenerator[Event, None]] = weakref.WeakSet()

    @property
    def last_event_id(self) -> str | None:
        return self._resume.last_event_id

    def __aiter__(self) -> AsyncIterator[Event]:
        iteration = self.events()
        self._iterations.add(iteration)  # (aclose ends it: see there)
        return iteration

    async def events(self) -> AsyncGenerator[Event, None]:
        resume = self._resume
        while not self._closed:
            # Once an attempt, outside the try: what the callable raises is the caller's
            # (an httpx error of its own token fetch was taken for the broker's, and
            # retried for ever; review).
            token = await async_token_now(self._token)
            try:
                resume.attempting()
                if resume.needs_start_point():
                    # (at once: one after another, 32 topics took a quarter of a second
                    # on loopback before the stream was asked for; review)
                    asked = [self._topic_last_id(t, token) for t in resume.topics]
                    ends = await asyncio.gather(*asked)
                    resume.start_at(dict(zip(resume.topics, ends, strict=True)))
                # (closed with this generator: left suspended, the response in it was
                # closed by asyncio at exit, concurrently with this one, and failed)
                async with contextlib.aclosing(self._connection(token)) as connection:
                    async for item in connection:
                        if item is None:
                            return
                        yield item
                        if item.ends_topic and resume.all_ended():
                            return
                delay = resume.ended()
            except (httpx.TransportError, RuntimeError) as error:
                if self._closed:  # (closed under the read: httpx says so one of these ways)
                    return
                if isinstance(error, RuntimeError):
                    raise
                delay = resume.broke(error)
            except (_Retryable, RequestFailed) as error:
                delay = resume.after_error_answer(error, refreshes(self._token))
            await _backoff(self._closing, delay)

    async def _connection(self, token: str | None) -> AsyncGenerator[Event | None, None]:
        """One connection's events; a None means the topic is closed (204): stop."""
        path, params, headers = self._resume.request(token)
        timeout = self._resume.attempt_timeout(self._client.timeout)
        async with self._client.stream(
            "GET", path, params=params, headers=headers, timeout=timeout
        ) as response:
            if response.status_code == 204:
                yield None
                return
            if not _is_stream(response):
                await response.aread()
                _raise_for(response)
            self._resume.connected()
            _read_as_usual(response, self._resume.read_timeout)
            decoder = SseDecoder(self._resume.last_event_id)
            async for chunk in response.aiter_bytes():
                for event in self._resume.received(decoder.feed(chunk)):
                    yield event
                self._resume.read(decoder)

    async def _topic_last_id(self, topic: str, token: str | None) -> str | None:
        response = await self._client.get(
            topic_path(topic, ""),
            headers=base_headers(token),
            timeout=self._resume.attempt_timeout(self._client.timeout),
        )
        return _last_id_of(response, topic)

    async def aclose(self) -> None:
        """Stop: an iteration running (in another task) ends, without reconnecting (at
        once from a wait before a reconnect).

        One left suspended (a ``break`` out of ``async for``) is closed here, its
        response with it: else asyncio closed it later, its client gone, and printed
        "an error occurred during closing of asynchronous generator"."""
        self._closed = True
        self._closing.set()
        for iteration in list(self._iterations):
            with contextlib.suppress(RuntimeError):  # (running, in another task)
                await iteration.aclose()
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class Subscriber:
    """``AsyncSubscriber`` for blocking code: ``for event in subscriber``; a callable
    ``token`` is a plain function (called in the iterating thread)."""

    def __init__(
        self,
        topics: str | Sequence[str],
        url: str = DEFAULT_URL,
        *,
        last_event_id: str | None = None,
        from_earliest: bool = False,
        token: Token = None,
        read_timeout: float | None = DEFAULT_READ_TIMEOUT,
        give_up_after: float | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        self._client = client or httpx.Client(
            base_url=checked_url(url), timeout=_timeout(read_timeout)
        )
        self._resume = _Resume(
            _topics(topics), last_event_id, from_earliest, give_up_after,
            read_timeout=self._client.timeout.read,  # (a client passed in: its own)
        )  # fmt: skip
        self._token = token
        self._own_client = client is None
        self._closed = False  # close() was called: iteration ends, it does not reconnect
        self._closing = threading.Event()  # (set by close: ends a backoff's wait at once)
        self._reading: httpx.Response | None = None  # the stream being read, if one is

    @property
    def last_event_id(self) -> str | None:
        return self._resume.last_event_id

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def events(self) -> Iterator[Event]:
        resume = self._resume
        while not self._closed:
            token = token_now(self._token)  # (outside the try: see AsyncSubscriber)
            try:
                resume.attempting()
                if resume.needs_start_point():
                    resume.start_at({t: self._topic_last_id(t, token) for t in resume.topics})
                for item in self._connection(token):
                    if item is None:
                        return
                    yield item
                    if item.ends_topic and resume.all_ended():
                        return
                delay = resume.ended()
            except (httpx.TransportError, RuntimeError) as error:
                if self._closed:  # (closed under the read, from another thread)
                    return
                if isinstance(error, RuntimeError):
                    raise
                delay = resume.broke(error)
            except (_Retryable, RequestFailed) as error:
                delay = resume.after_error_answer(error, refreshes(self._token))
            self._closing.wait(delay)  # (a close() from another thread ends it at once)

    def _connection(self, token: str | None) -> Iterator[Event | None]:
        path, params, headers = self._resume.request(token)
        timeout = self._resume.attempt_timeout(self._client.timeout)
        with self._client.stream(
            "GET", path, params=params, headers=headers, timeout=timeout
        ) as response:
            if response.status_code == 204:
                yield None
                return
            if not _is_stream(response):
                response.read()
                _raise_for(response)
            self._resume.connected()
            _read_as_usual(response, self._resume.read_timeout)
            decoder = SseDecoder(self._resume.last_event_id)
            self._reading = response
            try:
                if self._closed:  # (closed while the head was awaited: nothing to shut then)
                    return
                for chunk in response.iter_bytes():
                    yield from self._resume.received(decoder.feed(chunk))
                    self._resume.read(decoder)
            finally:
                self._reading = None

    def _topic_last_id(self, topic: str, token: str | None) -> str | None:
        response = self._client.get(
            topic_path(topic, ""),
            headers=base_headers(token),
            timeout=self._resume.attempt_timeout(self._client.timeout),
        )
        return _last_id_of(response, topic)

    def close(self) -> None:
        """Stop: an iteration running (in another thread) ends, without reconnecting.

        A read it is blocked in is cut (its socket shut): closing the client alone left
        it waiting for the stream's next bytes, up to a heartbeat (15 s by default); a
        wait before a reconnect ends at once too (it slept on, up to ``MAX_DELAY``)."""
        self._closed = True
        self._closing.set()
        _shut(self._reading)
        if self._own_client:
            self._client.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _shut(response: httpx.Response | None) -> None:
    """Shut the socket under ``response`` (httpcore's ``network_stream``): a read blocked
    on it in another thread ends at once."""
    stream = response.extensions.get("network_stream") if response is not None else None
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _Retryable(Exception):
    """An answer another try may change (502, 503, 504)."""


def _is_stream(response: httpx.Response) -> bool:
    content_type = response.headers.get("content-type", "")
    return response.status_code == 200 and content_type.startswith("text/event-stream")


def _raise_for(response: httpx.Response) -> None:
    if response.status_code in RETRY_STATUSES:
        raise _Retryable(f"{response.status_code} from {response.request.url.path}")
    if response.status_code == 200:  # as EventSource does: a stream or nothing
        raise RequestFailed(200, None, f"{response.request.url.path}: not an event stream")
    raise failure(response)


def _id_or_origin(last_id: str | None) -> EventId:
    """A topic's place in a cursor: after its newest id, or at the origin if it has none
    (its log read from its start, whatever the log's epoch)."""
    return ORIGIN if last_id is None else EventId.parse(last_id)


def _last_id_of(response: httpx.Response, topic: str) -> str | None:
    """The newest id of a topic from ``GET /topics/{t}``: None if it has no event yet.

    Only the broker's own answers count: its 404 problem (a proxy's 404 page taken for
    "no event yet" replayed the whole history), and a topic of this name (a topic named
    ``.`` or ``..`` reached the listing or the live page before ``topic_path`` kept its
    dots; review)."""
    if response.status_code == 404 and _is_problem(response):
        return None
    if response.status_code in RETRY_STATUSES:
        raise _Retryable(f"{response.status_code} from {response.request.url.path}")
    if response.status_code != 200:
        raise failure(response)
    info = json_of(response)  # (a proxy's page answered 200 is no topic)
    if not isinstance(info, dict) or info.get("topic") != topic:
        raise RequestFailed(response.status_code, None, f"the answer is not topic {topic!r}")
    last = info.get("last_id")
    return str(last) if last else None


def _is_problem(response: httpx.Response) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.startswith("application/problem+json")


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
