"""A small SSE parser for tests that read a subscription's raw chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import orjson


@dataclass
class Event:
    id: str | None
    event: str | None
    data: str

    @property
    def json(self) -> object:
        return orjson.loads(self.data)


def parse_events(raw: bytes) -> list[Event]:
    """Complete events in ``raw`` (comments and retry hints ignored)."""
    events = []
    for block in raw.split(b"\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.split(b"\n"):
            if not line or line.startswith(b":"):
                continue
            name, _, value = line.decode().partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
        if "data" in fields:
            events.append(Event(fields.get("id", [None])[-1], fields.get("event", [None])[-1],
                                "\n".join(fields["data"])))  # fmt: skip
    return events


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
