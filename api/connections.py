"""The HTTP connections uvicorn accepts, with event streams served lean.

uvicorn's HTTP protocol keeps, for each connection, a request parser, a
request/response cycle with its events, flow-control events and an ASGI task
whose coroutine frames live as long as the response: about 10 KB for a
connection that only holds an idle event stream, and a broker holds tens of
thousands of those.

So ``BrokerHttpProtocol`` (given to uvicorn as its ``http`` protocol) reads
each connection's first request itself. A plain stream request (a valid GET of
``/topics/{t}/events`` or ``/events``, HTTP/1.1, no body) becomes a
``StreamConnection``: the socket, the subscription and a few fields, and no
task while idle, since the live reader writes shared frames straight to the
socket. Anything else, every invalid stream request included (errors are
answered in one place), is handed, bytes and all, to uvicorn's own protocol,
the way uvicorn hands a connection to its WebSocket protocol.

Every connection is also held to the limits of ``api.guard``: its first head
must arrive in time and fit in ``BROKER_MAX_HEAD_BYTES`` (else 431), and a
connection past ``BROKER_MAX_CONNECTIONS`` is told to come back (a stream) or
answered 503 (a publish).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast
from urllib.parse import unquote

import httptools
from starlette.requests import Request
from starlette.responses import Response
from uvicorn.config import Config
from uvicorn.server import ServerState

from api import problems, routes
from api.cors import cors_headers
from api.guard import (
    Admission,
    ClientLimits,
    GuardedHttpToolsProtocol,
    answer_and_close,
    guard_of,
    response_head,
)
from api.metrics import SUBSCRIBERS
from api.problems import HttpProblem, problem_for
from api.sse import STREAM_HEADERS, OpenStreams
from broker import (
    BrokerError,
    StartFrom,
    StoreUnavailable,
    StreamOver,
    SubscriberTooSlow,
    Subscription,
)
from broker.framing import retry_hint

log = logging.getLogger(__name__)
access_log = logging.getLogger("uvicorn.access")

APP_STATE_KEY = "broker.app"
"""Where the app's lifespan leaves itself in uvicorn's app state, for this module."""
END_OF_BODY = b"0\r\n\r\n"
CLOSE = (b"connection", b"close")
BODY_HEADERS = (b"content-length", b"transfer-encoding")


class BrokerHttpProtocol(asyncio.Protocol):
    """A new connection: its first request decides who serves it."""

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
        self._received = b""
        self._head = _Head()
        self._parser = httptools.HttpRequestParser(self._head)
        self._opening: asyncio.Task[None] | None = None
        self._lost = False
        app = app_state.get(APP_STATE_KEY)
        self._guard = guard_of(server_state, app.state.settings if app is not None else None)
        self._admission = Admission.SERVE

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._server_state.connections.add(self)  # type: ignore[arg-type]
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._admission = self._guard.admit(len(self._server_state.connections))
        if self._admission is Admission.DROP:
            self._transport.abort()  # no descriptor to spare, not even to answer
            return
        self._guard.deadlines.set(self, self._guard.limits.head_timeout)

    def expire(self) -> None:
        """The head did not arrive in time (``api.guard``): close, unanswered."""
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._received += data
        try:  # parsed as it comes, so that what is not HTTP is answered at once
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._hand_to_uvicorn()
            return
        head_size = self._head_size()
        if head_size > self._guard.limits.max_head_bytes:
            self._answer(problems.head_too_large(self._guard.limits.max_head_bytes))
        elif self._head.headers_done:
            self._guard.deadlines.clear(self)
            self._serve(head_size)

    def _head_size(self) -> int:
        """The head's bytes: all received until it ends, then up to its blank line."""
        end = self._received.find(b"\r\n\r\n") if self._head.headers_done else -1
        return end + 4 if end >= 0 else len(self._received)

    def _serve(self, head_size: int) -> None:
        """The head is whole: serve the stream here, refuse, or hand over to uvicorn."""
        if self._admission is Admission.REFUSE:
            refusal = _refusal_of(self._head, self._parser, self._guard.limits)
            if refusal is not None:
                self._answer(refusal)
                return
        app = self._app_state.get(APP_STATE_KEY)
        request = None
        if app is not None and not self._config.root_path and head_size == len(self._received):
            try:
                request = _stream_request_of(self._head, self._parser, app)
            except Exception:  # a bug here must not cost the request: uvicorn answers it
                log.exception("could not read a request head")
        if request is None or request[0].app.state.streams.draining:  # uvicorn answers those
            self._hand_to_uvicorn()
            return
        # Nothing more is read until it is known who serves the connection: what
        # comes meanwhile stays in the socket, for uvicorn should the stream not open.
        assert self._transport is not None  # data comes after connection_made
        self._transport.pause_reading()
        self._opening = asyncio.get_running_loop().create_task(self._open(*request))

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._server_state.connections.discard(self)
        self._guard.deadlines.clear(self)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: no response is under way, so close."""
        if self._transport is not None:
            self._transport.close()

    # -- serving ---------------------------------------------------------------

    async def _open(self, request: Request, starts: dict[str, StartFrom]) -> None:
        """Subscribe, then hand the socket to a StreamConnection (or, failing, to uvicorn)."""
        app = request.app
        retry_ms = app.state.settings.retry_ms
        assert self._transport is not None
        stream = StreamConnection(self._transport, app.state.streams, self._server_state)
        try:
            subscription = await routes.subscribe(request, starts, stream)
        except StoreUnavailable:
            # Answered here: through uvicorn it would wait for the store a second time.
            self._answer(routes.come_back_later(retry_ms, "store unavailable", request.scope))
            return
        except StreamOver as over:
            self._answer(problem_for(over))  # 204: the EventSource stops reconnecting
            return
        except Exception:
            log.exception("unexpected error opening a stream")
            self._hand_to_uvicorn()  # it tries again, and answers 500 if that fails too
            return
        if self._lost or app.state.streams.draining or subscription.closed:
            subscription.close()
            self._answer(
                routes.come_back_later(retry_ms, "this instance is shutting down", request.scope)
            )
            return
        self._server_state.connections.discard(self)
        self._transport.set_protocol(stream)
        self._server_state.total_requests += 1
        _log_access(self._transport, request)
        stream.start(subscription, self._response_head(retry_ms, cors_headers(request.scope)))
        self._transport.resume_reading()  # to see the client go

    def _response_head(self, retry_ms: int, extra: list[tuple[bytes, bytes]]) -> bytes:
        # The connection ends with the stream (a StreamConnection serves no other
        # request): said up front, so that a client whose stream ended (broker.end,
        # a drain) does not send its next request down a socket that is closing.
        headers = [*STREAM_HEADERS, *extra, (b"transfer-encoding", b"chunked"), CLOSE]
        return response_head(200, headers, self._server_state) + chunk_of(retry_hint(retry_ms))

    def _answer(self, response: Response) -> None:
        """A whole response (the app's own object), then the connection closes."""
        self._guard.deadlines.clear(self)
        self._server_state.connections.discard(self)
        if self._lost:
            return
        assert self._transport is not None
        answer_and_close(self._transport, response, self._server_state, self._guard)

    def _hand_to_uvicorn(self) -> None:
        """uvicorn's protocol takes the connection, with every byte received so far."""
        assert self._transport is not None
        self._server_state.connections.discard(self)
        self._guard.deadlines.clear(self)
        if self._lost:
            return
        protocol = GuardedHttpToolsProtocol(
            self._config, self._server_state, self._app_state, self._guard
        )
        protocol.connection_made(self._transport)
        self._transport.set_protocol(protocol)
        if not self._transport.is_reading():  # (before uvicorn may pause it itself)
            self._transport.resume_reading()
        received, self._received = self._received, b""
        protocol.data_received(received)


class StreamConnection(asyncio.Protocol):
    """One open event stream: the socket and its subscription, nothing else while idle.

    It is its subscription's ``StreamSink``: live events arrive through ``write``
    (the hub's call, no task switch); a short-lived pump task runs only while
    there is catching up or a backlog to write (``chunks(until_idle=True)``),
    started by ``wanted``.
    """

    __slots__ = (
        "_ended",
        "_paused",
        "_pump",
        "_server_state",
        "_streams",
        "_subscription",
        "_transport",
        "_writable",
    )

    def __init__(
        self, transport: asyncio.Transport, streams: OpenStreams, server_state: ServerState
    ) -> None:
        self._transport = transport
        self._subscription: Subscription | None = None  # until start
        self._streams = streams
        self._server_state = server_state
        self._paused = False
        self._writable: asyncio.Future[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._ended = False

    def start(self, subscription: Subscription, head: bytes) -> None:
        """Serve the subscription (opened with this as its sink) on the socket."""
        self._subscription = subscription
        self._server_state.connections.add(self)  # type: ignore[arg-type]
        self._streams.add(self)
        SUBSCRIBERS.inc()
        self._transport.write(head)
        self.wanted()  # the catch-up

    def close(self) -> None:
        """End the stream cleanly (the instance drains); the client reconnects.

        A client that stopped reading could not take the end in time: it is cut.
        """
        if self._end():
            return
        if self._paused:
            self._transport.abort()
        else:
            self._transport.write(END_OF_BODY)
            self._transport.close()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown."""
        self.close()

    # -- asyncio.Protocol ------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Nothing more is expected from a stream's client; whatever comes is ignored."""

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()
        self._server_state.connections.discard(self)
        self._streams.discard(self)
        SUBSCRIBERS.dec()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # -- StreamSink ------------------------------------------------------------

    def write(self, chunk: bytes) -> bool:
        if self._paused:
            return False  # the subscription queues it for the pump, bounded
        self._transport.write(SHARED_CHUNKS.of(chunk))
        return True

    def unsent_bytes(self) -> int:
        return self._transport.get_write_buffer_size()

    def wanted(self) -> None:
        if self._pump is None and not self._ended and self._subscription is not None:
            self._pump = asyncio.get_running_loop().create_task(self._run_pump(self._subscription))

    def dropped(self) -> None:
        """The client stopped reading and its buffer overflowed: no clean end can be
        written to a full socket, so cut the connection; the client resumes by id."""
        log.info("dropped a subscriber that stopped reading")
        self._transport.abort()

    def ended(self) -> None:
        """The subscription ended on its own (its token expired): end the response."""
        if self._subscription is not None:  # (before start, _open sees it closed)
            self.close()

    # -- writing ---------------------------------------------------------------

    async def _run_pump(self, subscription: Subscription) -> None:
        try:
            async for chunk in subscription.chunks(until_idle=True):
                self._transport.write(chunk_of(chunk))
                if self._paused:
                    self._writable = asyncio.get_running_loop().create_future()
                    await self._writable
        except SubscriberTooSlow:
            if not self._transport.is_closing():  # (else dropped() did it)
                log.info("dropped a subscriber that could not keep up")
                self._transport.abort()
        except asyncio.CancelledError:
            # Ours (the stream ended) or not: a stream without its pump would stall
            # for good, where a cut one reconnects and resumes.
            if not self._ended:
                self._transport.abort()
            raise
        except Exception:
            log.exception("unexpected error writing a stream; closing it")
            self._transport.abort()
        finally:
            self._pump = None

    def _end(self) -> bool:
        """Free the subscription and stop the pump; True if that was done already."""
        if self._ended:
            return True
        self._ended = True
        if self._subscription is not None:
            self._subscription.close()
        if self._pump is not None:
            self._pump.cancel()
        return False


def chunk_of(data: bytes) -> bytes:
    """One chunk of a chunked HTTP/1.1 body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class _LastChunk:
    """``chunk_of`` that keeps its last answer: the hub hands the same frames object
    to every subscriber of a topic in a row, so a broadcast frames its chunk once,
    not once per socket."""

    __slots__ = ("_chunk", "_data")

    def __init__(self) -> None:
        self._data = b""
        self._chunk = chunk_of(b"")

    def of(self, data: bytes) -> bytes:
        if data is not self._data:
            self._data, self._chunk = data, chunk_of(data)
        return self._chunk


SHARED_CHUNKS = _LastChunk()


def stream_request(data: bytes, app: Any) -> tuple[Request, dict[str, StartFrom]] | None:
    """The request and where its topics start, if ``data`` is a stream request we serve:
    a complete, valid HTTP/1.1 GET with no body. Else None."""
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    return _stream_request_of(head, parser, app)


def _stream_request_of(
    head: _Head, parser: httptools.HttpRequestParser, app: Any
) -> tuple[Request, dict[str, StartFrom]] | None:
    """``stream_request`` of a head already parsed."""
    scope = _scope_of(head, parser)
    if scope is None:
        return None
    topic = routes.stream_topic(scope)
    if topic is None:
        return None
    scope["app"] = app
    request = Request(scope)
    try:
        return request, routes.stream_starts(request, topic or None)
    except (BrokerError, HttpProblem):  # (401 and 403 too) the app answers it
        return None


class _Head:
    """httptools' callbacks for one request head."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_message_complete(self) -> None:
        self.complete = True


def _scope_of(head: _Head, parser: httptools.HttpRequestParser) -> dict[str, Any] | None:
    try:
        url = httptools.parse_url(head.url)
        path = unquote(url.path.decode("ascii"))
    except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
        return None
    plain = parser.get_method() == b"GET" and parser.get_http_version() == "1.1"
    bodyless = all(name not in BODY_HEADERS for name, _ in head.headers)
    if not (head.complete and plain and bodyless):
        return None
    return {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": url.path,
        "query_string": url.query or b"",
        "root_path": "",
        "headers": head.headers,
    }


def _refusal_of(
    head: _Head, parser: httptools.HttpRequestParser, limits: ClientLimits
) -> Response | None:
    """The answer past the connection limit: a stream is told to come back, a publish
    gets 503; None for anything else (health checks, metrics), which is served."""
    try:
        path = unquote(httptools.parse_url(head.url).path.decode("ascii"))
    except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
        return None
    method = parser.get_method().decode("ascii", "replace")
    scope = {"type": "http", "method": method, "path": path, "headers": head.headers}
    if routes.stream_topic(scope) is not None:
        return routes.come_back_later(limits.retry_ms, "too many connections")
    if method == "POST" and routes.TOPIC_EVENTS_PATH.fullmatch(path):
        return problems.too_many_connections(limits.retry_after)
    return None


def _log_access(transport: asyncio.Transport, request: Request) -> None:
    if not access_log.hasHandlers():
        return
    peer = transport.get_extra_info("peername")
    client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "-"
    target = request.scope["raw_path"].decode("latin-1")
    if request.scope["query_string"]:
        target += "?" + request.scope["query_string"].decode("latin-1")
    access_log.info('%s - "%s %s HTTP/%s" %d', client, "GET", target, "1.1", 200)
