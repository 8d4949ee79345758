"""A subscriber that reads slowly behind the shipped nginx and HAProxy configs, in front
of a real broker: cut by the broker, it loses nothing and gets nothing twice.

Between a slow client and the broker, a proxy holds the bytes of its own two sockets:
on loopback with Linux's defaults, a client that stops reading takes some 4 MB of
publishing before the broker sees it slow and drops it (directly, some 1.2 MB with
``BROKER_SUBSCRIBER_BUFFER_BYTES`` at 128 KiB). When the broker cuts the connection,
the proxy must pass the cut on, and the client come back through it with the id of
the last whole event it got, and miss nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.balancers import Balancer, running_balancer
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

BALANCERS: list[Balancer] = ["nginx", "haproxy"]
pytestmark = pytest.mark.e2e
SLOW = {"BROKER_HEARTBEAT_SECONDS": "1", "BROKER_SUBSCRIBER_BUFFER_BYTES": "131072"}


@pytest.fixture(scope="module")
def slow_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    process = BrokerProcess(redis_url=redis_server.url, env=SLOW).start()
    yield process
    process.close()


@pytest.mark.parametrize("kind", BALANCERS)
@pytest.mark.parametrize("topic_count", [1, 2])
async def test_a_slow_reader_behind_the_proxy_resumes_exactly(
    slow_broker: BrokerProcess, kind: Balancer, topic_count: int, tmp_path: Path
) -> None:
    topics = [f"behind-{kind}-{uuid.uuid4().hex[:12]}" for _ in range(topic_count)]
    with running_balancer(kind, [slow_broker.port], tmp_path) as port:
        async with httpx.AsyncClient(base_url=slow_broker.url, timeout=15) as client:
            flood = Flood(client, topics)
            starts = await flood.start_events()
            reader = SlowReader(port, stream_target(topics))
            await read_slowly_through_a_drop(reader, flood)
    for topic in topics:
        assert delivery_problems(flood.published[topic], reader.events, topic, starts[topic]) == []
    assert not [e for e in reader.events if e.get("event") == GAP_EVENT], "nothing was trimmed"
    assert reader.connections >= 2, f"the broker's cut never reached the reader through {kind}"
