"""Subscribers that read slower than events come, cut by the broker, lose nothing.

test_slow_subscriber stalls its client (it reads nothing) and resumes it once. A
phone on a bad network reads, only too slowly: it is behind when the broker cuts
it, often in the middle of a frame, and it comes back with the id of the last
whole event it got, again and again if need be. These read at a bounded pace from
a socket with a small receive buffer, on every route a stream is served by, and
judge what they got strictly: every published event once, in order, its data
whole, or a ``broker.gap`` asked from exactly where the reader was.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import httpx
import pytest

from tests.http.conftest import SLOW
from tests.http.helpers import new_topic
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer
from tests.support.slow_reader import (
    GAP_EVENT,
    Flood,
    SlowReader,
    delivery_problems,
    done_with,
    read_slowly_through_a_drop,
    stream_target,
)

# One publish of ~1 MB, under the 1 MiB body limit: past what the kernel's buffers of
# both ends take (some 0.5 MB), by several times the 128 KiB subscriber buffer.
BURST_EVENTS = 900
BURST_EVENT_BYTES = 1000
RETAINED = 200  # events of a trimmed topic: far fewer than a cut reader is behind
PIPELINED = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture(scope="module")
def slow_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    process = BrokerProcess(redis_url=redis_server.url, env=SLOW).start()
    yield process
    process.close()


@pytest.fixture(scope="module")
def trimming_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    env = {**SLOW, "BROKER_RETENTION_MAXLEN": str(RETAINED)}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


async def _slow_reader_run(
    broker: BrokerProcess, topics: list[str], http_version: str = "1.1", after_head: bytes = b""
) -> tuple[SlowReader, Flood, dict[str, str]]:
    target = stream_target(topics)
    reader = SlowReader(broker.port, target, http_version=http_version, after_head=after_head)
    async with httpx.AsyncClient(base_url=broker.url, timeout=15) as client:
        flood = Flood(client, topics)
        starts = await flood.start_events()
        await read_slowly_through_a_drop(reader, flood)
    return reader, flood, starts


ROUTES = {  # (HTTP version, what follows the head)
    "on the connection": ("1.1", b""),
    "HTTP/1.0": ("1.0", b""),
    "by uvicorn": ("1.1", PIPELINED),  # a request pipelined behind: the ASGI response
}


@pytest.mark.parametrize("route", ROUTES)
async def test_a_slow_reader_cut_by_the_broker_resumes_exactly(
    slow_broker: BrokerProcess, route: str
) -> None:
    topic = new_topic("slow")
    reader, flood, starts = await _slow_reader_run(slow_broker, [topic], *ROUTES[route])
    assert delivery_problems(flood.published[topic], reader.events, topic, starts[topic]) == []
    assert not [e for e in reader.events if e.get("event") == GAP_EVENT], "nothing was trimmed"
    assert reader.connections >= 2, "the broker never cut the slow reader"


async def test_a_slow_reader_behind_retention_is_told_what_was_trimmed(
    trimming_broker: BrokerProcess,
) -> None:
    """MAXLEN trims what the cut reader had not read yet: it is told ``trimmed``, asked
    from exactly the last event it got, and goes on from exactly the oldest one left."""
    topic = new_topic("slow")
    reader, flood, starts = await _slow_reader_run(trimming_broker, [topic])
    assert delivery_problems(flood.published[topic], reader.events, topic, starts[topic]) == []
    gaps = [e for e in reader.events if e.get("event") == GAP_EVENT]
    assert gaps, "the cut reader was more than the retained events behind: it must be told"
    assert all('"reason":"trimmed"' in gap["data"] for gap in gaps), gaps


async def test_a_slow_reader_of_several_topics_resumes_each_exactly(
    slow_broker: BrokerProcess,
) -> None:
    """A multi-topic stream's ids are cursors naming every topic: the one it comes back
    with resumes each topic at the last event it got of it."""
    topics = [new_topic("slow"), new_topic("slow")]
    reader, flood, starts = await _slow_reader_run(slow_broker, topics)
    for topic in topics:
        assert delivery_problems(flood.published[topic], reader.events, topic, starts[topic]) == []
    assert reader.connections >= 2, "the broker never cut the slow reader"
    assert all("~" in resumed for resumed in reader.resumed_from), reader.resumed_from


async def test_a_reader_paused_through_a_burst_is_dropped_by_the_clock_and_resumes_exactly(
    slow_broker: BrokerProcess,
) -> None:
    """One burst (one live read) is taken whole, and no event follows it: only the
    heartbeat clock can find that its reader, paused, took none of it. Dropped so,
    the reader reads on what reached it, then comes back from its last whole event."""
    topic = new_topic("paused")
    reader = SlowReader(slow_broker.port, stream_target([topic]))
    async with httpx.AsyncClient(base_url=slow_broker.url, timeout=15) as client:
        flood = Flood(client, [topic], event_bytes=BURST_EVENT_BYTES, batch=BURST_EVENTS)
        starts = await flood.start_events()
        reading = asyncio.create_task(reader.read_until(done_with([topic]), timeout=30))
        try:
            await await_until(
                lambda: bool(reader.events), timeout=5, what="its start event", worker=reading
            )
            reader.reading.clear()
            dropped_before = await flood.dropped()
            await flood.batches(1)

            async def dropped() -> bool:
                return await flood.dropped() > dropped_before

            # (The clock ticks every third of the 1 s heartbeat.)
            await await_until(dropped, timeout=10, what="the clock to drop the paused reader")
            reader.reading.set()
            reader.hurry.set()
            await flood.done()
            await reading
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    assert delivery_problems(flood.published[topic], reader.events, topic, starts[topic]) == []
    assert reader.connections >= 2, "the paused reader was never cut"
