"""The live reader's lanes: with many live topics, a topic coming re-arms one lane's
XREAD (at most LIVE_LANE_TOPICS keys), not one XREAD over every live topic; and every
entry of every lane is read once."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as redis

from broker import constants as c
from broker.ids import StreamPosition
from broker.model import NewEvent
from broker.redis_store import RedisStreamStore

TOPICS = 2 * c.LIVE_LANE_TOPICS + 44  # three lanes, the last with room


def _topics(count: int) -> list[str]:
    prefix = uuid.uuid4().hex[:8]
    return [f"lanes-{prefix}-{i}" for i in range(count)]


@pytest.fixture
def xread_keys(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of keys each XREAD named, in order."""
    named: list[int] = []
    original = redis.Redis.xread

    async def counting(self: redis.Redis, streams: Any, *args: Any, **kwargs: Any) -> Any:
        named.append(len(streams))
        return await original(self, streams, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "xread", counting)
    return named


async def _read_until(
    store: RedisStreamStore, positions: dict[str, StreamPosition], wanted: int
) -> dict[str, list[str]]:
    """Read as the hub does (positions moved past what was read) until `wanted`
    entries came; bounded in time."""
    got: dict[str, list[str]] = {}
    deadline = time.monotonic() + 10
    while sum(len(ids) for ids in got.values()) < wanted:
        assert time.monotonic() < deadline, got
        for topic, entries in (await store.read_live(positions, 500)).items():
            got.setdefault(topic, []).extend(str(e.id) for e in entries)
            positions[topic] = entries[-1].position
    return got


async def test_a_new_topic_rearms_one_lane_not_every_topic(
    store: RedisStreamStore, xread_keys: list[int]
) -> None:
    topics = _topics(TOPICS + 1)
    positions: dict[str, StreamPosition] = {t: (0, 0) for t in topics[:-1]}
    assert await store.read_live(positions, 50) == {}  # every lane armed, nothing came
    xread_keys.clear()
    newcomer = topics[-1]
    positions[newcomer] = (0, 0)
    await store.append(newcomer, [NewEvent(data='"first"')])
    got = await _read_until(store, positions, 1)
    assert list(got) == [newcomer]
    assert xread_keys and max(xread_keys) <= c.LIVE_LANE_TOPICS, xread_keys


async def test_entries_of_topics_on_every_lane_arrive_once(store: RedisStreamStore) -> None:
    topics = _topics(TOPICS)
    positions: dict[str, StreamPosition] = {t: (0, 0) for t in topics}
    assert await store.read_live(positions, 50) == {}
    for round_ in range(2):
        appended = await asyncio.gather(
            *(store.append(t, [NewEvent(data=str(round_))]) for t in topics)
        )
        got = await _read_until(store, positions, len(topics))
        assert got == {t: [str(r.ids[0])] for t, r in zip(topics, appended, strict=True)}
