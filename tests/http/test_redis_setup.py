"""A broker process on a real redis-server set up in a way it cannot work with.

Full (``noeviction``): a publish is 503 "Store full" with a Retry-After, nothing of it
stored. Evicting: ``broker serve`` does not start (evicted keys lose or repeat events,
and nothing could tell a client), unless ``BROKER_REDIS_EVICTION=allow``. A password
or a right that is wrong: it does not start either, naming it.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import redis.asyncio as redis

from tests.http.helpers import assert_problem, new_topic
from tests.http.test_ingest import RawIngest, history, line
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer

EVICTING = ["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"]


@pytest.mark.parametrize("workers", [1, 2])
def test_broker_serve_does_not_start_on_a_redis_that_may_evict(workers: int) -> None:
    """With workers, the supervisor stops too (it started another worker twice a
    second, each failing alike, and never exited)."""
    server = RedisServer(appendonly=False, extra_args=EVICTING).start()
    try:
        broker = BrokerProcess(redis_url=server.url, workers=workers)
        with pytest.raises(RuntimeError, match="broker exited early") as failed:
            broker.start()
        said = str(failed.value)
        assert "maxmemory-policy allkeys-lru" in said and "BROKER_REDIS_EVICTION" in said, said
        assert "starting another" not in said, said
        assert "Traceback" not in said, said  # (the reason, in one line)
        allowed = BrokerProcess(redis_url=server.url, env={"BROKER_REDIS_EVICTION": "allow"})
        allowed.start()
        try:
            published = httpx.post(f"{allowed.url}/topics/{new_topic()}/events", json={"data": 1})
            assert published.status_code == 201, published.text
        finally:
            allowed.close()
    finally:
        server.close()


async def test_a_publish_to_a_full_redis_is_503_store_full(
    private_redis: RedisServer, redis_admin: redis.Redis
) -> None:
    broker = BrokerProcess(redis_url=private_redis.url).start()
    try:
        await redis_admin.config_set("maxmemory", 1)  # (noeviction: Redis's default)
        topic = new_topic()
        async with httpx.AsyncClient(base_url=broker.url, timeout=10) as client:
            for body in ({"data": 1}, [{"data": 1}, {"data": 2}]):
                refused = await client.post(f"/topics/{topic}/events", json=body)
                problem = assert_problem(refused, 503)
                assert problem["type"].endswith("#store-full"), problem
                assert "script" not in problem["detail"], problem
                assert refused.headers["retry-after"] == "5"
            await redis_admin.config_set("maxmemory", 0)
            assert (
                await client.post(f"/topics/{topic}/events", json={"data": 3})
            ).status_code == 201
            assert [e["data"] for e in await history(client, topic)] == [3]
    finally:
        broker.close()


async def test_an_ingest_cut_by_a_full_redis_says_what_it_stored(
    private_redis: RedisServer, redis_admin: redis.Redis
) -> None:
    """A producer without an Idempotency-Key learns which lines were stored (it was
    told only that Redis refused, and sent the stored lines again)."""
    broker = BrokerProcess(redis_url=private_redis.url).start()
    try:
        topic = new_topic()
        ingest = await RawIngest.open(broker, topic)
        await ingest.send(line(1) + line(2) + line(3))
        async with httpx.AsyncClient(base_url=broker.url, timeout=10) as client:
            for _ in range(100):
                stored = await history(client, topic)
                if len(stored) == 3:
                    break
                await asyncio.sleep(0.05)
        await redis_admin.config_set("maxmemory", 1)
        await ingest.send(line(4))
        answer = await ingest.answer()
        assert answer.status == 503, answer.body
        assert answer.headers["connection"] == "close"
        problem = json.loads(answer.body)
        assert problem["title"] == "Store full", problem
        assert f"3 line(s) stored, the last {stored[-1]['id']}" in problem["detail"], problem
        ingest.cut()
    finally:
        await redis_admin.config_set("maxmemory", 0)
        broker.close()


async def test_broker_serve_does_not_start_with_a_wrong_password(
    private_redis: RedisServer, redis_admin: redis.Redis
) -> None:
    """It started, said ready, and answered every publish 503 (hosted-Redis audit)."""
    await redis_admin.config_set("requirepass", "right")
    url = f"redis://:wrong@127.0.0.1:{private_redis.port}/0"
    with pytest.raises(RuntimeError, match="broker exited early") as failed:
        await asyncio.to_thread(BrokerProcess(redis_url=url).start)
    said = str(failed.value)
    assert "redis refuses what the broker needs" in said and "Redis permissions" in said, said
    assert "wrong" not in said.replace("wrongpass", ""), said  # (the password is not shown)
