"""The suite's one SSE parser (the WHATWG rules), and readers of a subscription's chunks."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import orjson

from broker import SubscriberTooSlow, Subscription
from broker.framing import HEARTBEAT

ORIGIN_CURSOR = re.compile(rb"id: (0\.[0-9]+-[0-9]+)\n\n")
"""The cursor a stream at the origin sends (no log yet): ``0.<the store's ms>-<n>``."""


def past_a_heartbeat(chunk: bytes) -> bytes:
    """``chunk`` without the heartbeat it starts with when it came later than one was
    due: a stream's first chunk, under load, comes after a beat."""
    return chunk.removeprefix(HEARTBEAT)


def is_origin_cursor(chunk: bytes) -> bool:
    return ORIGIN_CURSOR.fullmatch(past_a_heartbeat(chunk)) is not None


def origin_cursor(chunk: bytes) -> str:
    """The id of a chunk that ``is_origin_cursor``."""
    cursor = ORIGIN_CURSOR.fullmatch(past_a_heartbeat(chunk))
    assert cursor is not None, chunk
    return cursor[1].decode()


@dataclass
class Event:
    id: str | None
    event: str | None
    data: str

    @property
    def json(self) -> object:
        return orjson.loads(self.data)


def parse_sse(text: str) -> list[dict[str, str]]:
    """Events (with id/event/data) from an SSE body, per the WHATWG parsing rules."""
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    data: list[str] = []
    for line in re.split(r"\r\n|\r|\n", text):
        if line == "":
            if data:
                events.append({**current, "data": "\n".join(data)})
            current, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("id", "event", "retry"):
            current[name] = value
    return events


def last_event_id(text: str, before: str = "") -> str:
    """The id an ``EventSource`` would send back after reading ``text`` (whole blocks):
    the last ``id:`` field of any block, one with no data included (the standard sets
    the last event id at every blank line, and fires an event only for data)."""
    last = before
    for line in re.split(r"\r\n|\r|\n", text):
        name, _, value = line.partition(":")
        if name == "id" and "\0" not in value:
            last = value.removeprefix(" ")
    return last


def whole_blocks(received: bytes) -> tuple[str, bytes]:
    """What a stream read so far holds: its whole blocks (as text, up to the last blank
    line: '' if none yet), and the rest, still coming."""
    end = received.rfind(b"\n\n")
    if end < 0:
        return "", received
    return received[: end + 2].decode(), received[end + 2 :]


def complete_events(body: bytes) -> list[dict[str, str]]:
    """The events of a body cut at any point: the text after the last blank line is dropped."""
    text = body.decode("utf-8", errors="replace")
    end = text.rfind("\n\n")
    return parse_sse(text[: end + 2]) if end >= 0 else []


def parse_events(raw: bytes) -> list[Event]:
    """The complete events in ``raw`` as ``Event`` objects (comments and retry hints ignored)."""
    return [Event(e.get("id"), e.get("event"), e["data"]) for e in complete_events(raw)]


async def collect(
    chunks: AsyncIterator[bytes], until: Callable[[list[Event]], bool], timeout: float = 10.0
) -> list[Event]:
    """Read chunks until ``until(events)`` holds; fail after ``timeout`` seconds."""
    raw = b""

    async def read() -> list[Event]:
        nonlocal raw
        async for chunk in chunks:
            raw += chunk
            events = parse_events(raw)
            if until(events):
                return events
        raise AssertionError(f"stream ended early after {parse_events(raw)}")

    return await asyncio.wait_for(read(), timeout)


class PushConsumer:
    """Consumes a subscription the way ``api.lean_stream`` does: it is the subscription's
    sink, the hub writes live entries through ``write``, and a pump task runs only
    while there is catching up or a backlog (``chunks(until_idle=True)``), started
    again by ``wanted``.

    Open the subscription with it as ``sink``, then ``start`` it; iterate it for the
    chunks, like ``subscription.chunks()``.
    """

    def __init__(self) -> None:
        self.subscription: Subscription | None = None
        self.pumps_started = 0
        self.direct_writes = 0
        self.direct_heartbeats = 0
        """Of ``direct_writes``, the heartbeat comments (the clock beats an idle stream
        straight to its socket, on its own schedule: not an entry)."""
        self.ended_by_subscription = False
        self.unsent = 0
        """What ``unsent_bytes`` reports: a test sets it to play a client that stopped reading."""
        self.was_dropped = False
        self.unsent_after_write = False
        """Each write adds its size to ``unsent``: a socket that took none of it yet."""
        self._received: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None

    def start(self, subscription: Subscription) -> PushConsumer:
        self.subscription = subscription
        self.wanted()
        return self

    @property
    def pumping(self) -> bool:
        return self._pump is not None

    # -- StreamSink ------------------------------------------------------------

    def write(self, chunk: bytes) -> bool:
        self.direct_writes += 1
        self.direct_heartbeats += chunk == HEARTBEAT
        if self.unsent_after_write:
            self.unsent += len(chunk)
        self._received.put_nowait(chunk)
        return True

    def unsent_bytes(self) -> int:
        return self.unsent

    def wanted(self) -> None:
        if self._pump is None and self.subscription is not None:
            self.pumps_started += 1
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    def dropped(self) -> None:
        self.was_dropped = True
        self._received.put_nowait(SubscriberTooSlow())

    def ended(self) -> None:
        self.ended_by_subscription = True
        self._received.put_nowait(None)

    async def _run_pump(self) -> None:
        assert self.subscription is not None
        try:
            async for chunk in self.subscription.chunks(until_idle=True):
                self._received.put_nowait(chunk)
        except Exception as error:  # handed to the reader, like a failed read
            self._received.put_nowait(error)
        finally:
            self._pump = None

    def __aiter__(self) -> PushConsumer:
        return self

    async def __anext__(self) -> bytes:
        item = await self._received.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item
