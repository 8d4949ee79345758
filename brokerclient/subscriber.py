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

This module does the I/O; where each connection starts and how long to wait before it
is decided by ``brokerclient.resume._Resume`` (no I/O, tested on a fake clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from typing import Any

import httpx

from brokerclient.errors import RequestFailed
from brokerclient.http import (
    DEFAULT_URL,
    RETRY_STATUSES,
    AsyncToken,
    Token,
    async_token_now,
    base_headers,
    checked_url,
    failure,
    json_of,
    refreshes,
    shared_tls,
    token_now,
    topic_path,
)

# (DEFAULT_READ_TIMEOUT re-exported: the subscribers' default, which `broker tail` uses too)
from brokerclient.resume import DEFAULT_READ_TIMEOUT as DEFAULT_READ_TIMEOUT
from brokerclient.resume import (
    HEARTBEAT_HEADER,
    NotGiven,
    ReadTimeout,
    _Resume,
    _Retryable,
    heartbeat_of,
    seconds_of,
)
from brokerclient.sse import Event, SseDecoder

CONNECT_TIMEOUT = 10.0
ONE_BODY_AT_A_TIME = frozenset({"HTTP/1.1", "HTTP/1.0"})
"""The versions whose network stream carries one body at a time, whose reads
``_read_as_usual`` may time (HTTP/1.0: a proxy's answer, a body read until the close)."""


async def _backoff(closing: asyncio.Event, delay: float) -> None:
    """Wait ``delay`` before reconnecting, or less if the subscriber is closed meanwhile
    (from another task: it slept on for up to ``resume.MAX_DELAY``)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(closing.wait(), delay)


@contextlib.contextmanager
def _read_as_usual(response: httpx.Response, resume: _Resume) -> Iterator[None]:
    """While in it, the body of a stream that answered is read with the stream's read
    timeout (its head may have been waited for with less) as it is at each read:
    heartbeats may change it while the stream is read (``_Resume.heard``).

    httpcore takes a body's read timeout once, from the request's timeout dict, when
    the body is first read, and passes it to each read of its network stream: that
    stream's ``read`` is wrapped here to be given the one in force instead, and
    unwrapped after (a connection kept alive serves other requests). Setting the dict
    alone, a timeout learnt from a stream's heartbeats applied from the next stream
    only. A response with no network stream (a test's transport) gets the dict. The
    version ranges are pinned in pyproject.toml; tests/unit/test_subscriber_resume.py's
    quiet-stream tests and tests/face/test_subscriber_timing.py fail if this stops
    working."""
    timeouts = response.request.extensions.get("timeout")
    if isinstance(timeouts, dict):
        timeouts["read"] = resume.read_timeout
    stream = response.extensions.get("network_stream")
    read = getattr(stream, "read", None)
    if stream is None or read is None or response.http_version not in ONE_BODY_AT_A_TIME:
        # (over HTTP/2 the network stream is the connection's, read for every stream
        # on it: its reads are not this body's alone to time)
        yield
        return
    read_in_force: Any
    if inspect.iscoroutinefunction(read):

        async def read_in_force(max_bytes: int, timeout: float | None = None) -> Any:
            return await read(max_bytes, resume.read_timeout)

    else:

        def read_in_force(max_bytes: int, timeout: float | None = None) -> Any:
            return read(max_bytes, resume.read_timeout)

    stream.read = read_in_force
    try:
        yield
    finally:
        if vars(stream).get("read") is read_in_force:  # (never two at once over HTTP/1.x)
            del stream.read  # (the class's own again)


def _timeout(read_timeout: ReadTimeout) -> httpx.Timeout:
    return httpx.Timeout(CONNECT_TIMEOUT, read=seconds_of(read_timeout))


def _read_timeout_of(
    client: httpx.Client | httpx.AsyncClient | None, read_timeout: ReadTimeout
) -> ReadTimeout:
    """The read timeout the caller asked for: ``read_timeout`` if given, with a client
    passed in or not; left out with a client passed in, that client's own read timeout,
    as given (the caller chose it, with the client: a floor under the broker's
    heartbeat; None: never); else left out (the heartbeat decides: ``_Resume``). The
    ``read_timeout`` given beside a client was dropped for the client's."""
    if client is None or not isinstance(read_timeout, NotGiven):
        return read_timeout
    return client.timeout.read


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
    heartbeat, before it is taken for dead and reconnected (None: never). A broker that
    says its heartbeat (the ``Broker-Heartbeat`` header) decides instead: two of its
    intervals and a second (``resume.SILENT_HEARTBEATS``), or the ``read_timeout`` given
    if that is longer (a proxy that holds heartbeats back, a slow link); left at its
    default, the heartbeat decides alone, shorter or longer. Against a broker that does
    not say it (an older one), it is doubled by each stream that timed out, up to
    ``resume.READ_TIMEOUT_GROWTH`` times (a broker whose ``BROKER_HEARTBEAT_SECONDS`` is
    longer made every stream time out, for ever), and set from the heartbeats it shows.
    Left out, it is ``DEFAULT_READ_TIMEOUT`` (``resume.NotGiven``, not a number: 45 s
    given on purpose is a floor under the heartbeat; left out, it is not).

    ``client``: an httpx client of the caller's (theirs to close). Its own read timeout
    counts as a ``read_timeout`` given (a floor under the heartbeat; None: never), unless
    ``read_timeout`` is given too, which wins.
    """

    def __init__(
        self,
        topics: str | Sequence[str],
        url: str = DEFAULT_URL,
        *,
        last_event_id: str | None = None,
        from_earliest: bool = False,
        token: AsyncToken = None,
        read_timeout: ReadTimeout = DEFAULT_READ_TIMEOUT,
        give_up_after: float | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._client = client or httpx.AsyncClient(
            base_url=checked_url(url), timeout=_timeout(read_timeout), verify=shared_tls()
        )
        self._resume = _Resume(
            _topics(topics), last_event_id, from_earliest, give_up_after,
            read_timeout_asked=_read_timeout_of(client, read_timeout),
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
            self._resume.connected(_heartbeat_said(response))
            decoder = SseDecoder(self._resume.last_event_id)
            with _read_as_usual(response, self._resume):
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
        read_timeout: ReadTimeout = DEFAULT_READ_TIMEOUT,
        give_up_after: float | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        self._client = client or httpx.Client(
            base_url=checked_url(url), timeout=_timeout(read_timeout), verify=shared_tls()
        )
        self._resume = _Resume(
            _topics(topics), last_event_id, from_earliest, give_up_after,
            read_timeout_asked=_read_timeout_of(client, read_timeout),
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
            self._resume.connected(_heartbeat_said(response))
            decoder = SseDecoder(self._resume.last_event_id)
            self._reading = response
            try:
                if self._closed:  # (closed while the head was awaited: nothing to shut then)
                    return
                with _read_as_usual(response, self._resume):
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
        wait before a reconnect ends at once too (it slept on, up to ``resume.MAX_DELAY``)."""
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


def _heartbeat_said(response: httpx.Response) -> float | None:
    """The heartbeat interval the stream's broker says (None: an older broker)."""
    return heartbeat_of(response.headers.get(HEARTBEAT_HEADER))


def _is_stream(response: httpx.Response) -> bool:
    content_type = response.headers.get("content-type", "")
    return response.status_code == 200 and content_type.startswith("text/event-stream")


def _raise_for(response: httpx.Response) -> None:
    if response.status_code in RETRY_STATUSES:
        raise _Retryable(f"{response.status_code} from {response.request.url.path}")
    if response.status_code == 200:  # as EventSource does: a stream or nothing
        raise RequestFailed(200, None, f"{response.request.url.path}: not an event stream")
    raise failure(response)


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
