"""A subscriber that stops reading is disconnected; the others get everything; it resumes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.lean_stream import SEND_BUFFER_BYTES
from tests.http.conftest import SLOW
from tests.http.helpers import (
    RawResponse,
    metric_value,
    new_topic,
    small_window_stream,
    subscribe,
)
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer
from tests.support.sse import complete_events

EVENT_BYTES = 2000
BATCH = 20  # ~40 KB a request: well under the 128 KiB buffer of a subscriber that reads
MAX_BATCHES = 400  # ~16 MB at most before the slow one must have been dropped


@pytest.fixture(scope="module")
def slow_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    process = BrokerProcess(redis_url=redis_server.url, env=SLOW).start()
    yield process
    process.close()


async def _stalled_stream(url: str, path: str) -> RawResponse:
    """A subscription whose client reads its head and then nothing (tiny receive window)."""
    stream = await small_window_stream(url, path)
    await stream.read_until(b"\n\n")  # the retry hint: subscribed
    return stream


async def _metric(client: httpx.AsyncClient, name: str) -> float:
    return metric_value((await client.get("/metrics")).text, name) or 0.0


async def test_a_slow_subscriber_is_dropped_and_resumes_without_loss(
    slow_broker: BrokerProcess,
) -> None:
    topic = new_topic()
    async with httpx.AsyncClient(base_url=slow_broker.url, timeout=15) as client:
        dropped_before = await _metric(client, "broker_slow_subscribers_dropped_total")
        slow = await _stalled_stream(slow_broker.url, f"/topics/{topic}/events")
        try:
            async with subscribe(client, topic) as normal:
                published: list[str] = []
                for batch in range(MAX_BATCHES):
                    events = [
                        {"data": f"{batch}-{n}-" + "x" * EVENT_BYTES, "event": "bulk"}
                        for n in range(BATCH)
                    ]
                    answer = await client.post(f"/topics/{topic}/events", json=events)
                    assert answer.status_code == 201, answer.text
                    published += answer.json()["ids"]
                    if batch % 10 == 9:
                        dropped = await _metric(client, "broker_slow_subscribers_dropped_total")
                        if dropped > dropped_before:
                            break
                else:
                    pytest.fail(f"no subscriber was dropped after {len(published)} events")
                received = [e.id for e in await normal.take(len(published), timeout=20)]
                assert received == published, "the subscriber that reads got everything"
                assert not normal.ended.is_set()
                connected_while_stalled = await _metric(client, "broker_connected_subscribers")

            # Now the slow client reads what reached it: the stream must end, not go on.
            try:
                await slow.read_to_end(timeout=30)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # an abort is a disconnect too
            got = [e["id"] for e in complete_events(bytes(slow.body)) if "id" in e]
        finally:
            await slow.close()
        assert got == published[: len(got)], "what it got is a prefix, in order"
        assert len(got) < len(published)

        # Reconnecting with its last id loses nothing.
        async with subscribe(client, topic, last_event_id=got[-1] if got else None) as again:
            if not got:
                pytest.fail("the slow subscriber received no complete event")
            rest = [e.id for e in await again.take(len(published) - len(got), timeout=20)]
        assert got + rest == published
        assert connected_while_stalled == 1, (
            "while the dropped client was not reading, broker_connected_subscribers should "
            f"count only the subscriber that reads: got {connected_while_stalled}, expected 1"
        )


def _kernel_queue_of(server_port: int, client_port: int) -> int | None:
    """What the kernel holds unsent on the broker's side of one loopback connection (the
    send queue, /proc/net/tcp), None once it has no such socket."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(fields[n].split(":")[1], 16) for n in (1, 2))
        if (local, remote) == (server_port, client_port):
            return int(fields[4].split(":")[0], 16)
    return None


async def test_a_subscriber_that_stops_reading_holds_little_of_the_kernels_memory(
    slow_broker: BrokerProcess,
) -> None:
    """The buffer limit counts what waits in the process; the kernel's send buffer, left
    to grow, held up to 4 MB more for each client that stopped reading (310 of them:
    0.6 GB). Capped, what the client does not read waits where the limit counts it."""
    topic = new_topic()
    slow = await _stalled_stream(slow_broker.url, f"/topics/{topic}/events")
    client_port = slow.writer.get_extra_info("sockname")[1]
    most = 0
    try:
        async with httpx.AsyncClient(base_url=slow_broker.url, timeout=15) as client:
            dropped_before = await _metric(client, "broker_slow_subscribers_dropped_total")
            for batch in range(MAX_BATCHES):
                events = [{"data": f"{batch}-{n}-" + "x" * EVENT_BYTES} for n in range(BATCH)]
                answer = await client.post(f"/topics/{topic}/events", json=events)
                assert answer.status_code == 201, answer.text
                most = max(most, _kernel_queue_of(slow_broker.port, client_port) or 0)
                if await _metric(client, "broker_slow_subscribers_dropped_total") > dropped_before:
                    break
            else:
                pytest.fail("the subscriber that stopped reading was never dropped")
    finally:
        await slow.close()
    assert 0 < most <= 2 * SEND_BUFFER_BYTES + 65536, most


def test_slow_settings_are_what_the_test_assumes() -> None:
    assert int(SLOW["BROKER_SUBSCRIBER_BUFFER_BYTES"]) > 3 * BATCH * EVENT_BYTES
