"""What a listing costs Redis, with authorization on: it looks only where the caller's
topics can be (broker/listing.py).

An anonymous ``GET /topics?limit=1000`` over 200,000 topics ran 20 SCANs of 1,000 keys
a page, 400 to the end, for an empty answer: anyone could make the shared Redis work
for nothing. These brokers have no public topics, so that what a caller may see is
exactly its token's.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as redis
from redis.asyncio.client import Monitor

from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer
from tests.support.tokens import JWT_SETTINGS, claims, hs_token

MONITOR_LINES = 100_000  # far more than a listing's commands: a bound, never reached


@pytest.fixture(scope="module")
def private_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    process = BrokerProcess(redis_url=redis_server.url, env=dict(JWT_SETTINGS)).start()
    yield process
    process.close()


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    async with redis.Redis.from_url(redis_server.url) as client:
        yield client


def bearer(rights: dict[str, list[str]]) -> dict[str, str]:
    return {"Authorization": f"Bearer {hs_token(claims(**rights))}"}


async def publish_each(url: str, topics: list[str]) -> None:
    headers = bearer({"publish": topics})
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for topic in topics:
            response = await client.post(
                f"/topics/{topic}/events", json={"data": 1}, headers=headers
            )
            assert response.status_code == 201, response.text


async def list_every_page(url: str, headers: dict[str, str], limit: int) -> list[str]:
    """Every topic listed, following ``next``; each page within its limit."""
    listed: list[str] = []
    cursor = ""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(10_000):
            params = {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
            response = await client.get("/topics", params=params, headers=headers)
            assert response.status_code == 200, response.text
            page = response.json()
            assert len(page["topics"]) <= limit, page
            listed += [topic["topic"] for topic in page["topics"]]
            cursor = page["next"] or ""
            if not cursor:
                return listed
    raise AssertionError("the listing never ended")


async def scans_until(monitor: Monitor, admin: redis.Redis, marker: str) -> list[list[str]]:
    """The SCANs the server ran since the last call, each as its words (MONITOR shows
    commands in the order the server ran them: up to a marker sent after)."""
    await admin.echo(marker)
    scans: list[list[str]] = []
    async with asyncio.timeout(30):
        for _ in range(MONITOR_LINES):
            seen: Any = await monitor.next_command()
            words = seen["command"].split()
            if words[0].upper() == "ECHO" and words[1:] == [marker]:
                return scans
            if words[0].upper() == "SCAN":
                scans.append(words)
    raise AssertionError(f"MONITOR never showed {marker}")


@pytest.mark.parametrize(
    "rights",
    [{}, {"publish": ["*"], "subscribe": []}],
    ids=["anonymous", "a token to subscribe to nothing"],
)
async def test_a_caller_who_may_subscribe_to_nothing_costs_redis_no_scan(
    private_broker: BrokerProcess, admin: redis.Redis, rights: dict[str, list[str]]
) -> None:
    """It is answered an empty, last page; it was a page of SCANs and a ``next``."""
    await publish_each(private_broker.url, [f"hidden-{uuid.uuid4().hex[:8]}"])
    headers = bearer(rights) if rights else {}
    async with admin.monitor() as monitor:
        async with httpx.AsyncClient(base_url=private_broker.url, timeout=10) as client:
            response = await client.get("/topics", params={"limit": "1000"}, headers=headers)
        scans = await scans_until(monitor, admin, f"listed-{uuid.uuid4().hex}")
    assert response.json() == {"topics": [], "next": None}
    assert scans == []


async def test_a_listing_walks_only_where_the_tokens_topics_can_be(
    private_broker: BrokerProcess, admin: redis.Redis
) -> None:
    """A token for ``t<run>.*`` and one exact name: every SCAN matches only the keys of
    topics starting ``t<run>.`` (it matched every topic's, 1,000 keys a step for the
    broker to read and drop), the exact name is looked up (no SCAN for it), and the
    pages, followed to the end, list each of the token's topics once and no other."""
    run = uuid.uuid4().hex[:8]
    tenant = [f"t{run}.{n}" for n in range(7)]
    solo, others = f"solo-{run}", [f"t{run}-not.{n}" for n in range(5)]
    await publish_each(private_broker.url, [*tenant, solo, *others, f"x{run}"])
    headers = bearer({"subscribe": [f"t{run}.*", solo, f"x{run}[*"]})  # ("[": no topic)
    async with admin.monitor() as monitor:
        listed = await list_every_page(private_broker.url, headers, limit=2)
        scans = await scans_until(monitor, admin, f"listed-{run}")
    assert sorted(listed) == sorted([*tenant, solo]), listed
    assert len(listed) == len(set(listed)), "a topic was listed twice"
    assert scans, "no SCAN: the prefix was not walked"
    for words in scans:
        assert words[words.index("MATCH") + 1] == f"broker:{{t{run}.*}}:meta", words
