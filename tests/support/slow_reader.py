"""A subscriber that reads slower than events come (a phone on a bad network), and the
strict oracle its tests judge it by.

``SlowReader`` is a raw socket with a small receive buffer that reads a few KiB at a
time at a bounded pace, so the broker (or a proxy in front of it) sees it fall
behind. It keeps its stream's last event id as ``EventSource`` does (at each block's
end, only for whole blocks) and, when its connection is cut, reconnects with that
id, as a browser does. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import orjson

from broker.ids import EventId, parse_cursor
from tests.support.polling import await_until
from tests.support.sse import last_event_id, parse_sse

HEAD_END = b"\r\n\r\n"
GAP_EVENT = "broker.gap"
DONE_EVENT = "done"
DROPPED_METRIC = "broker_slow_subscribers_dropped_total"
MOST_BATCHES = 400  # ~16 MB at most before the slow reader must have been dropped
AFTER_DROP_BATCHES = 20  # published while it comes back: it catches up from the log
READ_SECONDS = 60


class ChunkedBody:
    """The payload of a chunked body fed in pieces of any size (or, ``chunked`` False,
    the bytes as they come: an HTTP/1.0 body ends with its connection)."""

    def __init__(self, chunked: bool) -> None:
        self._chunked = chunked
        self._raw = b""
        self._left = 0  # of the current chunk's data and its CRLF
        self.payload = b""
        self.ended = False  # the last chunk came: the response ended cleanly

    def feed(self, data: bytes) -> None:
        if not self._chunked:
            self.payload += data
            return
        self._raw += data
        while self._raw and not self.ended:
            if self._left == 0 and not self._read_size():
                return
            taken, self._raw = self._raw[: self._left], self._raw[self._left :]
            self._left -= len(taken)
            # Its data, without the chunk's closing CRLF: the last two bytes to come,
            # of which this piece holds those past what is left (2 - _left).
            self.payload += taken[: max(0, len(taken) - max(0, 2 - self._left))]

    def _read_size(self) -> bool:
        line_end = self._raw.find(b"\r\n")
        if line_end < 0:
            return False
        size = int(self._raw[:line_end].split(b";")[0], 16)
        self._raw = self._raw[line_end + 2 :]
        self.ended = size == 0
        self._left = size + 2
        return True

    def take_blocks(self) -> str:
        """The whole SSE blocks received so far (each up to its blank line), taken out."""
        end = self.payload.rfind(b"\n\n")
        if end < 0:
            return ""
        blocks, self.payload = self.payload[: end + 2], self.payload[end + 2 :]
        return blocks.decode()


@dataclass
class SlowReader:
    """Reads ``target`` on 127.0.0.1:``port`` at most ``read_bytes`` every ``pace`` s
    until ``hurry`` is set (the network got better), then as fast as it can."""

    port: int
    target: str
    read_bytes: int = 4096
    pace: float = 0.005
    receive_buffer: int = 4096
    http_version: str = "1.1"
    after_head: bytes = b""
    """Sent right after the request's head: a request pipelined behind the stream's
    (the broker then serves the stream by uvicorn's route, not on the connection)."""
    max_connections: int = 20
    events: list[dict[str, str]] = field(default_factory=list)
    """Every event dispatched (a block with data), across connections, in order."""
    last_id: str = ""
    connections: int = 0
    resumed_from: list[str] = field(default_factory=list)
    """The Last-Event-ID of each reconnection."""
    hurry: asyncio.Event = field(default_factory=asyncio.Event)
    reading: asyncio.Event = field(default_factory=asyncio.Event)
    """Cleared, it reads nothing until it is set again (a tab in the background, a phone
    in a tunnel): its receive buffer fills, then the broker's."""

    def __post_init__(self) -> None:
        self.reading.set()

    async def read_until(self, last: Callable[[dict[str, str]], bool], timeout: float) -> None:
        """Read, reconnecting after each cut, until an event ``last`` holds for arrives."""
        async with asyncio.timeout(timeout):
            while self.connections < self.max_connections:
                if await self._read_one_connection(last):
                    return
        raise AssertionError(
            f"no last event after {self.connections} connections: {self.events[-3:]}"
        )

    async def _read_one_connection(self, last: Callable[[dict[str, str]], bool]) -> bool:
        """One connection, read to its end; True once the last event came."""
        loop = asyncio.get_running_loop()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", self.port))
            await loop.sock_sendall(sock, self._request())
            self.connections += 1
            body = await self._read_head(sock)
            try:
                while not body.ended:
                    await self.reading.wait()
                    data = await loop.sock_recv(sock, self.read_bytes)
                    if not data:
                        break
                    body.feed(data)
                    if self._dispatch(body.take_blocks(), last):
                        return True
                    if not self.hurry.is_set():
                        await asyncio.sleep(self.pace)  # the pace of a slow client
            except ConnectionError:
                pass  # cut (reset): what came before the cut is all it has
        return False  # (a block it had only part of is dropped, as EventSource drops it)

    def _request(self) -> bytes:
        head = [f"GET {self.target} HTTP/{self.http_version}", "Host: 127.0.0.1"]
        head.append("Accept: text/event-stream")
        if self.last_id:
            head.append(f"Last-Event-ID: {self.last_id}")
            self.resumed_from.append(self.last_id)
        return "\r\n".join(head).encode() + HEAD_END + self.after_head

    async def _read_head(self, sock: socket.socket) -> ChunkedBody:
        loop = asyncio.get_running_loop()
        received = b""
        for _ in range(1000):  # bounded: a head is well under 1000 reads
            if HEAD_END in received:
                break
            data = await loop.sock_recv(sock, 1024)
            if not data:
                break
            received += data
        head, _, rest = received.partition(HEAD_END)
        assert head.split(b" ", 2)[1:2] == [b"200"], f"not a stream: {received[:300]!r}"
        body = ChunkedBody(b"transfer-encoding: chunked" in head.lower())
        body.feed(rest)
        return body

    def _dispatch(self, blocks: str, last: Callable[[dict[str, str]], bool]) -> bool:
        if not blocks:
            return False
        self.last_id = last_event_id(blocks, self.last_id)
        for event in parse_sse(blocks):
            self.events.append(event)
            if last(event):
                return True
        return False


def position_in(event_id: str, topic: str) -> EventId:
    """The topic's place in an event's id: the id itself, or its part of a cursor."""
    return parse_cursor(event_id)[topic] if "~" in event_id else EventId.parse(event_id)


def delivery_problems(
    published: list[tuple[str, object]], events: list[dict[str, str]], topic: str, start: str
) -> list[str]:
    """What is wrong with the ``events`` of ``topic`` a reader got from ``start`` (the id
    of the topic's start event, ``Flood.start_events``) against ``published`` (id and
    data, in order): each published event must come exactly once, in order, with its
    data whole, except those a ``broker.gap`` covers, and a gap must be asked from
    exactly where the reader was and go on from exactly the event after its
    ``resumed_after``."""
    positions = [EventId.parse(event_id).position for event_id, _ in published]
    at, starts = EventId.parse(start).position, 0
    problems: list[str] = []
    for event in events:
        if event.get("event") == GAP_EVENT:
            at = _judge_gap(event, topic, at, problems)
            continue
        data = orjson.loads(event["data"])
        if not (isinstance(data, str) and data.startswith(f"{topic}:")):
            continue  # another topic's, or the last event
        if data == start_data(topic):
            starts += 1
            continue
        place = position_in(event["id"], topic).position
        n = next((i for i, p in enumerate(positions) if p > at), len(positions))
        if n == len(positions) or positions[n] != place:
            problems.append(f"after {at}: got {place}, expected n={n} (lost or duplicated)")
        elif data != published[n][1]:
            problems.append(f"n={n}: data not whole: {data[:80]!r}")
        at = place
    if starts > 1:
        problems.append(f"the start event came {starts} times")
    if positions and at < positions[-1]:
        problems.append(f"stopped at {at}, before the last published {positions[-1]}")
    return problems


def start_data(topic: str) -> str:
    return f"{topic}:start"


def _judge_gap(
    event: dict[str, str], topic: str, at: tuple[int, int], problems: list[str]
) -> tuple[int, int]:
    """Where a reader stands after a gap notice; what is wrong with it, in ``problems``."""
    gap = orjson.loads(event["data"])
    if gap["topic"] != topic:
        return at
    if EventId.parse(gap["requested"]).position != at:
        problems.append(f"gap asked from {gap['requested']}, the reader was at {at}")
    if gap.get("resumed_after") is None:
        problems.append(f"gap with no place to go on from: {gap}")
        return at
    return max(at, EventId.parse(gap["resumed_after"]).position)


def done_with(topics: list[str]) -> Callable[[dict[str, str]], bool]:
    """Whether the last event of every topic came (a multi-topic stream keeps each topic's
    order, not their order between them: a catch-up replays one topic, then the next)."""
    waiting = {f"done:{topic}" for topic in topics}

    def is_last(event: dict[str, str]) -> bool:
        if event.get("event") == DONE_EVENT:
            waiting.discard(orjson.loads(event["data"]))
        return not waiting

    return is_last


@dataclass
class Flood:
    """Events published faster than a slow reader reads them: batches of ``batch``
    events of ``event_bytes``, round the topics, each event's data naming its place."""

    client: httpx.AsyncClient
    topics: list[str]
    event_bytes: int = 2000
    batch: int = 20
    published: dict[str, list[tuple[str, object]]] = field(default_factory=dict)
    """Per topic, the id and data of each event of the flood, in order."""
    sent_batches: int = 0

    async def start_events(self) -> dict[str, str]:
        """One event on each topic before the reader comes: the id it starts after."""
        starts = {}
        for topic in self.topics:
            starts[topic] = (await self._publish(topic, [{"data": start_data(topic)}]))[0]
        return starts

    async def until_dropped(self, most_batches: int) -> int:
        """Publish until the broker dropped a slow subscriber; the batches it took."""
        before = await self.dropped()
        for count in range(1, most_batches + 1):
            await self.batches(1)
            if count % 5 == 0 and await self.dropped() > before:
                return count
        raise AssertionError(f"no subscriber was dropped after {most_batches} batches")

    async def batches(self, count: int) -> None:
        for _ in range(count):
            topic = self.topics[self.sent_batches % len(self.topics)]
            sent = self.published.setdefault(topic, [])
            datas = [
                f"{topic}:{len(sent) + k}:" + "x" * self.event_bytes for k in range(self.batch)
            ]
            ids = await self._publish(topic, [{"data": data} for data in datas])
            sent += zip(ids, datas, strict=True)
            self.sent_batches += 1

    async def done(self) -> None:
        """The last event of each topic (``done_with``)."""
        for topic in self.topics:
            await self._publish(topic, [{"data": f"done:{topic}", "event": DONE_EVENT}])

    async def dropped(self) -> float:
        """How many slow subscribers the broker dropped so far."""
        answer = await self.client.get("/metrics")
        assert answer.status_code == 200
        samples = re.findall(rf"^{DROPPED_METRIC}(?:{{[^}}]*}})? (\S+)$", answer.text, re.M)
        return sum(map(float, samples))

    async def _publish(self, topic: str, events: list[dict[str, str]]) -> list[str]:
        answer = await self.client.post(f"/topics/{topic}/events", json=events)
        assert answer.status_code == 201, answer.text
        ids: list[str] = answer.json()["ids"]
        return ids


async def read_slowly_through_a_drop(reader: SlowReader, flood: Flood) -> None:
    """The reader reads while the flood outpaces it, past a drop and some more; then
    the network gets better, the last events come, and the reader reads up to them.
    (The flood goes to the broker itself; the reader may be behind a proxy.)"""
    reading = asyncio.create_task(reader.read_until(done_with(flood.topics), timeout=READ_SECONDS))
    try:
        # Live before the flood (its start events came): a reader still catching up is
        # waited for, never dropped.
        await await_until(
            lambda: len(reader.events) >= len(flood.topics),
            timeout=5,
            what="the reader's start events",
            worker=reading,
        )
        await flood.until_dropped(MOST_BATCHES)
        await flood.batches(AFTER_DROP_BATCHES)
        reader.hurry.set()
        await flood.done()
        await reading
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading


def stream_target(topics: list[str]) -> str:
    if len(topics) == 1:
        return f"/topics/{topics[0]}/events?from=earliest"
    return "/events?" + "&".join(f"topic={topic}" for topic in topics) + "&from=earliest"
