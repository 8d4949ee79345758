"""Expiry, per-topic policies and topic listing through a real ``broker serve``.

The keys are checked in Redis itself (SCAN), not through the broker: a topic that
"expired" for the broker but left keys behind would still fill Redis.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aredis

from tests.http.helpers import (
    SseStream,
    assert_problem,
    new_topic,
    publish_json,
    publish_many,
)
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer

POLICIES = [
    {"pattern": "chat:*", "ttl_seconds": 1, "maxlen": 5},
    {"pattern": "aged:*", "max_age_seconds": 1},
]
EXPIRY_DEADLINE_S = 4.0
"""How long after the TTL everything must be gone: Redis' active expiry samples keys
(~10 times a second) and the live reader looks 0.5 s after a topic's TTL."""


@pytest.fixture(scope="module")
def expiring_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """Every topic it publishes lives 1 s unused; ``chat:*`` and ``aged:*`` have policies."""
    env = {
        "BROKER_HEARTBEAT_SECONDS": "1",
        "BROKER_TOPIC_TTL_SECONDS": "1",
        "BROKER_TOPIC_POLICIES": json.dumps(POLICIES),
    }
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


@pytest.fixture(scope="module")
def policy_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """No global TTL: only the topics a policy names expire."""
    env = {"BROKER_HEARTBEAT_SECONDS": "1", "BROKER_TOPIC_POLICIES": json.dumps(POLICIES)}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def keys_of(client: aredis.Redis, topic: str) -> list[bytes]:
    return [key async for key in client.scan_iter(match=f"broker:{{{topic}}}*", count=1000)]


async def test_a_topic_goes_whole_after_its_ttl_and_its_subscriber_is_told(
    expiring_broker: BrokerProcess, redis_client: aredis.Redis
) -> None:
    topic = new_topic()
    async with (
        httpx.AsyncClient(base_url=expiring_broker.url, timeout=10) as client,
        SseStream(client, f"/topics/{topic}/events") as stream,
    ):
        [first] = await publish_many(client, topic, ["a"])
        await publish_json(client, topic, {"data": "b"}, headers={"Idempotency-Key": "k"})
        ingest = await client.post(
            f"/topics/{topic}/events",
            content=b'{"data": "c"}\n{"data": "d"}\n',
            headers={"Content-Type": "application/x-ndjson", "Idempotency-Key": "lines"},
        )
        assert ingest.status_code == 201, ingest.text
        published_at = time.monotonic()
        last = ingest.json()["ids"][-1]
        # log, meta, records and their times, an ingest's lines and their times
        assert len(await keys_of(redis_client, topic)) == 6
        events = [await stream.next() for _ in range(4)]
        assert events[0].id == first
        gap = await stream.next(1 + EXPIRY_DEADLINE_S)
        told_after = time.monotonic() - published_at
        assert gap.event == "broker.gap", gap
        assert json.loads(gap.data) == {
            "reason": "unknown",
            "requested": last,
            "resumed_after": None,
            "topic": topic,
        }
        assert told_after < 1 + EXPIRY_DEADLINE_S
        assert await keys_of(redis_client, topic) == []
        assert (await client.get(f"/topics/{topic}")).status_code == 404
        # A producer coming back with the same keys starts a new log: nothing is replayed.
        again = await client.post(
            f"/topics/{topic}/events", json={"data": "b2"}, headers={"Idempotency-Key": "k"}
        )
        assert again.status_code == 201 and again.json()["id"].split(".")[0] != first.split(".")[0]


async def test_a_closed_topic_expires_too(
    expiring_broker: BrokerProcess, redis_client: aredis.Redis
) -> None:
    topic = new_topic()
    async with httpx.AsyncClient(base_url=expiring_broker.url, timeout=10) as client:
        response = await client.post(f"/topics/{topic}/events?close=true", json={"data": 1})
        assert response.status_code == 201
        assert len(await keys_of(redis_client, topic)) == 2

        async def gone() -> bool:
            return not await keys_of(redis_client, topic)

        await await_until(gone, timeout=1 + EXPIRY_DEADLINE_S, what="closed topic expires")
        # A new log under the old name is open again.
        assert (await client.post(f"/topics/{topic}/events", json={"data": 2})).status_code == 201


async def test_a_policy_applies_to_its_pattern_only(
    policy_broker: BrokerProcess, redis_client: aredis.Redis
) -> None:
    chat, other = f"chat:{new_topic()}", new_topic()
    async with httpx.AsyncClient(base_url=policy_broker.url, timeout=10) as client:
        for topic in (chat, other):
            await publish_many(client, topic, list(range(20)))
        chat_info = (await client.get(f"/topics/{chat}")).json()
        other_info = (await client.get(f"/topics/{other}")).json()
        assert chat_info["length"] <= 5 + 1, chat_info  # maxlen 5 (trimmed in steps of 1)
        assert other_info["length"] == 20, other_info
        assert await redis_client.pttl(f"broker:{{{chat}}}:log") > 0
        assert await redis_client.pttl(f"broker:{{{other}}}:log") == -1  # kept

        async def chat_gone() -> bool:
            return not await keys_of(redis_client, chat)

        await await_until(chat_gone, timeout=1 + EXPIRY_DEADLINE_S, what="chat:* expires")
        assert len(await keys_of(redis_client, other)) == 2
        assert (await client.get(f"/topics/{other}")).json()["length"] == 20


async def test_max_age_holds_for_a_topic_nobody_publishes_to(policy_broker: BrokerProcess) -> None:
    """Age trimming on append alone would keep these forever: nothing is appended."""
    topic = f"aged:{new_topic()}"
    async with httpx.AsyncClient(base_url=policy_broker.url, timeout=10) as client:
        await publish_many(client, topic, ["old 1", "old 2"])
        history = f"/topics/{topic}/events"
        json_accept = {"Accept": "application/json"}
        assert len((await client.get(history, headers=json_accept)).json()["events"]) == 2

        async def aged_out() -> bool:
            page = (await client.get(history, headers=json_accept)).json()
            return page["events"] == []

        await await_until(aged_out, timeout=4, what="old events dropped on read", interval=0.2)
        info = (await client.get(f"/topics/{topic}")).json()
        assert info["length"] == 0 and info["first_id"] is None, info


# -- the settings stop `broker serve` at start ------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        '[{"pattern": "chat:*", "ttl": 1}]',  # an unknown key
        '[{"pattern": "chat/*", "ttl_seconds": 1}]',  # not a topic pattern
        '[{"pattern": "", "maxlen": 5}]',
        '[{"pattern": "chat:*", "maxlen": 0}]',
        '[{"pattern": "chat:*", "ttl_seconds": -1}]',
        '{"pattern": "chat:*"}',  # not a list
        "not json",
    ],
)
def test_a_bad_policy_stops_the_broker_at_start(value: str) -> None:
    process = BrokerProcess(env={"BROKER_TOPIC_POLICIES": value})
    try:
        with pytest.raises(RuntimeError, match="exited early") as failure:
            process.start(timeout=20)
        # (Not JSON at all is a pydantic-settings SettingsError, which api/cli.py does not
        # turn into its one-line message: the traceback names topic_policies.)
        assert "TOPIC_POLICIES" in str(failure.value).upper(), str(failure.value)[-2000:]
    finally:
        process.close()


# -- listing -------------------------------------------------------------------------


async def test_listing_topics_by_prefix_with_pages(http_broker: BrokerProcess) -> None:
    prefix = new_topic("list") + "-"
    names = [f"{prefix}{n:02}" for n in range(12)]
    async with httpx.AsyncClient(base_url=http_broker.url, timeout=10) as client:
        for name in names:
            await publish_many(client, name, [name])
        assert (await client.post(f"/topics/{names[0]}/close")).status_code == 201
        assert (await client.delete(f"/topics/{names[1]}")).status_code == 204
        await publish_many(client, f"x{prefix}", [1])  # the prefix is a prefix
        seen: list[dict[str, object]] = []
        params: dict[str, str] = {"prefix": prefix, "limit": "5"}
        for _ in range(1000):
            response = await client.get("/topics", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            assert set(page) == {"topics", "next"}
            assert len(page["topics"]) <= 5, page  # a page holds at most its limit
            seen += page["topics"]
            if page["next"] is None:
                break
            params["cursor"] = page["next"]
        else:
            raise AssertionError("listing never ended")
        by_name = {t["topic"]: t for t in seen}
        assert len(by_name) == len(seen) and sorted(by_name) == names[:1] + names[2:]
        for name, listed in by_name.items():
            assert set(listed) == {"topic", "length", "last_id", "closed"}
            assert listed["closed"] == (name == names[0])
            assert listed["length"] == (2 if name == names[0] else 1)
            info = (await client.get(f"/topics/{name}")).json()
            assert listed["last_id"] == info["last_id"]
        everything = (await client.get("/topics", params={"limit": "1000"})).json()
        assert everything["topics"] or everything["next"], "no prefix lists every topic"


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=1001", "limit=x", "prefix=a/b", "prefix=a%20b", "cursor=nope"],
)
async def test_listing_refuses_bad_parameters(http_broker: BrokerProcess, query: str) -> None:
    async with httpx.AsyncClient(base_url=http_broker.url, timeout=10) as client:
        assert_problem(await client.get(f"/topics?{query}"), 400)
