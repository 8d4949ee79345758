"""Redis beyond one server: replicated durability, Sentinel failover, Redis Cluster."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker import Broker, NewEvent, StoreUnavailable
from broker.redis_store import open_store
from tests.support.redis_server import RedisServer
from tests.support.sse import collect


@pytest.fixture
def primary_and_replica() -> tuple[RedisServer, RedisServer]:  # type: ignore[misc]
    primary = RedisServer(extra_args=["--repl-diskless-sync-delay", "0"]).start()
    replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(primary.port)]).start()
    yield primary, replica
    replica.close()
    primary.close()


async def wait_for_replica(primary: RedisServer) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(primary.url)
    try:
        async with asyncio.timeout(15):
            while (await client.info("replication")).get("slave0", {}).get("state") != "online":
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def test_a_replicated_publish_waits_for_a_replica(
    primary_and_replica: tuple[RedisServer, RedisServer], topic: str
) -> None:
    primary, replica = primary_and_replica
    await wait_for_replica(primary)
    store = open_store(primary.url, durability="replicated")
    try:
        first = await store.append(topic, [NewEvent("1")], idempotency_key="a")
        assert not first.replayed
        replica.stop()
        with pytest.raises(StoreUnavailable, match="replica"):
            await store.append(topic, [NewEvent("2")], idempotency_key="b")
        replica.start()
        await wait_for_replica(primary)
        again = await store.append(topic, [NewEvent("2")], idempotency_key="b")
        assert again.replayed  # it was stored on the primary; now a replica confirms it
        assert (await store.state(topic)).length == 2
    finally:
        await store.close()
