"""Clients for the HTTP suite: an SSE stream read in the background, a raw HTTP/1.1
socket for byte-level checks, and small assertions shared by the test modules.

Every wait here has a deadline; nothing sleeps to hide a race.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from httpx_sse import ServerSentEvent

from tests.support.sse import last_event_id, parse_sse, whole_blocks

PROBLEM_JSON = "application/problem+json"
RETRY_LINE = re.compile(r"^retry: (\d+)$", re.MULTILINE)
# The contract: an id never contains a line break, NUL, space, "," or ";".
FORBIDDEN_ID_CHARS = re.compile(r"[\r\n\0 ,;]")


def new_topic(prefix: str = "h") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def assert_id(event_id: str) -> None:
    assert event_id, "an empty id"
    assert FORBIDDEN_ID_CHARS.search(event_id) is None, f"id with a forbidden char: {event_id!r}"


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """An RFC 9457 problem of this status; returns its body."""
    body_text = response.text
    assert response.status_code == status, f"{response.status_code} {body_text[:500]}"
    content_type = response.headers.get("content-type", "")
    assert content_type.split(";")[0].strip() == PROBLEM_JSON, content_type
    body = response.json()
    assert isinstance(body, dict), body
    for member in ("type", "title", "detail"):
        assert isinstance(body.get(member), str) and body[member], (member, body)
    assert body.get("status") == status, body
    assert "Traceback" not in body_text and 'File "' not in body_text, body_text
    return body


# -- metrics -----------------------------------------------------------------------


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """A sample's value from Prometheus text (summed over label sets unless ``labels``)."""
    total: float | None = None
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        if labels and not all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            continue
        total = (total or 0.0) + float(match.group(2))
    return total


def read_metric(base_url: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    response = httpx.get(base_url + "/metrics", timeout=5)
    assert response.status_code == 200
    return metric_value(response.text, name, labels) or 0.0


async def aread_metric(client: httpx.AsyncClient, name: str) -> float:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return metric_value(response.text, name) or 0.0


# -- SSE over httpx ------------------------------------------------------------------


@dataclass
class SseStream:
    """A subscription read by a background task into a queue, so every read has a deadline."""

    client: httpx.AsyncClient
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    params: Any = None
    response: httpx.Response | None = None
    queue: asyncio.Queue[ServerSentEvent] = field(default_factory=asyncio.Queue)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    retry_hints: list[int] = field(default_factory=list)
    last_event_id: str = ""
    """What an ``EventSource`` would send as Last-Event-ID: the id lines with no data too."""
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SseStream:
        headers = {"Accept": "text/event-stream", **self.headers}
        request = self.client.build_request("GET", self.path, headers=headers, params=self.params)
        self.response = await self.client.send(request, stream=True)
        if self.response.status_code != 200:
            await self.response.aread()
            await self.response.aclose()
            raise AssertionError(f"subscribe: {self.response.status_code} {self.response.text}")
        self._task = asyncio.create_task(self._pump())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.response is not None:
            await self.response.aclose()

    async def _pump(self) -> None:
        """Events as EventSource dispatches them, by the suite's parser (the standard's
        rules): httpx-sse hands on a heartbeat comment, a bare ``retry:`` block and the
        cursor a stream "from now" sends (an ``id:`` with no data) as empty events, which
        it cannot tell from an event whose ``data:`` line holds nothing."""
        assert self.response is not None
        pending = b""
        try:
            async for chunk in self.response.aiter_bytes():
                blocks, pending = whole_blocks(pending + chunk)
                for event in parse_sse(blocks):
                    retry = int(event["retry"]) if "retry" in event else None
                    kind = event.get("event") or "message"
                    sse = ServerSentEvent(kind, event["data"], event.get("id", ""), retry)
                    self.queue.put_nowait(sse)
                self.retry_hints += [int(ms) for ms in RETRY_LINE.findall(blocks)]
                self.last_event_id = last_event_id(blocks, self.last_event_id)
        except (httpx.HTTPError, OSError) as error:
            self.error = error
        finally:
            self.ended.set()

    async def next(self, timeout: float = 8.0) -> ServerSentEvent:
        """The next event, or fail when none arrives within ``timeout`` seconds."""
        getter = asyncio.ensure_future(self.queue.get())
        ender = asyncio.ensure_future(self.ended.wait())
        try:
            done, _ = await asyncio.wait(
                {getter, ender}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ender.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done or (getter.done() and not getter.cancelled()):
            return getter.result()
        if not self.queue.empty():
            return self.queue.get_nowait()
        if self.ended.is_set():
            raise AssertionError(f"the stream ended (error: {self.error!r})")
        raise AssertionError(f"no event within {timeout}s on {self.path}")

    async def take(self, count: int, timeout: float = 8.0) -> list[ServerSentEvent]:
        return [await self.next(timeout) for _ in range(count)]

    async def wait_ended(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ended.wait(), timeout)
        return self.ended.is_set()


def subscribe(
    client: httpx.AsyncClient,
    topic: str,
    *,
    last_event_id: str | None = None,
    params: Any = None,
) -> SseStream:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    return SseStream(client, f"/topics/{topic}/events", headers=headers, params=params)


async def publish_json(
    client: httpx.AsyncClient, topic: str, body: Any, headers: dict[str, str] | None = None
) -> Any:
    response = await client.post(f"/topics/{topic}/events", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


async def listed_topics(client: httpx.AsyncClient, prefix: str) -> list[dict[str, Any]]:
    """Every topic a listing by ``prefix`` gives, following ``next``: a page may hold
    none and still have one (SCAN steps that matched nothing), and the suite's Redis
    holds many keys."""
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(10_000):
        params = {"prefix": prefix, "limit": "1000"} | ({"cursor": cursor} if cursor else {})
        response = await client.get("/topics", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        found += page["topics"]
        cursor = page["next"]
        if cursor is None:
            return found
    raise AssertionError("the listing never ended")


async def publish_many(client: httpx.AsyncClient, topic: str, datas: list[Any]) -> list[str]:
    """Publish each value as its own event, in order; their ids."""
    ids = []
    for data in datas:
        ids.append((await publish_json(client, topic, {"data": data}))["id"])
    return ids


# -- raw HTTP/1.1 --------------------------------------------------------------------


@dataclass
class RawResponse:
    """An HTTP/1.1 response read byte by byte from a socket, chunked bodies decoded."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False  # the terminal zero-length chunk was seen
    names: list[str] = field(default_factory=list)  # every header's name, repeats kept

    def count(self, name: str) -> int:
        """How many times the head has the header ``name`` (lower case)."""
        return self.names.count(name)

    async def read_head(self, timeout: float = 5.0) -> None:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
                self.names.append(name.strip().lower())

    async def read_chunk(self, timeout: float = 5.0) -> bytes | None:
        """The next chunk of a chunked body; None at its clean end."""
        assert self.headers.get("transfer-encoding", "").lower() == "chunked", self.headers
        size_line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)  # no trailers
            self.complete = True
            return None
        data = await asyncio.wait_for(self.reader.readexactly(size + 2), timeout)
        assert data.endswith(b"\r\n"), data[-10:]
        self.body += data[:-2]
        return data[:-2]

    async def read_until(self, marker: bytes | re.Pattern[bytes], timeout: float = 5.0) -> None:
        """Read chunks until ``marker`` is in the body (or matches part of it)."""
        deadline = time.monotonic() + timeout
        while not (marker in self.body if isinstance(marker, bytes) else marker.search(self.body)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{marker!r} not received within {timeout}s: {self.body!r}")
            if await self.read_chunk(remaining) is None:
                raise AssertionError(f"the body ended before {marker!r}: {self.body!r}")

    async def read_to_end(self, timeout: float) -> None:
        """Read the whole (chunked) body; fail unless it ends cleanly in time."""
        deadline = time.monotonic() + timeout
        while await self.read_chunk(max(0.01, deadline - time.monotonic())) is not None:
            pass

    async def read_sized_body(self, timeout: float = 5.0) -> bytes:
        length = int(self.headers.get("content-length", "0"))
        data = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        self.body += data
        return data

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def request_bytes(
    method: str, url: str, headers: Mapping[str, str] | None = None, body: bytes = b""
) -> bytes:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


async def raw_request(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    *,
    raw_head: bytes | None = None,
) -> RawResponse:
    """Send one request over a new connection; the response with its head read."""
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(raw_head if raw_head is not None else request_bytes(method, url, headers, body))
    await writer.drain()
    response = RawResponse(reader, writer)
    try:
        await response.read_head()
    except BaseException:
        await response.close()
        raise
    return response


async def small_window_stream(url: str, path: str) -> RawResponse:
    """A stream request whose client reads only when asked, its head read: through a
    small receive window and a small StreamReader limit (asyncio stops reading the
    socket after a few KiB), so the broker runs ahead of it by what the buffers between
    take (some 600 KB), and no further."""
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2048)
    writer.write(request_bytes("GET", url + path, {"Accept": "text/event-stream"}))
    await writer.drain()
    response = RawResponse(reader, writer)
    try:
        await response.read_head()
    except BaseException:
        await response.close()
        raise
    return response
