"""Minimal HTTP/1.1 clients on raw asyncio protocols, cheap enough to run thousands at once.

A load generator that shares two cores with Redis and the server cannot afford an SSE
client library per connection. These protocols do the least work that still measures:

- `SseSubscriber` counts events with `bytes.count` on each received chunk (no parsing),
  and parses `data:` lines only when it samples latency or waits for a marker.
- `KeepAliveClient` sends one request at a time on a keep-alive connection and reads
  `Content-Length` bodies; `PublishLoop` chains requests from the protocol callback
  itself, so a request costs no coroutine switch.

Deliberate shortcuts: chunked transfer framing is not decoded (event counting is immune
to it because servers write whole events per chunk), and responses must carry a
`Content-Length`.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any, cast

import orjson

DATA_LINE = b"\ndata:"
HEADER_END = b"\r\n\r\n"
RECV_SIZE = 256 * 1024


def with_token(path: str) -> tuple[str, str]:
    """A target marks a request's path with its token (``access_token=``, see
    ``servers.Target.authorized``); it is sent as ``Authorization: Bearer``, the way
    producers and servers send it, so the auth comparison measures that: the path
    without it, and the header line ("" without a token)."""
    head, found, rest = path.partition("access_token=")
    if not found:
        return path, ""
    token, _, tail = rest.partition("&")
    base = (head + tail).rstrip("?&")
    return base, f"Authorization: Bearer {token}\r\n"


def get_request(host: str, port: int, path: str, headers: dict[str, str] | None = None) -> bytes:
    path, authorization = with_token(path)
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n" + authorization + "\r\n").encode()


def post_request(
    host: str, port: int, path: str, body: bytes, content_type: str = "application/json"
) -> bytes:
    path, authorization = with_token(path)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{authorization}"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def chunked_post_head(host: str, port: int, path: str, content_type: str) -> bytes:
    """The head of a POST whose body follows as chunks (`chunk()`), ended by `LAST_CHUNK`."""
    path, authorization = with_token(path)
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{authorization}"
        f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


class EventCounter:
    """The body side of one SSE subscription: counts events, optionally records latencies.

    `sample` parses each `data:` line as JSON `{"t": <publish time_ns>}` and records
    receipt minus publish time in ms. `marker` marks the subscriber done once those
    bytes arrive; `expected` marks it done after that many events.
    """

    def __init__(
        self,
        request: bytes,
        *,
        sample: bool = False,
        expected: int = 0,
        marker: bytes = b"",
        on_done: Callable[[EventCounter], None] | None = None,
    ) -> None:
        self.request = request
        self.sample = sample
        self.expected = expected
        self.marker = marker
        self.on_done = on_done
        self.status = 0
        self.count = 0
        self.done_at = 0.0
        self.closed = False
        self.latencies_ms: list[float] = []
        self._head = b""
        self._tail = b""
        self._tail_size = max(len(DATA_LINE), len(marker)) - 1
        self._lines = b""

    def close(self) -> None:
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        if self.status:
            self._body(data)
        else:
            self._header_bytes(data)

    def _header_bytes(self, data: bytes) -> None:
        self._head += data
        end = self._head.find(HEADER_END)
        if end < 0:
            return
        self.status = int(self._head[9:12])
        rest, self._head = self._head[end + 2 :], b""
        self.headers_received(self.status)
        if self.status == 200:
            self._body(rest)
        else:
            self.close()

    def headers_received(self, status: int) -> None:
        """Called once the response head is in."""

    def _body(self, data: bytes) -> None:
        tail = self._tail
        # Pattern hits inside `data`, plus those straddling the previous chunk's tail.
        self.count += data.count(DATA_LINE) + (tail[-5:] + data[:5]).count(DATA_LINE)
        if self.marker and not self.done_at and self.marker in tail + data:
            self._finish()
        if self.sample:
            self._record_latencies(data)
        size = self._tail_size
        self._tail = (tail + data)[-size:] if len(data) < size else data[-size:]
        if self.expected and not self.done_at and self.count >= self.expected:
            self._finish()

    def _finish(self) -> None:
        self.done_at = time.time()
        if self.on_done is not None:
            self.on_done(self)

    def _record_latencies(self, data: bytes) -> None:
        now_ns = time.time_ns()
        self._lines += data
        cut = self._lines.rfind(b"\n")
        if cut < 0:
            return
        complete, self._lines = self._lines[:cut], self._lines[cut + 1 :]
        for line in complete.split(b"\n"):
            if line.startswith(b"data:"):
                self._record_one(line[5:], now_ns)

    def _record_one(self, payload: bytes, now_ns: int) -> None:
        try:
            sent_ns = orjson.loads(payload)["t"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        self.latencies_ms.append((now_ns - sent_ns) / 1e6)


class SseSubscriber(EventCounter, asyncio.Protocol):
    """A subscription driven by the event loop: each chunk is handled as it arrives."""

    def __init__(self, request: bytes, **options: Any) -> None:
        super().__init__(request, **options)
        self.headers: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.feed(data)

    def headers_received(self, status: int) -> None:
        if not self.headers.done():
            self.headers.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.headers_received(0)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class PolledSubscriber(EventCounter):
    """A subscription whose socket is read only when `poll()` sweeps it, not by the loop.

    Thousands of subscribers at hundreds of events per second would cost the load
    generator a wake-up and a `recv` per event each; swept every few tens of
    milliseconds, a socket holds several events per `recv`. Only for counting: the
    sweep delays receipt, so latency is sampled by `SseSubscriber`s alongside.
    """

    def __init__(self, request: bytes, **options: Any) -> None:
        super().__init__(request, **options)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)

    async def open(self, host: str, port: int) -> int:
        """Connect, send the request and read the response head; the status."""
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, (host, port))
        await loop.sock_sendall(self.sock, self.request)
        while not self.status and not self.closed:
            data = await loop.sock_recv(self.sock, RECV_SIZE)
            if not data:
                self.closed = True
            self.feed(data)
        return self.status

    def poll(self) -> None:
        """Read whatever the socket holds, without blocking."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._body(data)
        else:
            self.closed = True

    def close(self) -> None:
        self.closed = True
        self.sock.close()


class _ResponseReader:
    """Splits a keep-alive byte stream into (status, body) responses with Content-Length."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        responses = []
        while (response := self._next()) is not None:
            responses.append(response)
        return responses

    def _next(self) -> tuple[int, bytes] | None:
        end = self.buffer.find(HEADER_END)
        if end < 0:
            return None
        head = self.buffer[:end].lower()
        at = head.find(b"content-length:")
        if at < 0:
            raise ValueError("response without Content-Length: " + repr(head[:200]))
        line_end = head.find(b"\r\n", at)
        length = int(head[at + 15 : line_end if line_end >= 0 else len(head)])
        total = end + 4 + length
        if len(self.buffer) < total:
            return None
        status, body = int(head[9:12]), self.buffer[end + 4 : total]
        self.buffer = self.buffer[total:]
        return status, body


class KeepAliveClient(asyncio.Protocol):
    """One keep-alive connection; `request()` sends raw request bytes, returns (status, body)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = _ResponseReader()
        self.waiting: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        for response in self.reader.feed(data):
            if self.waiting is not None and not self.waiting.done():
                self.waiting.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_exception(ConnectionError("connection closed"))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        return await self.begin(raw)

    def begin(self, raw: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """Send the start of a request; the future gets its response. The caller may
        write more of the body (a chunked upload) on `transport` before it comes."""
        self.waiting = asyncio.get_running_loop().create_future()
        self.write(raw)
        return self.waiting

    def write(self, data: bytes) -> None:
        """Write, or raise ConnectionError if the server closed the connection (uvloop
        raises RuntimeError on a closed transport; asyncio would drop the bytes)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the connection is closed")
        try:
            self.transport.write(data)
        except RuntimeError as error:
            raise ConnectionError(str(error)) from error

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class PublishLoop(asyncio.Protocol):
    """Sends the same request back to back until `until` (monotonic), counting statuses."""

    def __init__(self, raw: bytes, until: float) -> None:
        self.raw = raw
        self.until = until
        self.ok = 0
        self.failed = 0
        self.reader = _ResponseReader()
        self.done = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def start(self) -> None:
        assert self.transport is not None
        self.transport.write(self.raw)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for status, _body in self.reader.feed(data):
            if 200 <= status < 300:
                self.ok += 1
            else:
                self.failed += 1
            if time.monotonic() < self.until:
                self.transport.write(self.raw)
            elif not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)
