"""Event streams served on the connection, without uvicorn's request cycle.

uvicorn's HTTP protocol keeps, for each connection, a request parser, a
request/response cycle with its events, flow-control events and an ASGI task
whose coroutine frames live as long as the response: about 10 KB for a
connection that only holds an idle event stream, and a broker holds tens of
thousands of those.

So ``api.connections`` serves a plain stream request itself (a valid GET of
``/topics/{t}/events`` or ``/events``, HTTP/1.1, no body): this module decides
which requests those are (``stream_request``), and a ``StreamConnection``
serves one once subscribed: the socket, the subscription and a few fields, and
no task while idle, since the live reader writes shared frames straight to the
socket. Every invalid stream request is the app's to answer (errors are
answered in one place), so it is not one of these.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any
from urllib.parse import unquote

import httptools
from starlette.requests import Request
from uvicorn.server import ServerState

from api import routes
from api.heads import RequestHead, parse_head, scope_of
from api.metrics import SUBSCRIBERS
from api.problems import HttpProblem
from api.sse import DROPS, OpenStreams
from broker import BrokerError, StartFrom, SubscriberTooSlow, Subscription

log = logging.getLogger(__name__)

END_OF_BODY = b"0\r\n\r\n"
BODY_HEADERS = (b"content-length", b"transfer-encoding")
SEND_BUFFER_BYTES = 262_144
"""The kernel's send buffer of each connection (it doubles the figure for its own
bookkeeping). Left to grow, it held up to 4 MB for each client that stopped reading,
outside ``BROKER_SUBSCRIBER_BUFFER_BYTES``, which counts only what waits in the
process (310 such streams held 0.6 GB of the host's memory); now what a client does
not read waits in the process, where that limit counts it."""


def cap_send_buffer(transport: asyncio.BaseTransport) -> None:
    """Bound what the kernel holds for this connection (``SEND_BUFFER_BYTES``)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


class StreamConnection(asyncio.Protocol):
    """One open event stream: the socket and its subscription, nothing else while idle.

    It is its subscription's ``StreamSink``: live events arrive through ``write``
    (the hub's call, no task switch); a short-lived pump task runs only while
    there is catching up or a backlog to write (``chunks(until_idle=True)``),
    started by ``wanted``.
    """

    __slots__ = (
        "_chunked",
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
        self,
        transport: asyncio.Transport,
        streams: OpenStreams,
        server_state: ServerState,
        *,
        chunked: bool = True,
    ) -> None:
        """``chunked``: the body in chunks (HTTP/1.1), else as it is, ended by closing
        the connection (an HTTP/1.0 client)."""
        self._transport = transport
        self._chunked = chunked
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
            if self._chunked:
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
        if not self._chunked:
            self._transport.write(chunk)
            return True
        shared = SHARED_CHUNKS
        self._transport.write(shared.chunk if chunk is shared.data else shared.of(chunk))
        return True

    def unsent_bytes(self) -> int:
        return self._transport.get_write_buffer_size()

    def wanted(self) -> None:
        if self._pump is None and not self._ended and self._subscription is not None:
            self._pump = asyncio.get_running_loop().create_task(self._run_pump(self._subscription))

    def dropped(self) -> None:
        """The client stopped reading and its buffer overflowed: no clean end can be
        written to a full socket, so cut the connection; the client resumes by id."""
        DROPS.say("dropped a subscriber that stopped reading")
        self._transport.abort()

    def ended(self) -> None:
        """The subscription ended on its own (its token expired): end the response."""
        if self._subscription is not None:  # (before start, _open sees it closed)
            self.close()

    # -- writing ---------------------------------------------------------------

    async def _run_pump(self, subscription: Subscription) -> None:
        try:
            async for chunk in subscription.chunks(until_idle=True):
                self._transport.write(chunk_of(chunk) if self._chunked else chunk)
                if self._paused:
                    self._writable = asyncio.get_running_loop().create_future()
                    await self._writable
        except SubscriberTooSlow:
            if not self._transport.is_closing():  # (else dropped() did it)
                DROPS.say("dropped a subscriber that could not keep up")
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
            # (it refers to this, its sink: without the cut the two waited for the
            # cycle collector, which the broker's GC tuning runs seldom)
            self._subscription = None
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

    __slots__ = ("chunk", "data")

    def __init__(self) -> None:
        self.data = b""
        self.chunk = chunk_of(b"")

    def of(self, data: bytes) -> bytes:
        if data is not self.data:
            self.data, self.chunk = data, chunk_of(data)
        return self.chunk


SHARED_CHUNKS = _LastChunk()


def stream_request(
    data: bytes, app: Any, scheme: str = "http"
) -> tuple[Request, dict[str, StartFrom]] | None:
    """The request and where its topics start, if ``data`` is a stream request we serve:
    a complete, valid HTTP/1.1 (or 1.0) GET with no body. Else None."""
    parsed = parse_head(data)
    return None if parsed is None else stream_request_of(*parsed, app, scheme)


def stream_request_of(
    head: RequestHead, parser: httptools.HttpRequestParser, app: Any, scheme: str
) -> tuple[Request, dict[str, StartFrom]] | None:
    """``stream_request`` of a head already parsed."""
    scope = _scope_of(head, parser, scheme)
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


def _scope_of(
    head: RequestHead, parser: httptools.HttpRequestParser, scheme: str
) -> dict[str, Any] | None:
    try:
        url = httptools.parse_url(head.url)
        path = unquote(url.path.decode("ascii"))
    except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
        return None
    version = parser.get_http_version()
    plain = parser.get_method() == b"GET" and version in ("1.1", "1.0")
    bodyless = all(name not in BODY_HEADERS for name, _ in head.headers)
    if not (head.complete and plain and bodyless):
        return None
    return scope_of("GET", path, url, head.headers, scheme, version)


def is_http_1_0(request: Request) -> bool:
    """An HTTP/1.0 client: its stream's body ends with the connection, unframed (it
    knows no chunked coding, which RFC 9112 forbids sending it; uvicorn sends it)."""
    return bool(request.scope.get("http_version") == "1.0")
