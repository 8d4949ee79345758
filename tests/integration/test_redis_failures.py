"""The core against a real redis-server that stops, restarts and loses its data."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis

from broker import Broker, EventId, NewEvent, StoreUnavailable
from broker import constants as c
from tests.support.redis_server import RedisServer
from tests.support.sse import Event, collect


def numbers(events: list[Event]) -> list[int]:
    return [int(e.data) for e in events if e.event is None]


async def publish_with_retry(broker: Broker, topic: str, n: int, deadline: float) -> EventId:
    """Publish like a client would: retry with one Idempotency-Key until acknowledged."""
    while True:
        try:
            result = await broker.publish(topic, [NewEvent(str(n))], idempotency_key=f"n{n}")
            return result.ids[0]
        except StoreUnavailable:
            assert time.monotonic() < deadline, "Redis did not come back"
            await asyncio.sleep(0.05)


async def test_live_subscribers_miss_nothing_across_a_restart_with_aof(
    private_broker: Broker, private_redis: RedisServer, topic: str
) -> None:
    await publish_with_retry(private_broker, topic, -1, time.monotonic() + 5)
    subscription = await private_broker.subscribe({topic: "now"})
    chunks = subscription.chunks()
    try:
        for n in range(10):
            await publish_with_retry(private_broker, topic, n, time.monotonic() + 5)
        assert numbers(await collect(chunks, lambda ev: 9 in numbers(ev))) == list(range(10))
        private_redis.restart(keep_data=True)
        deadline = time.monotonic() + 20
        for n in range(10, 20):
            await publish_with_retry(private_broker, topic, n, deadline)
        events = await collect(chunks, lambda ev: 19 in numbers(ev), timeout=20)
        assert numbers(events) == list(range(10, 20))
        assert not [e for e in events if e.event == "broker.gap"]
    finally:
        subscription.close()


async def test_a_restart_without_data_tells_subscribers_with_a_gap(
    private_broker: Broker, private_redis: RedisServer, topic: str
) -> None:
    await publish_with_retry(private_broker, topic, -1, time.monotonic() + 5)
    subscription = await private_broker.subscribe({topic: "now"})
    chunks = subscription.chunks()
    try:
        last = await publish_with_retry(private_broker, topic, 0, time.monotonic() + 5)
        assert numbers(await collect(chunks, lambda ev: 0 in numbers(ev))) == [0]
        private_redis.restart(keep_data=False)
        deadline = time.monotonic() + 20
        for n in range(1, 4):
            await publish_with_retry(private_broker, topic, n, deadline)
        events = await collect(chunks, lambda ev: 3 in numbers(ev), timeout=20)
        gaps = [e for e in events if e.event == "broker.gap"]
        assert len(gaps) == 1
        assert gaps[0].json["reason"] == "unknown"  # type: ignore[index]
        assert gaps[0].json["requested"] == str(last)  # type: ignore[index]
        assert numbers(events) == [1, 2, 3]
    finally:
        subscription.close()


async def test_publish_fails_fast_while_redis_is_down(
    private_broker: Broker, private_redis: RedisServer, topic: str
) -> None:
    private_redis.stop()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(private_broker.publish(topic, [NewEvent("1")]), 10)
    assert not await asyncio.wait_for(private_broker.ready(), 10)


async def test_redis_connections_do_not_grow_with_subscribers(
    private_broker: Broker, private_redis: RedisServer, topic: str
) -> None:
    probe = redis.Redis.from_url(private_redis.url)

    async def connections() -> int:
        return int((await probe.info("clients"))["connected_clients"])

    try:
        subscriptions = [
            await private_broker.subscribe({f"{topic}-{n % 30}": "now"}) for n in range(300)
        ]
        await private_broker.publish(f"{topic}-0", [NewEvent("1")])
        with_subscribers = await connections()
        more = [await private_broker.subscribe({f"{topic}-{n % 30}": "now"}) for n in range(300)]
        assert await connections() == with_subscribers
        # the command pool, the appends' connection, the live reader, the probe
        assert with_subscribers == c.REDIS_POOL_SIZE + 3
        for subscription in subscriptions + more:
            subscription.close()
        assert private_broker.hub.subscriber_count == 0
    finally:
        await probe.aclose()


async def test_the_client_failing_in_its_own_code_is_store_unavailable(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A redis-py failure that is none of its errors (an AttributeError on a connection
    it closed under a command: the Cluster client did) is the store failing: a 503 the
    publisher retries, not a 500; and it is logged with its traceback."""
    from broker.redis_open import open_store

    store = open_store(private_redis.url)
    try:

        async def failing() -> None:
            raise AttributeError("'NoneType' object has no attribute 'writelines'")

        with pytest.raises(StoreUnavailable, match="writelines"):
            await store._call(failing())  # type: ignore[attr-defined]
        refused = StoreUnavailable("not stored")
        with pytest.raises(StoreUnavailable) as raised:

            async def ours() -> None:
                raise refused

            await store._call(ours())  # type: ignore[attr-defined]
        assert raised.value is refused  # the store's own errors pass as they are
    finally:
        await store.close()
    assert any(r.exc_info for r in caplog.records if "failed unexpectedly" in r.getMessage())
