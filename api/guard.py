"""What one client may hold of a broker process: time, head bytes, connections.

uvicorn bounds little of it on its httptools protocol: its keep-alive timer
stops at the first byte of the next request, it has no deadline for a request
head or body, and httptools has no limit on a head's size. A client could hold
a connection for ever with half a request head or a body that never ends, and
a few thousand such clients would take every file descriptor of the process.

So each server process has one ``Guard``: the limits (from Settings, the
connection limit lowered to what the open-file limit allows) and one
``Deadlines`` for every waiting connection. ``api.connections.BrokerHttpProtocol``
applies them to the requests it reads (a connection's first, and each one after
an answer); ``GuardedHttpToolsProtocol`` (uvicorn's protocol, which serves what
is handed over, until the connection idles again) to the heads and bodies it
reads. An open event stream waits for nothing and has no deadline.

A connection past the limit is answered ``refusal_of``'s come-back or 503. A
refused request is answered and then closed lingering (``api.lingering``), as is
any answer uvicorn's protocol closes the connection after while the request's
body is still coming (a 409 or 503 ending a streaming ingest), and its 400 for bytes
its parser cannot read.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import resource
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

import httptools
from starlette.responses import Response
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from api import problems, routes
from api.answers import route_class
from api.cors import cors_headers_of_head, with_cors
from api.deadlines import Deadlines
from api.heads import RequestHead
from api.lingering import ClosingDeferred, close_after_answer, close_lingering
from api.metrics import RouteClass, count_response
from api.raw_answers import answer_and_close, invalid_request
from api.settings import Settings

log = logging.getLogger(__name__)

APP_STATE_KEY = "broker.app"
"""Where the app's lifespan leaves itself in uvicorn's app state: for the connections
served here and in ``api.connections``, before a request has a scope."""
FD_RESERVE = 64
"""File descriptors kept for the process itself: Redis connections, logs, the loop."""
FULL_WARNING_INTERVAL = 10.0
NDJSON = b"application/x-ndjson"
DATA_AFTER_CLOSE = "Data after `Connection: close`"
"""httptools' error for bytes after a request that closes the connection, its
``lenient_data_after_close`` off (llhttp's ``HPE_CLOSED_CONNECTION``; HTTP/1.0 too)."""


class TooManyAhead(Exception):
    """A client sent more requests ahead than uvicorn's protocol queues (see below)."""


MAX_PIPELINED_REQUESTS = 128
"""Requests a client may send ahead on a connection uvicorn serves before it is closed
(no browser or HTTP library sends ahead; the lean path bounds them by bytes)."""
QUEUED_BEHIND_A_STREAM = 8
"""Requests sent ahead behind an event stream under way past which the connection is
no longer read (a stream's client ending is then seen only once a write to it fails):
each may hold a body up to uvicorn's high-water mark until the stream ends."""


@dataclass(frozen=True)
class ClientLimits:
    head_timeout: float
    body_timeout: float
    max_head_bytes: int
    max_connections: int
    """Connections served; past it they are answered come-back or 503."""
    max_open: int
    """Connections held at all; past it a new one is closed at once, unanswered."""
    retry_ms: int

    @property
    def retry_after(self) -> int:
        return max(1, -(-self.retry_ms // 1000))


class Admission(enum.Enum):
    SERVE = "serve"
    REFUSE = "refuse"  # answered (stream: come back; publish: 503), then closed
    DROP = "drop"  # closed at once: descriptors are nearly gone


class Guard:
    """One server process's client limits and the deadlines of its waiting connections."""

    def __init__(self, limits: ClientLimits) -> None:
        self.limits = limits
        self.deadlines = Deadlines()
        self._warned_at = -FULL_WARNING_INTERVAL

    def admit(self, open_connections: int) -> Admission:
        """What to do with a new connection, ``open_connections`` counting it."""
        if open_connections <= self.limits.max_connections:
            return Admission.SERVE
        self._warn_full(open_connections)
        if open_connections <= self.limits.max_open:
            return Admission.REFUSE
        return Admission.DROP

    def _warn_full(self, open_connections: int) -> None:
        now = time.monotonic()
        if now - self._warned_at >= FULL_WARNING_INTERVAL:
            self._warned_at = now
            log.warning(
                "%d connections open, over the limit of %d: refusing new ones",
                open_connections,
                self.limits.max_connections,
            )


def refusal_of(
    head: RequestHead, parser: httptools.HttpRequestParser, limits: ClientLimits, app: Any
) -> tuple[Response, RouteClass] | None:
    """The answer past the connection limit, and the route it answers: a stream is
    told to come back, anything else gets 503, but health checks and metrics (None:
    served; a history page, a listing or a HEAD was served too, and a history page
    can be megabytes held for a client that does not read). With the CORS headers of
    ``app`` (if started): a cross-origin EventSource takes an answer without them for
    a network error and gives up for good."""
    try:
        path = unquote(httptools.parse_url(head.url).path.decode("ascii"))
    except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
        return None
    method = parser.get_method().decode("ascii", "replace")
    scope = {"type": "http", "method": method, "path": path, "headers": head.headers, "app": app}
    started = scope if app is not None else None  # (the app's CORS policy comes with it)
    if routes.stream_topic(scope) is not None:
        return routes.come_back_later(limits.retry_ms, "too many connections", started), "stream"
    if path in OPERATIONS_PATHS:
        return None
    refusal = problems.too_many_connections(limits.retry_after)
    return (refusal if started is None else with_cors(refusal, started)), route_class(scope)


OPERATIONS_PATHS = frozenset({"/healthz", "/readyz", "/readyz/store", "/metrics"})
"""What operators need answers past the connection limit too."""


def is_stream(cycle: RequestResponseCycle) -> bool:
    """Whether the request ``cycle`` answers is an event stream's (not a history page)."""
    return routes.stream_topic(dict(cycle.scope)) is not None


_GUARDS: weakref.WeakKeyDictionary[ServerState, Guard] = weakref.WeakKeyDictionary()


def guard_of(server_state: ServerState, settings: Settings | None) -> Guard:
    """The guard of this server (made on its first connection)."""
    guard = _GUARDS.get(server_state)
    if guard is None:
        guard = _GUARDS[server_state] = Guard(limits_from(settings or Settings()))
    return guard


def limits_from(settings: Settings) -> ClientLimits:
    usable = max(1, raise_open_file_limit() - FD_RESERVE)
    # An eighth of the usable descriptors stays free to answer connections past
    # the limit: a come-back holds one for a moment; closing at once tells nothing.
    max_connections = min(settings.max_connections, usable - usable // 8)
    if max_connections < settings.max_connections:
        log.warning(
            "BROKER_MAX_CONNECTIONS is %d but the open-file limit allows %d connections",
            settings.max_connections,
            max_connections,
        )
    return ClientLimits(
        head_timeout=settings.head_timeout_seconds,
        body_timeout=settings.body_timeout_seconds,
        max_head_bytes=settings.max_head_bytes,
        max_connections=max_connections,
        max_open=max(usable, max_connections),
        retry_ms=settings.retry_ms,
    )


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (as Go's runtime does); the limit
    in force. A default soft limit of 1024 would cap a broker at about 900 streams."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit from %d to %d", soft, hard)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


# -- uvicorn's protocol, guarded -------------------------------------------------------------


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's protocol with a deadline for every request head and body and a limit
    on a head's size; it serves every connection ``BrokerHttpProtocol`` hands over.

    Deadlines: a head must arrive within the head timeout of the connection's
    handover or of the previous response's end; a body within the body timeout
    of its head, except a streaming ingest (``application/x-ndjson``), whose
    deadline starts again with each read: it may idle that long between lines.
    A body answered before its end (a bad line's 400, a 413) is read and dropped
    within the body timeout of the answer, in all: past it, closed lingering.
    While the app works on a request, and for as long as a response streams,
    nothing is timed here.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        guard: Guard,
        give_back: Callable[[asyncio.Transport], None] | None = None,
    ) -> None:
        """``give_back``: takes the connection once it idles between requests."""
        super().__init__(config, server_state, app_state)
        # uvicorn's parser drops, unseen, what follows a request that closes the connection
        # (``Connection: close``, HTTP/1.0): a client still sending past it got a reset
        # once the answer closed the connection. Seen, it is a parse error, answered
        # only after that request's answer (``send_400_response``): which closes the
        # connection, lingering (``_close_after``), and the 400 is never sent.
        self.parser.set_dangerous_leniencies(lenient_data_after_close=False)
        self._guard = guard
        self._give_back = give_back
        self._in_message = False  # from a request's first byte to its body's last
        self._in_head = False  # from a request's first byte to its head's end
        self._head_bytes = 0
        self._head_ended_in_read = False
        self._reading_body = False
        self._deadline_per_read = False
        self._refused = False
        self._deferred_400: str | None = None  # (see send_400_response)
        self._running: RequestResponseCycle | None = None  # the request being answered
        self._lingering = False  # answered and closing, the client still sending
        self._draining = False  # uvicorn shuts down: the answer under way is the last
        self._client_ended = False  # it half-closed, requests read whole still answered

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._guard.deadlines.set(self, self._guard.limits.head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.deadlines.clear(self)
        super().connection_lost(exc)

    def eof_received(self) -> bool:  # type: ignore[override]  # (uvicorn's says None)
        """The client half-closed (``shutdown(SHUT_WR)``, ``nc -N``, some proxies): it
        sends nothing more, and may still read (RFC 9112 9.6; uvicorn issue #1264). The
        requests it sent whole are answered, then the connection closes (the last answer
        says ``connection: close`` unless its head was out already). Closed here at once
        (uvicorn's), a close, a delete or a publish was carried out unanswered, and a
        client retrying an unkeyed publish stored it twice. A request cut short (its head
        or body unfinished) is dropped, nothing of it carried out: the one being answered
        is closed at once, the app reading its body sees its client gone; one behind
        others, read whole, is not served, they are answered. A stream's client is taken
        for gone, as on the lean route (``api.lean_stream``): a stream under way ends
        now, one sent ahead is not served (nor what came after it), the answers before
        it are."""
        refused = self._refused
        if not self._whole_ones_answered():
            return False  # (the request being answered is cut short: closed at once)
        if not self._answering():
            return False  # (nothing whole to answer: closed, as uvicorn closes it)
        running = self._running
        if running is not None and running.response_complete:
            running = None
        if running is not None and is_stream(running):
            return False
        ahead: deque[tuple[RequestResponseCycle, Any]] = deque()
        for entry in reversed(self.pipeline):  # (in the order sent: uvicorn pops the right)
            if is_stream(entry[0]):
                break
            ahead.appendleft(entry)
        self.pipeline = ahead
        last = ahead[0][0] if ahead else running
        if last is None:
            return False
        if not refused:  # (else the 400 after it closes it)
            last.keep_alive = False  # its answer closes the connection (``connection: close``)
        self._client_ended = True  # (it sends nothing more: no lingering after the answer)
        return True

    def _whole_ones_answered(self) -> bool:
        """At the half-close: whether the requests read whole may still be answered. After
        bytes that are no request (``send_400_response``), they are, then the 400, then
        the connection closes (closed at once, they went unanswered); after a request cut
        short, they are, as ``_drop_cut_short`` says."""
        if self._refused:
            if self._deferred_400 is None:
                return False  # (answered its 400 already, or no room for it)
            self._guard.deadlines.clear(self)
            return True
        return not self._in_message or self._drop_cut_short()

    def _drop_cut_short(self) -> bool:
        """At the half-close, a request whose head or body is not whole is dropped, not
        served (nothing of it carried out), and the requests read whole before it are
        still answered: closed at once here, one carried out before it (a publish, a
        close) went unanswered, as the lean route answers it. False where the request
        cut short is the one being answered: nothing before it to answer."""
        cut_short = None if self._in_head else self.cycle  # (a head not whole: no cycle yet)
        if cut_short is not None and cut_short is self._running:
            return False
        if cut_short is not None:
            self.pipeline = deque(entry for entry in self.pipeline if entry[0] is not cut_short)
        self._in_message = self._in_head = self._reading_body = False
        self._guard.deadlines.clear(self)  # (its head's or body's deadline: it never comes)
        return True

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # httptools keeps a head's bytes until it ends, unbounded: count them. A read
        # that starts inside a head (or between requests) and does not end it is all
        # head; a head that begins after another request in the same read is counted
        # from the next read on (at most one read over the limit, never a false 431).
        all_head = self._in_head or not self._in_message
        self._head_ended_in_read = False
        self._feed(data)
        if self._refused:  # (its parser failed: a 400 follows what is being answered)
            return
        if self._in_head and all_head and not self._head_ended_in_read:
            self._head_bytes += len(data)
            if self._head_bytes > self._guard.limits.max_head_bytes:
                too_large = problems.head_too_large(self._guard.limits.max_head_bytes)
                self._refuse(self._with_cors(too_large), "other")

    def _feed(self, data: bytes) -> None:
        """uvicorn's ``data_received`` (pinned in tests/unit/test_private_surfaces_uvicorn.py),
        but for bytes sent past a request that closes the connection (``Connection:
        close``, HTTP/1.0), which its parser, its leniency off, raises for: a client's
        requests sent ahead, which HTTP says are not answered (RFC 9112 9.6), an expected
        event, logged at debug. uvicorn warned of each as an invalid request. They go on
        to ``send_400_response`` as any bytes the parser cannot read (the answer under way
        is the last, lingering; no 400 is sent)."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            msg = "Invalid HTTP request received."
            if str(error) == DATA_AFTER_CLOSE:
                log.debug("bytes sent past a request that closes the connection: not read")
            else:
                self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        if len(self.pipeline) >= MAX_PIPELINED_REQUESTS:
            # uvicorn queues every request sent ahead (a parsed request each, read on
            # after each answer): a client sending thousands ahead filled the memory.
            # Raised from the parser's callback: it stops parsing what this read holds,
            # and uvicorn answers 400 and closes.
            log.warning("a connection sent over %d requests ahead", MAX_PIPELINED_REQUESTS)
            self._refused = True
            self._guard.deadlines.clear(self)
            raise TooManyAhead(f"over {MAX_PIPELINED_REQUESTS} requests sent ahead")
        cycle = self.cycle
        super().on_headers_complete()
        if self.cycle is not cycle and self.cycle is not None:
            self._close_lingering_after(self.cycle)
        self._in_head = False
        self._head_ended_in_read = self._reading_body = True
        content_type = next((v for k, v in self.headers if k == b"content-type"), b"")
        self._deadline_per_read = content_type.split(b";")[0].strip().lower() == NDJSON
        self._guard.deadlines.set(self, self._guard.limits.body_timeout)
        if 0 < len(self.pipeline) <= QUEUED_BEHIND_A_STREAM and self._stream_under_way():
            # uvicorn paused reading to queue this request behind the stream, whose wait
            # for its client's end (``receive``) had resumed it once: its end (a
            # half-close) was never seen, and the stream went on, heartbeats and all, for
            # a client that had ended. Read on (a body queued so is still paused past
            # uvicorn's high-water mark, and so is a client sending more ahead).
            self.flow.resume_reading()

    def _stream_under_way(self) -> bool:
        """An event stream is being answered (it ends only with its topic or its client)."""
        running = self._running
        return running is not None and not running.response_complete and is_stream(running)

    def _close_lingering_after(self, cycle: RequestResponseCycle) -> None:
        """uvicorn's cycle closes the connection once it answered with ``Connection:
        close`` (a 409 or 503 ending a streaming ingest, a 500, a client's own ``close``),
        however much of the body, or of requests sent ahead, is still coming: every
        cycle is given a transport whose ``close()`` decides (``_close_after``)."""
        transport = ClosingDeferred(self.transport, lambda: self._close_after(cycle))
        cycle.transport = cast(asyncio.Transport, transport)

    def _close_after(self, cycle: RequestResponseCycle) -> None:
        """Close after a whole answer (``api.lingering.close_after_answer``): lingering
        while the client may still be sending (this request's body, or a request after
        it: begun, parsed whole and queued behind this one, or sent ahead of a drain's
        last answer), or its bytes wait unread in the socket; else plainly (nothing
        unread: a request ended, its client idle; or half-closed: it sends nothing)."""
        if self._lingering:  # (handed over already: a second close would cut it short)
            return
        if not cycle.response_complete or self.transport.is_closing():
            self.transport.close()  # (an answer broken off is no answer to linger after)
            return
        # (``_refused``: bytes after this request its parser could not read, the rest
        # unread: a request sent ahead past a ``Connection: close``, which httptools
        # takes for bytes after the connection's end; its 400 is never sent)
        ahead = self._in_message or self._draining or bool(self.pipeline) or self._refused
        sending = ahead and not self._client_ended
        # (before the close: a lingering close sets its own deadline)
        self._guard.deadlines.clear(self)
        if close_after_answer(
            self.transport, self.server_state, self._guard.deadlines, client_may_send=sending
        ):
            self._lingering = True
            self.connections.discard(self)
            self._unset_keepalive_if_required()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown; a request answered while its body is still coming
        (a bad line's 400, the rest read and dropped) closes lingering: closed at once
        (uvicorn's), its client still sending got a reset, not the answer."""
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and self._in_message:
            self._close_after(cycle)
            return
        if cycle is not None and not cycle.response_complete:
            # Its answer is the connection's last (uvicorn's shutdown unsets its keep-alive),
            # and a client that sent requests ahead may still be sending them: closed at
            # once after it (a request with no body closed so), it got a reset.
            self._draining = True
            if not isinstance(cycle.transport, ClosingDeferred):
                self._close_lingering_after(cycle)
        super().shutdown()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self._deadline_per_read and not self._answered_mid_body():
            # a streaming ingest: the timeout bounds each pause (once answered, the rest
            # is dropped within one deadline: on_response_complete)
            self._guard.deadlines.set(self, self._guard.limits.body_timeout)

    def _answered_mid_body(self) -> bool:
        """The request whose body is being read was answered (a bad line's 400): the
        rest of its body is read and dropped."""
        return self._reading_body and self.cycle is not None and self.cycle.response_complete

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_message = self._reading_body = False
        self._guard.deadlines.clear(self)
        if self.cycle is not None and self.cycle.response_complete:
            self._await_next_head()  # answered before its body ended (a 413, say)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser cannot read; after the answers of the
        requests read whole before them: sent at once, it closed the connection under
        those answers, and a publish the app stored read as refused, its retry storing
        it twice (desync audit, review)."""
        self._refused = True  # (nothing more is read: the parser is past repair)
        broken = self.cycle
        if broken is not None and broken.more_body:  # the bad bytes broke this request
            if broken is self._running and broken.response_started:
                # Answered already (a bad line's 400, the rest of its body read and
                # dropped), or answering: a 400 now would be a second answer to it (a
                # client reusing the connection took it for its next request's), or
                # bytes in the middle of its answer. Closed, as the lean route closes.
                self._close_refused()
                return
            if broken is self._running:
                self._answer_400(msg, route_class(broken.scope))  # (it is answered so, at once)
                return
            self.pipeline = deque(entry for entry in self.pipeline if entry[0] is not broken)
        if self._answering():
            self._deferred_400 = msg
            return
        self._answer_400(msg, "other")

    def _answer_400(self, msg: str, route: RouteClass) -> None:
        """uvicorn's ``send_400_response``, with the CORS headers the app adds to every
        answer."""
        count_response(route, 400)
        self.transport.write(invalid_request(self.server_state, self._cors_headers(), msg))
        self._close_refused()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def _answering(self) -> bool:
        """Whether a request read whole is not answered yet (running, or pipelined)."""
        running = self._running
        return bool(self.pipeline) or (running is not None and not running.response_complete)

    def _unsupported_upgrade_warning(self) -> None:
        """A request asking to switch protocols (not to a WebSocket): its parser stopped
        at its head, so a body after it was never read as one; kept alive, the
        connection read that body as the next request, past a proxy that framed it
        as a body (desync audit). One that declares a body is answered, then closed."""
        super()._unsupported_upgrade_warning()
        declared = {name for name, _ in self.headers} & {b"content-length", b"transfer-encoding"}
        if self.cycle is not None and declared:  # (bodyless, as curl's h2c: kept alive)
            self.cycle.keep_alive = False

    def on_response_complete(self) -> None:
        if self._lingering:  # (the connection is no longer this protocol's)
            self.server_state.total_requests += 1  # (as uvicorn's own counts it)
            return
        super().on_response_complete()
        if self._answered_mid_body() and not self.transport.is_closing():
            # The whole rest within the body timeout of the answer, not of each read:
            # refreshed at each, a client trickling a byte within each deadline held the
            # connection for ever. Past it, expire closes lingering. Not uvicorn's
            # keep-alive timer, armed by its on_response_complete as if the request had
            # ended: it closed at once (a reset) a client pausing past it (5 s), well
            # within that deadline.
            self._unset_keepalive_if_required()
            self._guard.deadlines.set(self, self._guard.limits.body_timeout)
        if self._deferred_400 is not None:
            if self.transport.is_closing():
                # (the answer closed the connection, ``Connection: close``: nothing goes
                # after it. A client that half-closed past bytes sent after a request
                # asking to close got a 400 after its answer, counted, even never sent)
                self._deferred_400 = None
            elif not self._answering():  # (else a request pipelined is answered first)
                message, self._deferred_400 = self._deferred_400, None
                self._answer_400(message, "other")
            return
        if self.timeout_keep_alive_task is None or self._reading_body:
            return
        if self._idle() and self._give_back is not None:
            self._hand_back(self._give_back)
        else:
            self._await_next_head()  # uvicorn armed its keep-alive: the connection idles

    def _idle(self) -> bool:
        """Between requests: answered, kept alive, nothing of a next request parsed (so
        nothing is lost with this protocol's parser). Called from the ASGI task, never
        while the parser runs."""
        return not (self.transport.is_closing() or self.pipeline or self._in_message)

    def _hand_back(self, give_back: Callable[[asyncio.Transport], None]) -> None:
        """The connection goes back to whoever handed it over, as it was handed over:
        the next request's head decides again (a keep-alive client that closed a topic
        has its next publishes served lean, not by this protocol for good)."""
        self._give_back = None
        self._unset_keepalive_if_required()
        self.connections.discard(self)
        self._guard.deadlines.clear(self)
        give_back(self.transport)

    def _await_next_head(self) -> None:
        if not self.transport.is_closing():
            self._guard.deadlines.set(self, self._guard.limits.head_timeout)

    def expire(self) -> None:
        if self._reading_body and (self.cycle is None or not self.cycle.response_started):
            route = "other" if self.cycle is None else route_class(self.cycle.scope)
            too_slow = problems.body_too_slow(self._guard.limits.body_timeout)
            self._refuse(self._with_cors(too_slow), route)
        elif self.cycle is not None and self.cycle.response_complete and self._in_message:
            # Answered early (a 413), the body's deadline passed while the rest of it is
            # read and dropped: the client may be sending still (closed at once, it got
            # a reset, not the answer).
            self._close_after(self.cycle)
        elif not self.transport.is_closing():
            self.transport.close()

    def _with_cors(self, response: Response) -> Response:
        """``response`` to the request being read, with the CORS headers the app adds to
        every answer."""
        response.raw_headers.extend(self._cors_headers())
        return response

    def _cors_headers(self) -> list[tuple[bytes, bytes]]:
        """For the ``Origin`` among the headers of the request being read, parsed so far
        (a 431's head is cut short). None between requests: ``headers`` are then the
        last request's, and bytes after it are no request of that origin's."""
        headers = self.headers if self._in_message and self.headers else []
        return cors_headers_of_head(self.app_state.get(APP_STATE_KEY), headers)

    def _refuse(self, response: Response, route: RouteClass) -> None:
        """Answer, close; the request the app may be reading sees its client gone."""
        self._refused = True
        self._guard.deadlines.clear(self)
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()  # a response is under way: no room for another
            return
        answer_and_close(self.transport, response, route, self.server_state, self._guard)
        self._closed_lingering()

    def _close_refused(self) -> None:
        """Close after uvicorn's 400 for bytes its parser cannot read (a chunked body's
        broken framing, a bad request after a publish), lingering: its client may still
        be sending, and closed at once it got a reset, not the 400 (``api.lingering``)."""
        self._guard.deadlines.clear(self)
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()  # (written into a response: no answer to linger after)
            return
        if self._client_ended:  # (it half-closed: it sends nothing more to linger for)
            self._closed_lingering()
            self.transport.close()
            return
        close_lingering(self.transport, self.server_state, self._guard.deadlines)
        self._closed_lingering()

    def _closed_lingering(self) -> None:
        """The connection is no longer this protocol's: the app's request sees it gone."""
        self.connections.discard(self)
        self._unset_keepalive_if_required()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # what the app still sends is dropped
            cycle.message_event.set()
        if self.flow is not None:
            self.flow.resume_writing()  # (a send waiting for the socket to drain: dropped)
