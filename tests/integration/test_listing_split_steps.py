"""Listing pages small enough that SCAN steps are split across them (``limit`` 1-3: a
step at COUNT 1, one bucket, often holds more topics than that), with the keyspace
grown and shrunk between pages (Redis rehashing it reorders and regroups a step), on one
Redis and on a Cluster of three primaries, with a caller who may see only some topics
(``shown``): every topic there all along that the caller may see is listed, none it may
not see is named in a page or a cursor, every cursor is one the HTTP route takes
(``api.routes._LIST_CURSOR``), and each walk ends within a bounded number of pages; with
``LIST_STEP_SHOWN_MAX`` 1, the rest of a step past one name shown in one page. On the code
before 0122c18 (a split step gone on by place) it fails: a topic skipped.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from api.routes import _LIST_CURSOR
from broker import Broker
from broker import constants as c
from broker.model import NewEvent
from broker.redis_open import open_store
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import RedisClusterGroup

LISTINGS = 25
TOPICS = 24
MAX_PAGES = 400  # (24 topics, 8 hidden, pages of one: well past any walk that ends)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterGroup]:
    group = RedisClusterGroup(masters=3).start()
    try:
        yield group
    finally:
        group.close()


async def walk(
    broker: Broker, admins: list[Any], prefix: str, limit: int, rng: random.Random
) -> tuple[list[str], list[str | None]]:
    """One listing followed to its end, the keyspace (and some topics: ``t``, neither
    there all along nor named by the caller's assertions) changed between its pages: the
    topics listed, and the cursors handed back."""
    shown = lambda name: not name.endswith("h")  # noqa: E731 (the caller's rights)
    seen: list[str] = []
    cursors: list[str | None] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        page, cursor = await broker.list_topics(prefix, cursor, limit=limit, shown=shown)
        assert len(page) <= limit or c.LIST_STEP_SHOWN_MAX < 16, (limit, page)
        seen += [info.topic for info in page]
        cursors.append(cursor)
        if cursor is None:
            return seen, cursors
        admin = admins[rng.randrange(len(admins))]
        if rng.random() < 0.3:  # (a topic that comes and goes: perhaps one the cursor names)
            transient = f"{prefix}t{rng.randrange(4)}{rng.choice('hv')}"
            if rng.random() < 0.5:
                await broker.publish(transient, [NewEvent(data="1")])
            else:
                await broker.store.delete(transient)
        if rng.random() < 0.5:  # (grown: a rehash)
            batch = rng.randrange(1, 60)
            await admin.mset({f"more:{uuid.uuid4().hex}:{n}": 1 for n in range(batch)})
        elif rng.random() < 0.5:  # (shrunk)
            keys = [k async for k in admin.scan_iter(match="more:*", count=500)]
            if keys:
                for key in rng.sample(keys, min(len(keys), rng.randrange(1, 60))):
                    await admin.delete(key)
    raise AssertionError(f"the walk did not end in {MAX_PAGES} pages: {cursors[-5:]}")


async def listings(url: str, admins: list[Any], seed: int) -> None:
    rng = random.Random(seed)
    broker = Broker(open_store(url))
    await broker.start()
    try:
        for listing in range(LISTINGS):
            for admin in admins:  # (a small keyspace: buckets of several topics)
                await admin.flushall()
            prefix = f"s{uuid.uuid4().hex[:6]}-"
            names = [f"{prefix}{n:02d}{'h' if n % 3 == 0 else 'v'}" for n in range(TOPICS)]
            for name in names:
                await broker.publish(name, [NewEvent(data="1")])
            limit = rng.choice([1, 1, 2, 3])
            seen, cursors = await walk(broker, admins, prefix, limit, rng)
            visible = {n for n in names if n.endswith("v")}
            assert visible <= set(seen), (listing, limit, visible - set(seen))
            assert not any(n.endswith("h") for n in seen), seen
            for cursor in cursors:
                assert cursor is None or _LIST_CURSOR.fullmatch(cursor), cursor
                assert cursor is None or "h," not in cursor + ",", cursor
    finally:
        await broker.close()


@pytest.mark.parametrize("step_shown_max", [c.LIST_STEP_SHOWN_MAX, 1])
async def test_split_steps_skip_nothing_and_name_nothing_hidden_on_one_redis(
    private_redis: RedisServer, step_shown_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(c, "LIST_STEP_SHOWN_MAX", step_shown_max)
    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        await listings(private_redis.url, [admin], seed=1)
    finally:
        await admin.aclose()


@pytest.mark.parametrize("step_shown_max", [c.LIST_STEP_SHOWN_MAX, 1])
async def test_split_steps_skip_nothing_and_name_nothing_hidden_on_a_cluster(
    cluster: RedisClusterGroup, step_shown_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(c, "LIST_STEP_SHOWN_MAX", step_shown_max)
    admins = [aioredis.Redis(port=port) for port in cluster.servers]
    try:
        # (each admin writes keys of every slot: MSET of one node's slots only)
        node_admins = [_OneNode(admin) for admin in admins]
        await listings(cluster.url, node_admins, seed=2)
    finally:
        for admin in admins:
            await admin.aclose()


class _OneNode:
    """A node's client that writes only the keys of its own slots (a Cluster node
    refuses the others: MOVED)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    async def mset(self, mapping: dict[str, int]) -> None:
        for key, value in mapping.items():
            try:
                await self._client.set(key, value)
            except aioredis.ResponseError:
                pass  # (another node's slot)

    async def flushall(self) -> None:
        await self._client.flushall()

    def scan_iter(self, **options: Any) -> Any:
        return self._client.scan_iter(**options)

    async def delete(self, key: Any) -> None:
        await self._client.delete(key)
