"""The HTTP connections uvicorn accepts, with event streams served lean.

uvicorn's HTTP protocol keeps, for each connection, a request parser, a
request/response cycle with its events, flow-control events and an ASGI task
whose coroutine frames live as long as the response: about 10 KB for a
connection that only holds an idle event stream, and a broker holds tens of
thousands of those.

So ``BrokerHttpProtocol`` (given to uvicorn as its ``http`` protocol) reads
each connection's first request itself. A plain publish is served on the
connection (``api.lean_publish``; the connection's side in ``api.publish_serving``),
and so is a plain streaming ingest (``api.lean_ingest``; ``api.ingest_serving``),
and the request after either is decided the same way. A plain stream request (a
valid GET of ``/topics/{t}/events`` or ``/events``, HTTP/1.1, no body) is subscribed
(``api.stream_opening``), then the socket becomes a ``StreamConnection``
(``api.lean_stream``): the socket, the subscription and a few fields, and no task
while idle, since the live reader writes shared frames straight to the socket.
Anything else, every invalid stream request included (errors are answered in one
place), is handed, bytes and all, to uvicorn's own protocol, the way uvicorn hands
a connection to its WebSocket protocol.

Every connection is also held to the limits of ``api.guard``: its first head
must arrive in time and fit in ``BROKER_MAX_HEAD_BYTES`` (else 431), and a
connection past ``BROKER_MAX_CONNECTIONS`` is told to come back (a stream) or
answered 503 (a publish): ``api.guard.refusal_of``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import httptools
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope
from uvicorn.config import Config
from uvicorn.server import ServerState

from api import problems, routes
from api.cors import with_cors, with_cors_of_head
from api.guard import (
    APP_STATE_KEY,
    Admission,
    GuardedHttpToolsProtocol,
    guard_of,
    refusal_of,
)
from api.heads import HEAD_END, RequestHead
from api.hosts import host_of
from api.ingest_serving import IngestServing
from api.lean_ingest import IngestExchange, IngestHead, ingest_head_of
from api.lean_publish import PublishExchange, PublishHead, publish_head_of
from api.lean_stream import cap_send_buffer, stream_request_of
from api.lingering import close_after_answer, close_lingering
from api.metrics import RouteClass
from api.proxy_headers import forwarded_scheme, trusts_proxy
from api.publish_serving import PublishServing
from api.raw_answers import answer_and_close
from api.stream_opening import StreamOpening
from broker import StartFrom

log = logging.getLogger(__name__)

DRAIN_HEAD_WAIT_SECONDS = 1.0
"""How long a connection accepted just before a shutdown may take to send its request
(then it is answered as a draining instance answers it) before it is closed."""
PIPELINED_BYTES = 65536
"""What a connection may send ahead while its publish is under way before it is no
longer read (the bound uvicorn's own flow control uses); it is read again only once
what it sent ahead is back within this. And while its answers wait unread past the
transport's high-water mark, its next request waits."""


class BrokerHttpProtocol(PublishServing, IngestServing, StreamOpening, asyncio.Protocol):
    """A connection: each request's head decides who serves it.

    States: reading a head (``_publish`` and ``_ingest`` None); reading a publish's
    body (``_publish`` set); publishing (``_publishing``: pipelined requests wait in
    ``_received``, and past ``PIPELINED_BYTES`` in the socket); a streaming ingest
    (``_ingest``, its states in ``IngestExchange``). After a lean publish or ingest
    the next head decides again; so it does after a request handed to uvicorn, once
    uvicorn's protocol answered it and the connection idles; a stream gives the socket
    away for good.

    Here: reading a head and deciding who serves it, the next request, the shutdown,
    and answering or handing over to uvicorn. Serving a publish, an ingest, and opening
    a stream are its mixins' (``PublishServing``, ``IngestServing``, ``StreamOpening``).
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._config = config
        self._server_state = server_state
        self._app_state = app_state
        self._transport: asyncio.Transport | None = None
        self._received = bytearray()  # from the current request's first byte on
        self._head = RequestHead()
        self._parser = httptools.HttpRequestParser(self._head)
        self._opening: asyncio.Task[None] | None = None
        self._opening_scope: Scope = {}  # the stream request being opened
        self._lost = False
        app = app_state.get(APP_STATE_KEY)
        self._guard = guard_of(server_state, app.state.settings if app is not None else None)
        self._admission = Admission.SERVE
        self._publish: PublishHead | None = None
        self._body_start = 0
        self._publishing: PublishExchange | None = None
        self._ingest: IngestExchange | None = None
        self._closing = False  # uvicorn shuts down: the publish under way is the last
        self._idle_since: float | None = None  # the previous response's end
        self._writes_paused = False  # the client does not read its answers fast enough
        self._next_deferred = False  # the next request waits for the answers to drain
        self._checks_host = False  # (api.hosts: loopback and authorization off, or a list)
        self._own_scheme = "http"  # the socket's ("https" under uvicorn's TLS)
        self._proxy_trusted = False  # the peer's X-Forwarded-Proto is believed
        self._client_ended = False  # it half-closed with a publish read whole (eof_received)

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._server_state.connections.add(self)  # type: ignore[arg-type]
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._admission = self._guard.admit(len(self._server_state.connections))
        if self._admission is Admission.DROP:
            self._transport.abort()  # no descriptor to spare, not even to answer
            return
        cap_send_buffer(self._transport)
        self._own_scheme = "https" if self._transport.get_extra_info("sslcontext") else "http"
        self._proxy_trusted = trusts_proxy(self._transport, self._config)
        self._guard.deadlines.set(self, self._guard.limits.head_timeout)
        app = self._app_state.get(APP_STATE_KEY)
        if app is not None:
            self._checks_host = app.state.hosts.checks(self._transport.get_extra_info("sockname"))

    def expire(self) -> None:
        """A deadline of ``api.guard`` passed: a stalled body is answered 408; the rest
        of an ingest's body answered early (a bad line's 400), read and dropped, closes
        lingering; a head that did not arrive in time (or an idle keep-alive) closes,
        unanswered; one begun when a drain's wait for it passed closes lingering,
        unanswered."""
        if self._publish is not None and self._publishing is None:
            too_slow = problems.body_too_slow(self._guard.limits.body_timeout)
            self._answer(with_cors(too_slow, self._publish.scope), "publish")
        elif self._ingest is not None and self._ingest.answered and not self._ingest.body_ended:
            # Its client may be sending still, after a pause: closed at once, it got a
            # reset, not the answer (as uvicorn's protocol closes it: api.guard's expire).
            self._close_after_ingest(self._ingest)
        elif self._head_begun_in_drain():
            # Its client is writing it: closed at once, its next bytes reset the connection,
            # and an answer given before on it, not read yet, could be lost with it (as
            # uvicorn's protocol closes such a connection: api.guard's shutdown).
            assert self._transport is not None
            self._server_state.connections.discard(self)
            close_lingering(self._transport, self._server_state, self._guard.deadlines)
        elif self._transport is not None:
            self._transport.close()

    def _head_begun_in_drain(self) -> bool:
        """Shutting down, reading a head of which some bytes came (``shutdown`` awaits it)."""
        reading_a_head = self._publish is None and self._ingest is None and self._opening is None
        return self._closing and reading_a_head and bool(self._received) and not self._lost

    def data_received(self, data: bytes) -> None:
        if self._next_deferred:  # (read before the pause took effect)
            self._received += data
            return
        if self._ingest is not None:
            self._ingest_data(self._ingest, data)
        elif self._publishing is not None:  # pipelined requests wait for this answer
            self._received += data
            assert self._transport is not None  # data came
            if len(self._received) > PIPELINED_BYTES and self._transport.is_reading():
                self._transport.pause_reading()
        elif self._publish is not None:
            self._received += data
            self._read_body()
        else:
            self._read_head(data)

    def _read_head(self, data: bytes) -> None:
        fed = len(self._received)
        self._received += data
        self._parse_head(fed)

    def _parse_head(self, fed: int) -> None:
        """Feed the parser what it has not seen (from ``fed``) of ``_received`` up to the
        head's end (the body, or the next request, is read here, not by the parser),
        so that what is not HTTP is answered at once."""
        end = self._received.find(HEAD_END, max(0, fed - 3))
        head_size = len(self._received) if end < 0 else end + len(HEAD_END)
        try:
            self._parser.feed_data(self._received[fed:head_size])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._hand_to_uvicorn()
            return
        if head_size > self._guard.limits.max_head_bytes:
            self._answer(self._head_too_large(), "other")
        elif self._head.headers_done and end >= 0:
            self._guard.deadlines.clear(self)
            self._serve(head_size)
        elif end >= 0 or self._head.headers_done:  # not a head httptools and we agree on
            self._hand_to_uvicorn()
        elif self._idle_since is not None:  # a head on a kept-alive connection, begun
            waited = asyncio.get_running_loop().time() - self._idle_since
            self._guard.deadlines.set(self, self._guard.limits.head_timeout - waited)
            self._idle_since = None

    def _head_too_large(self) -> Response:
        """431, with CORS for the ``Origin`` among the headers parsed so far: a page
        sees an answer without them as a network error, and cannot tell why. (What
        was parsed is bounded: the limit, plus at most the read that went past it.)"""
        answer = problems.head_too_large(self._guard.limits.max_head_bytes)
        return with_cors_of_head(answer, self._app_state.get(APP_STATE_KEY), self._head.headers)

    def _serve(self, head_size: int) -> None:
        """The head is whole: serve it here, refuse, or hand over to uvicorn."""
        app = self._app_state.get(APP_STATE_KEY)
        if self._admission is Admission.REFUSE:
            refusal = refusal_of(self._head, self._parser, self._guard.limits, app)
            if refusal is not None:
                self._answer(*refusal)
                return
        if app is None or self._config.root_path or app.state.streams.draining:
            self._hand_to_uvicorn()  # uvicorn answers those
            return
        if self._checks_host and app.state.hosts.refuses_host(host_of(self._head.headers)):
            self._hand_to_uvicorn()  # the app refuses it, or answers a probe
            return
        try:
            publish, ingest, stream = self._lean_request_of(app, head_size)
        except Exception:  # a bug here must not cost the request: uvicorn answers it
            log.exception("could not read a request head")
            publish, ingest, stream = None, None, None
        if ingest is not None:
            self._ingest = IngestExchange(self, ingest, self._server_state)
            assert self._transport is not None
            self._ingest.start(self._transport, head_size)
        elif publish is not None:
            self._publish, self._body_start = publish, head_size
            if not self._read_body():  # the body's deadline runs from its head's end
                self._guard.deadlines.set(self, self._guard.limits.body_timeout)
        elif stream is not None:
            self._open_stream(*stream)
        else:
            self._hand_to_uvicorn()

    def _lean_request_of(
        self, app: Any, head_size: int
    ) -> tuple[PublishHead | None, IngestHead | None, tuple[Request, dict[str, StartFrom]] | None]:
        """The request served here, as a publish, a streaming ingest or a stream."""
        scheme = self.scheme_of(self._head.headers)
        publish = publish_head_of(self._head, self._parser, app, scheme)
        if publish is not None or self._client_ended:
            # (sent ahead of a half-close, behind a publish: a publish is served here, its
            # body whole or closed (_await_next_request); anything else by uvicorn's
            # protocol, told of the end: an ingest cut short is closed, not awaited for
            # its deadline; a stream's client is gone)
            return publish, None, None
        ingest = ingest_head_of(self._head, self._parser, app, scheme)
        if ingest is not None or head_size != len(self._received):
            return None, ingest, None
        return None, None, stream_request_of(self._head, self._parser, app, scheme)

    def scheme_of(self, headers: list[tuple[bytes, bytes]]) -> str:
        """A request's scheme as uvicorn's ProxyHeadersMiddleware gives it to the app: a
        trusted proxy's ``X-Forwarded-Proto``, else the socket's. The cookie forgery
        check compares a page's origin with it (a lean request said "http" behind any
        proxy, and took an http page for the broker's own behind one ending TLS)."""
        if not self._proxy_trusted:
            return self._own_scheme
        return forwarded_scheme(headers) or self._own_scheme

    def eof_received(self) -> bool:
        """The client half-closed (``shutdown(SHUT_WR)``, ``nc -N``): it sends nothing
        more, and may still read. A publish read whole is answered, then the connection
        closes, after the requests sent whole behind it (one cut short is dropped):
        closed at once, the publish was stored unanswered, and a client retrying it
        unkeyed stored it twice. Anything else closes at once: a request cut short
        (nothing carried out), an idle connection. (A stream being opened and an ingest
        are not read meanwhile: the end is seen once the stream is open, which ends it,
        its client taken for gone; or once the ingest is answered. A request handed to
        uvicorn's protocol has its end seen there: ``api.guard``.)"""
        if self._publishing is None or self._lost:
            return False
        self._client_ended = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._server_state.connections.discard(self)
        self._guard.deadlines.clear(self)
        if self._ingest is not None:
            self._ingest.lost()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: a publish under way is answered, then the
        connection closes; a stream being opened is told to come back (closed
        unanswered, a load balancer answers the browser 502, and its EventSource
        gives up for good); a request still arriving is awaited and answered (its head
        not whole within the wait, the connection closes lingering, unanswered); an
        ingest answered while its body is still coming closes now, lingering; an
        idle kept-alive connection closes now: lingering if requests its client sent
        ahead wait unread (held back while it does not read its answers), else plainly."""
        if self._publish is not None or (self._ingest is not None and not self._ingest.answered):
            self._closing = True  # (an ingest goes on to its body's end, as uvicorn's would)
        elif self._ingest is not None and not self._ingest.body_ended:
            # (a bad line's 400, the rest of its body read and dropped: closed a second
            # later, a producer still sending got a reset, not the 400)
            self._close_after_ingest(self._ingest)
        elif self._opening is not None and not self._opening.done():
            self._opening.cancel()  # (a subscription it opened closes itself as it unwinds)
            scope = self._opening_scope
            retry_ms = scope["app"].state.settings.retry_ms
            why = "this instance is shutting down"
            self._answer(routes.come_back_later(retry_ms, why, scope), "stream")
        elif self._idle_since is None and self._transport is not None and not self._lost:
            # Accepted, its head not (all) read yet: a request is likely on its way (a
            # load balancer connects, then sends). Closed unanswered, the balancer would
            # answer 502, and a browser's EventSource gives up for good on that. So the
            # head is awaited, briefly, and answered as a draining instance answers:
            # a stream is told to come back; then the connection closes.
            self._closing = True
            self._guard.deadlines.set(self, DRAIN_HEAD_WAIT_SECONDS)
        elif self._transport is not None:
            # Idle, but its client may have sent requests ahead, held back (it does not
            # read its answers: ``_next_deferred``), here or in the socket: closed plainly
            # with them unread, the kernel reset the connection, and the answers written
            # but not yet sent or read were lost with it (a retry stored them twice).
            self._guard.deadlines.clear(self)  # (a lingering close sets its own)
            if close_after_answer(
                self._transport,
                self._server_state,
                self._guard.deadlines,
                client_may_send=bool(self._received),
            ):
                self._server_state.connections.discard(self)

    # -- the next request ------------------------------------------------------

    def _await_next_request(self) -> None:
        """A request was answered and its body read whole: the next head decides again
        (``_received`` holds what came after the body: a pipelined request)."""
        assert self._transport is not None
        self._head = RequestHead()
        self._parser = httptools.HttpRequestParser(self._head)
        self._idle_since = asyncio.get_running_loop().time()
        limits = self._guard.limits
        self._guard.deadlines.set(self, min(limits.head_timeout, self._config.timeout_keep_alive))
        if self._writes_paused:
            # The client does not read its answers: no more requests until it does
            # (their answers would pile up here); past the deadline it is closed.
            self._next_deferred = True
            if self._transport.is_reading():
                self._transport.pause_reading()
            return
        # Read on once what was sent ahead is within bounds (else each answer let one
        # more read in, and the buffer grew without end) ...
        if not self._transport.is_reading() and len(self._received) <= PIPELINED_BYTES:
            self._transport.resume_reading()
        if self._received:  # a pipelined request, parsed where it lies (no copy of the rest)
            self._parse_head(0)
        # ... or when the request now read needs more than is here (a head, or a body
        # over the bound: it would wait for its deadline).
        if not self._transport.is_reading() and self._needs_more_bytes():
            self._transport.resume_reading()
        if self._client_ended and self._needs_more_bytes():
            self._transport.close()  # (half-closed: no more of it comes)

    def _needs_more_bytes(self) -> bool:
        """Reading a head or a publish's body: nothing in flight, no one else's socket."""
        transport = self._transport
        return not (
            self._lost
            or transport is None
            or transport.is_closing()
            or transport.get_protocol() is not self  # uvicorn's, or a stream's, now
            or self._publishing is not None
            or self._ingest is not None
            or self._opening is not None
            or self._next_deferred
        )

    def pause_writing(self) -> None:
        """The answers written wait in the transport past its high-water mark."""
        self._writes_paused = True

    def resume_writing(self) -> None:
        self._writes_paused = False
        if self._next_deferred and not self._lost:
            self._next_deferred = False
            self._await_next_request()

    # -- answering, or handing over --------------------------------------------

    def _answer(self, response: Response, route: RouteClass) -> None:
        """A whole response (the app's own object), then the connection closes."""
        self._guard.deadlines.clear(self)
        self._server_state.connections.discard(self)
        if self._lost:
            return
        assert self._transport is not None
        answer_and_close(self._transport, response, route, self._server_state, self._guard)

    def _hand_to_uvicorn(self) -> None:
        """uvicorn's protocol takes the connection, with every byte received so far."""
        assert self._transport is not None
        self._server_state.connections.discard(self)
        self._guard.deadlines.clear(self)
        if self._lost:
            return
        protocol = GuardedHttpToolsProtocol(
            self._config, self._server_state, self._app_state, self._guard, self._taken_back
        )
        protocol.connection_made(self._transport)
        self._transport.set_protocol(protocol)
        if not self._transport.is_reading():  # (before uvicorn may pause it itself)
            self._transport.resume_reading()
        received = bytes(self._received)
        self._received.clear()
        protocol.data_received(received)
        if self._client_ended and self._transport.get_protocol() is protocol:
            # (it half-closed while a publish was under way: uvicorn's protocol is told)
            if not self._transport.is_closing() and not protocol.eof_received():
                self._transport.close()
        # Shutting down: this request is the connection's last. (Unless uvicorn's protocol
        # answered already and gave the connection up, closing lingering: a 400 for bytes
        # that are no request. Told of the shutdown, it closed it at once under that.)
        if self._closing and self._transport.get_protocol() is protocol:
            protocol.shutdown()

    def _taken_back(self, transport: asyncio.Transport) -> None:
        """uvicorn's protocol answered what it was handed and the connection idles:
        the next request's head is read here again. (Never after a shutdown: uvicorn's
        protocol, told of it, closes the connection after its answer.)"""
        self._publish, self._publishing, self._ingest = None, None, None
        self._server_state.connections.add(self)  # type: ignore[arg-type]
        transport.set_protocol(self)
        # uvicorn's answer may have left the transport past its high-water mark: it
        # told uvicorn's protocol, and will tell this one only when it drains.
        self._writes_paused = (
            transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]
        )
        self._await_next_request()
