"""The core on a real redis-server at its memory limit, and on one that may evict keys.

At ``maxmemory`` with ``noeviction`` Redis refuses writes: an append is refused
whole ("Store full"), reads go on. Any other policy evicts the broker's keys one by
one, which nothing can tell a client of: the store does not open on such a Redis,
and refuses writes if the policy changes under it, unless told to allow it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from broker import Broker, BrokerLimits, NewEvent
from broker import constants as c
from broker.errors import StoreFull, StoreMisconfigured
from broker.redis_open import open_store
from broker.redis_store import RedisStreamStore
from tests.integration.test_ingest_lines_lost import LineByLine, keyless_ingest
from tests.support.redis_server import RedisServer
from tests.support.sse import collect


@pytest.fixture
async def store(private_redis: RedisServer) -> AsyncIterator[RedisStreamStore]:
    instance = open_store(private_redis.url)
    await instance.open()
    yield instance
    await instance.close()


async def out_of_memory(redis_admin: redis.Redis) -> None:
    """Redis at its limit: every write that could grow memory is refused."""
    await redis_admin.config_set("maxmemory-policy", "noeviction")
    await redis_admin.config_set("maxmemory", 1)


def new_topic() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


async def test_a_new_topic_first_publish_is_refused_whole_when_redis_is_full(
    store: RedisStreamStore, redis_admin: redis.Redis
) -> None:
    # (its first write was a DEL, which Redis lets through at the limit, and with it
    # the whole script: memory grew without bound, one new topic at a time)
    await out_of_memory(redis_admin)
    topic = new_topic()
    with pytest.raises(StoreFull):
        await store.append(topic, [NewEvent("x" * 60_000)] * 8)
    assert await redis_admin.keys(f"*{topic}*") == []


async def test_a_publish_refused_for_memory_is_a_full_store_and_says_no_internals(
    store: RedisStreamStore, redis_admin: redis.Redis
) -> None:
    topic = new_topic()
    await store.append(topic, [NewEvent("1")])
    await out_of_memory(redis_admin)
    with pytest.raises(StoreFull) as refused:
        await store.append(topic, [NewEvent("2"), NewEvent("3")], idempotency_key="k")
    assert refused.value.retry_after > 1
    assert "script" not in refused.value.detail and "maxmemory" in refused.value.detail
    assert await redis_admin.xlen(store_key(topic)) == 1  # nothing of the batch
    await redis_admin.config_set("maxmemory", 0)
    stored = await store.append(topic, [NewEvent("2"), NewEvent("3")], idempotency_key="k")
    assert not stored.replayed and len(stored.ids) == 2


async def test_subscribers_resume_and_read_while_redis_is_full(
    private_redis: RedisServer, redis_admin: redis.Redis
) -> None:
    broker = Broker(open_store(private_redis.url), limits=BrokerLimits(heartbeat_seconds=0.5))
    await broker.start()
    try:
        topic = new_topic()
        first = await broker.publish(topic, [NewEvent(str(n)) for n in range(3)])
        await out_of_memory(redis_admin)
        subscription = await broker.subscribe({topic: first.ids[0]})
        try:
            events = await collect(subscription.chunks(), lambda got: len(got) >= 2)
            assert [e.data for e in events] == ["1", "2"]
        finally:
            subscription.close()
        page = await broker.history(topic, after=None, limit=10)
        assert [e.data for e in page.events] == [b"0", b"1", b"2"]
    finally:
        await broker.close()


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "volatile-ttl"])
async def test_the_store_does_not_open_on_a_redis_that_may_evict(
    private_redis: RedisServer, redis_admin: redis.Redis, policy: str
) -> None:
    await redis_admin.config_set("maxmemory", 100 * 1024 * 1024)
    await redis_admin.config_set("maxmemory-policy", policy)
    store = open_store(private_redis.url)
    try:
        with pytest.raises(StoreMisconfigured, match=f"maxmemory-policy {policy}"):
            await store.open()
    finally:
        await store.close()


async def test_the_store_opens_on_an_evicting_redis_when_allowed_or_without_a_limit(
    private_redis: RedisServer, redis_admin: redis.Redis
) -> None:
    await redis_admin.config_set("maxmemory-policy", "allkeys-lru")  # no maxmemory: never evicts
    for allow, limit in ((False, 0), (True, 100 * 1024 * 1024)):
        await redis_admin.config_set("maxmemory", limit)
        store = open_store(private_redis.url, allow_eviction=allow)
        try:
            await store.open()
            assert (await store.append(new_topic(), [NewEvent("1")])).ids
        finally:
            await store.close()


async def test_writes_are_refused_while_the_policy_set_under_it_evicts(
    store: RedisStreamStore, redis_admin: redis.Redis
) -> None:
    topic = new_topic()
    await store.append(topic, [NewEvent("1")])
    await redis_admin.config_set("maxmemory", 100 * 1024 * 1024)
    await redis_admin.config_set("maxmemory-policy", "allkeys-lru")
    await store._eviction.check()  # (what its watch does every EVICTION_CHECK_S)
    with pytest.raises(StoreMisconfigured) as refused:
        await store.append(topic, [NewEvent("2")])
    assert refused.value.retry_after > 1
    assert await redis_admin.xlen(store_key(topic)) == 1
    await redis_admin.config_set("maxmemory-policy", "noeviction")
    await store._eviction.check()
    assert (await store.append(topic, [NewEvent("2")])).ids


async def test_a_redis_user_that_may_not_read_info_is_warned_of_not_refused(
    private_redis: RedisServer, redis_admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await redis_admin.acl_setuser(
        "broker", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all", "-info"]
    )
    url = f"redis://broker:secret@127.0.0.1:{private_redis.port}/0"
    store = open_store(url)
    try:
        with caplog.at_level(logging.WARNING, logger="broker.redis_checks"):
            await store.open()
        assert "cannot read maxmemory-policy" in caplog.text
        assert (await store.append(new_topic(), [NewEvent("1")])).ids
    finally:
        await store.close()


def store_key(topic: str) -> str:
    return c.topic_keys(topic)[0]


async def test_an_ingests_close_refused_as_redis_may_evict_says_the_topic_was_not_closed(
    private_broker: Broker, redis_admin: redis.Redis
) -> None:
    """``?close=true``: the lines stored, then the policy set to evict under it, so the
    store refuses the close before sending anything (``StoreMisconfigured``). The
    ingest said of it, as of a store that did not answer, that the close "may have
    landed": it was not sent, and the topic is open. Now it says so; the error keeps
    the store's class and its ``Retry-After``."""
    topic = new_topic()
    ingest = keyless_ingest(private_broker, topic)
    assert (await ingest.run(LineByLine(2, {}))).count == 2
    await redis_admin.config_set("maxmemory", 100 * 1024 * 1024)
    await redis_admin.config_set("maxmemory-policy", "allkeys-lru")
    await private_broker.store._eviction.check()  # type: ignore[attr-defined]
    try:
        with pytest.raises(StoreMisconfigured) as refused:
            await ingest.close_topic()
    finally:
        await redis_admin.config_set("maxmemory-policy", "noeviction")
        await private_broker.store._eviction.check()  # type: ignore[attr-defined]
    detail = refused.value.detail
    assert "the topic was not closed (the close was not sent)" in detail, detail
    assert "may have landed" not in detail and "2 line(s) stored" in detail, detail
    assert refused.value.retry_after == c.EVICTING_RETRY_AFTER_S
    assert not (await private_broker.topic_info(topic)).closed  # (open, as said)
