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

from collections.abc import Iterator

import httpx
import pytest

from tests.http.conftest import SLOW
from tests.http.helpers import new_topic
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer
from tests.support.slow_reader import (
    GAP_EVENT,
    Flood,
    SlowReader,
    delivery_problems,
    read_slowly_through_a_drop,
    stream_target,
)

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
