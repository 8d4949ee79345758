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
    """Splits a decoded SSE body into events (LF line ends, as the servers here write)."""

    def __init__(self, on_event: Callable[[SseEvent], None]) -> None:
        self.on_event = on_event
        self.partial = b""
        self.id: str | None = None
        self.event: str | None = None
        self.data: list[str] = []

    def feed(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            self._line(line.rstrip(b"\r").decode())

    def _line(self, line: str) -> None:
        if not line:
            if self.data or self.event:
                self.on_event(SseEvent(self.id, self.event, "\n".join(self.data)))
            self.event, self.data = None, []
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self.data.append(value)
        elif name == "id":
            self.id = value
        elif name == "event":
            self.event = value


class SseStream(asyncio.Protocol):
    """One GET of an event stream: `status` once the head is in, `ended` when it is over
    (the server ended the body or closed the connection, or we closed it)."""

    def __init__(self, request: bytes, on_event: Callable[[SseEvent], None]) -> None:
        self.request = request
        loop = asyncio.get_running_loop()
        self.status: asyncio.Future[int] = loop.create_future()
        self.ended: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._head = b""
        self._dechunker: _Dechunker | None = None
        self._parser = _EventParser(on_event)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
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
                self._end()
                return
        if self._dechunker is not None:
            data = self._dechunker.feed(data)
        self._parser.feed(data)
        if self._dechunker is not None and self._dechunker.finished:
            self._end()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.status.done():
            self.status.set_result(0)
        self._end()

    def _end(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def open_stream(
    host: str, port: int, request: bytes, on_event: Callable[[SseEvent], None]
) -> SseStream:
    """Connect and send the request; the status is awaited on `stream.status`."""
    stream = SseStream(request, on_event)
    await asyncio.get_running_loop().create_connection(lambda: stream, host, port)
    return stream
