"""A full SSE client on a raw asyncio protocol, for scenarios that check every event.

The fan-out subscribers in `bench/wire.py` only count; the `sessions` and `churn`
scenarios must know which token arrived, in what order, and whether `broker.end`
came, so this one decodes the chunked framing and parses each event's `id`, `event`
and `data`. It still costs little: no HTTP library, one callback per event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

HEADER_END = b"\r\n\r\n"
TAIL_BYTES = 200


@dataclass(frozen=True)
class SseEvent:
    id: str | None
    event: str | None
    data: str


class _Dechunker:
    """Decodes `Transfer-Encoding: chunked`; `finished` once the last chunk is in."""

    def __init__(self) -> None:
        self.buffer = b""
        self.remaining = -1  # bytes left in the current chunk; -1: a size line is next
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        out: list[bytes] = []
        while not self.finished:
            if self.remaining < 0:
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    break
                size = int(self.buffer[:end].split(b";", 1)[0], 16)
                self.buffer = self.buffer[end + 2 :]
                self.remaining = size
                self.finished = size == 0
            elif len(self.buffer) >= self.remaining + 2:
                out.append(self.buffer[: self.remaining])
                self.buffer = self.buffer[self.remaining + 2 :]
                self.remaining = -1
            else:
                break
        return b"".join(out)


class _EventParser:
    """Splits a decoded SSE body into events (LF line ends, as the servers here write).

    As ``EventSource`` does (HTML, "dispatch the event"): the last event id is set at
    every blank line, whether or not an event goes out; an event goes out only if it
    has data (a block with an ``event:`` line and no ``data:`` is not one). The broker's
    stream "from now" sends its cursor as an ``id:`` line with no data: a client that
    drops before its first event comes back with it: ``on_last_id`` tells of an id that
    moved with no event to carry it."""

    def __init__(
        self,
        on_event: Callable[[SseEvent], None],
        on_last_id: Callable[[str], None] | None = None,
    ) -> None:
        self.on_event = on_event
        self.on_last_id = on_last_id
        self.partial = b""
        self.id: str | None = None  # the last event id buffer
        self.last_id: str | None = None  # the last event id, as of the last blank line
        self.event: str | None = None
        self.data: list[str] = []
        self.retry_ms: int | None = None  # the server's reconnection time, if it set one

    def feed(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            self._line(line.rstrip(b"\r").decode())

    def _line(self, line: str) -> None:
        if not line:
            self._blank_line()
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self.data.append(value)
        elif name == "id":
            if "\0" not in value:  # (the spec ignores such an id)
                self.id = value
        elif name == "event":
            self.event = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)

    def _blank_line(self) -> None:
        moved = self.id != self.last_id
        self.last_id = self.id
        if self.data:
            self.on_event(SseEvent(self.id, self.event, "\n".join(self.data)))
        elif moved and self.id is not None and self.on_last_id is not None:
            self.on_last_id(self.id)  # an id with no event: kept all the same
        self.event, self.data = None, []


class SseStream(asyncio.Protocol):
    """One GET of an event stream: `status` once the head is in, `ended` when it is over
    (the server ended the body or closed the connection, or we closed it), and
    `end_reason` says which. `last_id`: the stream's last event id (see _EventParser)."""

    def __init__(
        self,
        request: bytes,
        on_event: Callable[[SseEvent], None],
        on_last_id: Callable[[str], None] | None = None,
    ) -> None:
        self.request = request
        loop = asyncio.get_running_loop()
        self.status: asyncio.Future[int] = loop.create_future()
        self.ended: asyncio.Future[None] = loop.create_future()
        self.end_reason: str | None = None
        self.received_bytes = 0
        self.tail = b""  # the last bytes received (what ended a stream, when it ends)
        self.transport: asyncio.Transport | None = None
        self._head = b""
        self._dechunker: _Dechunker | None = None
        self._parser = _EventParser(on_event, on_last_id)

    @property
    def last_id(self) -> str | None:
        return self._parser.last_id

    @property
    def retry_ms(self) -> int | None:
        return self._parser.retry_ms

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.received_bytes += len(data)
        self.tail = (self.tail + data[-TAIL_BYTES:])[-TAIL_BYTES:]
        if not self.status.done():
            self._head += data
            end = self._head.find(HEADER_END)
            if end < 0:
                return
            head, data = self._head[:end].lower(), self._head[end + 4 :]
            self._head = b""
            status = int(head[9:12])
            if b"transfer-encoding: chunked" in head:
                self._dechunker = _Dechunker()
            self.status.set_result(status)
            if status != 200:
                self._end(f"status {status}")
                return
        if self._dechunker is not None:
            data = self._dechunker.feed(data)
        self._parser.feed(data)
        if self._dechunker is not None and self._dechunker.finished:
            self._end("the server ended the body")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.status.done():
            self.status.set_result(0)
        self._end("the connection was lost" + (f": {exc!r}" if exc else ""))

    def _end(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        if not self.ended.done():
            self.ended.set_result(None)
        self.close()

    def close(self, reason: str = "closed by the client") -> None:
        if self.end_reason is None:
            self.end_reason = reason
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def open_stream(
    host: str,
    port: int,
    request: bytes,
    on_event: Callable[[SseEvent], None],
    on_last_id: Callable[[str], None] | None = None,
) -> SseStream:
    """Connect and send the request; the status is awaited on `stream.status`."""
    stream = SseStream(request, on_event, on_last_id)
    await asyncio.get_running_loop().create_connection(lambda: stream, host, port)
    return stream
