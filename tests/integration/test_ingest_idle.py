"""Streaming ingest's own idle deadline (``api.ingest``), without the HTTP edge's guard:
a body that stops sending is ended with 408, one that sends slowly but steadily is not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from api.ingest import AsgiBody, Ingest
from api.problems import HttpProblem
from broker import Broker, TooLarge, TopicClosed

IDLE_S = 0.3


def ingest_of(broker: Broker, topic: str) -> Ingest:
    return Ingest(
        broker, topic, key=None, max_event_bytes=1000, max_batch=100,
        idle_timeout=IDLE_S, append_timeout=5,
    )  # fmt: skip


def body(pauses: list[float], then_stall: bool) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A ``receive`` sending one line after each pause; the last message ends the body,
    unless it stalls after its lines."""
    sent = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent == len(pauses):
            if then_stall:
                await asyncio.sleep(30)  # the client stopped sending
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(pauses[sent])
        sent += 1
        line = orjson.dumps({"data": {"n": sent}}) + b"\n"
        return {"type": "http.request", "body": line, "more_body": True}

    return receive


async def test_a_stalled_body_is_ended_with_408_and_the_lines_before_are_kept(
    broker: Broker, topic: str
) -> None:
    ingest = ingest_of(broker, topic)
    started = time.monotonic()
    with pytest.raises(HttpProblem) as raised:
        await ingest.run(AsgiBody(body([0, 0], then_stall=True)))
    assert raised.value.status == 408
    assert IDLE_S <= time.monotonic() - started < IDLE_S + 2
    assert ingest.result.count == 2
    page = await broker.history(topic, None, 10)
    assert [orjson.loads(entry.data) for entry in page.events] == [{"n": 1}, {"n": 2}]
    # The task that timed out may go on (to answer): it is not left cancelled.
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0
    async with asyncio.timeout(1):
        await asyncio.sleep(0)


async def test_a_slow_but_steady_body_is_not_timed_out(broker: Broker, topic: str) -> None:
    """Lines 2/3 of the deadline apart, for several deadlines in all."""
    ingest = ingest_of(broker, topic)
    result = await ingest.run(AsgiBody(body([IDLE_S * 2 / 3] * 6, then_stall=False)))
    assert result.count == 6


async def test_a_line_growing_past_the_limit_stops_the_ingest_keeping_the_lines_before(
    broker: Broker, topic: str
) -> None:
    """A line that never ends (no line feed, longer than an event may be) is refused
    while it arrives, not buffered whole; the lines before it are stored."""
    reads = [orjson.dumps({"data": {"n": 1}}) + b"\n" + b'{"data": "', *[b"x" * 4096] * 10]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": reads.pop(0), "more_body": bool(reads)}

    ingest = ingest_of(broker, topic)
    with pytest.raises(TooLarge):
        await ingest.run(AsgiBody(receive))
    assert reads, "refused before the whole body was read"
    page = await broker.history(topic, None, 10)
    assert [orjson.loads(entry.data) for entry in page.events] == [{"n": 1}]


async def test_a_topic_closed_mid_ingest_is_409_saying_how_many_lines_were_stored(
    broker: Broker, topic: str
) -> None:
    """Another producer closed the topic while this ingest sent lines: the 409 named
    only the end, where a bad line's 400 says which lines were stored."""
    reads = [orjson.dumps({"data": {"n": n}}) + b"\n" for n in (1, 2, 3)]

    async def receive() -> dict[str, Any]:
        if len(reads) == 1:  # two lines stored; the topic is closed before the third
            await broker.close_topic(topic)
        return {"type": "http.request", "body": reads.pop(0), "more_body": bool(reads)}

    ingest = ingest_of(broker, topic)
    with pytest.raises(TopicClosed) as raised:
        await ingest.run(AsgiBody(receive))
    assert "2 line(s) stored before it closed" in str(raised.value)
    assert ingest.result.count == 2
