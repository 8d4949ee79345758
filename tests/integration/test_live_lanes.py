"""The live reader's lanes: with many live topics, a topic coming re-arms one lane's
XREAD (at most LIVE_LANE_TOPICS keys), not one XREAD over every live topic; and every
entry of every lane is read once."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import hiredis
import pytest
import redis.asyncio as redis

from broker import Broker, StoreUnavailable, redis_live_links
from broker import constants as c
from broker.ids import StreamPosition
from broker.model import NewEvent
from broker.redis_open import open_store
from broker.redis_store import RedisStreamStore
from tests.support.redis_server import RedisServer
from tests.support.sse import collect

TOPICS = 2 * c.LIVE_LANE_TOPICS + 44  # three lanes, the last with room


def _topics(count: int) -> list[str]:
    prefix = uuid.uuid4().hex[:8]
    return [f"lanes-{prefix}-{i}" for i in range(count)]


@pytest.fixture
def xread_keys(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of keys each XREAD named, in order (on either kind of lane link: a raw
    one is sent the command packed, a client one its arguments)."""
    named: list[int] = []
    head = redis_live_links.XREAD_HEAD
    for link in (redis_live_links.RawLink, redis_live_links.ClientLink):
        original = link.call

        async def counting(self: Any, command: Any, original: Any = original) -> Any:
            arguments = _unpacked(command) if isinstance(command, bytes) else command
            if tuple(arguments[: len(head)]) in (head, tuple(str(a).encode() for a in head)):
                named.append((len(arguments) - len(head)) // 2)
            return await original(self, command)

        monkeypatch.setattr(link, "call", counting)
    return named


def _unpacked(command: bytes) -> list[bytes]:
    """A packed command's arguments (an array of bulk strings, read as a reply is)."""
    reader = hiredis.Reader()
    reader.feed(command)
    arguments: list[bytes] = reader.gets()
    return arguments


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


async def test_lanes_read_again_after_redis_restarts(private_redis: RedisServer) -> None:
    """Every lane's read fails with the connection; the next reads, once Redis is back,
    read every topic again from where it was (lanes and their connections anew)."""
    store = open_store(private_redis.url)
    try:
        topics = _topics(TOPICS)
        positions: dict[str, StreamPosition] = {t: (0, 0) for t in topics}
        assert await store.read_live(positions, 50) == {}
        private_redis.restart(keep_data=True)
        deadline = time.monotonic() + 20
        while True:  # as the hub does: read again (after a failure) until Redis answers
            assert time.monotonic() < deadline
            try:
                await store.append(topics[-1], [NewEvent(data='"back"')])
                break
            except StoreUnavailable:
                await asyncio.sleep(0.1)
        got: dict[str, list[str]] = {}
        while not got:
            assert time.monotonic() < deadline
            with contextlib.suppress(StoreUnavailable):
                got = {t: [str(e.id) for e in es] for t, es in
                       (await store.read_live(positions, 500)).items()}  # fmt: skip
        assert list(got) == [topics[-1]] and len(got[topics[-1]]) == 1
        positions[topics[-1]] = (await store.state(topics[-1])).last_issued
        appended = await asyncio.gather(*(store.append(t, [NewEvent(data="1")]) for t in topics))
        assert await _read_until(store, positions, len(topics)) == {
            t: [str(r.ids[0])] for t, r in zip(topics, appended, strict=True)
        }
    finally:
        await store.close()


async def test_an_embedded_write_wakes_only_the_lane_reading_its_topic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fakeredis wakes every blocked client on any write: each lane's XREAD ran again
    over all its keys, in the broker's process, for every publish (10 ms a publish
    with 4,000 idle live topics). Only the lane of the topic written reads again."""
    from fakeredis.commands_mixins.streams_mixin import StreamsCommandsMixin

    runs: list[int] = []
    original = StreamsCommandsMixin.xread

    def counting(self: Any, *args: bytes) -> Any:
        runs.append(len(args))
        return original(self, *args)

    monkeypatch.setattr(StreamsCommandsMixin, "xread", counting)
    store = open_store(None)
    try:
        topics = _topics(TOPICS)
        positions: dict[str, StreamPosition] = {t: (0, 0) for t in topics}
        assert await store.read_live(positions, 50) == {}  # three lanes armed, waiting
        # Each lane's first XREAD, before it waits for a write: the 50 ms read may end
        # before they ran (a loaded machine), and counted after ``clear`` they failed it.
        deadline = time.monotonic() + 10
        while len(runs) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        lanes = [2 * 44 + 3] + [
            2 * c.LIVE_LANE_TOPICS + 3
        ] * 2  # (its arguments: a key and an id a topic)
        assert sorted(runs) == lanes, runs
        reading = asyncio.create_task(store.read_live(positions, 5000))
        await asyncio.sleep(0)  # (the read under way: its lanes still wait, none re-armed)
        runs.clear()
        await store.append(topics[0], [NewEvent(data='"one"')])
        got = await asyncio.wait_for(reading, 5)
        assert list(got) == [topics[0]]
        assert len(runs) == 1, f"{len(runs)} XREADs ran for one write"
    finally:
        await store.close()


async def test_lanes_left_with_no_topic_are_closed(store: RedisStreamStore) -> None:
    """A burst of live topics opened lanes, each on a Redis connection of its own; once
    it was over they stayed open for as long as the process ran (31 idle connections
    a process after 4,000 live topics)."""
    reader: Any = store._live
    topics = _topics(TOPICS)
    assert await store.read_live({t: (0, 0) for t in topics}, 50) == {}
    assert len(reader._lanes) == 3
    few: dict[str, StreamPosition] = {topics[0]: (0, 0)}

    def lanes_left() -> list[int]:  # the first lane stays; the others, with a topic only
        return [len(lane.topics) for lane in reader._lanes]

    for _ in range(50):  # (bounded: each read waits 50 ms at most)
        if lanes_left() in ([1], [0, 1]):
            break
        assert await store.read_live(few, 50) == {}
    assert lanes_left() in ([1], [0, 1])
    appended = await store.append(topics[0], [NewEvent(data='"still read"')])
    got = await _read_until(store, few, 1)
    assert got == {topics[0]: [str(appended.ids[0])]}


async def test_topics_join_a_live_read_that_cannot_be_unblocked_without_a_storm(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL without ``@dangerous`` refuses CLIENT UNBLOCK: a topic joining a lane
    waited for its 5 s block to pass, the reader asking again every 2 ms (about 1,250
    refused commands a second). The reader learns it once, and blocks briefly."""
    admin = redis.Redis.from_url(private_redis.url)
    await admin.acl_setuser(
        "broker", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-@dangerous"]
    )
    store = open_store(f"redis://broker:pw@127.0.0.1:{private_redis.port}/0")
    broker = Broker(store)
    try:
        await broker.start()
        anchor, *joining = _topics(5)
        held = await broker.subscribe({anchor: "now"})  # its read blocks meanwhile
        try:
            for topic in joining:
                subscription = await broker.subscribe({topic: "now"})
                try:
                    await broker.publish(topic, [NewEvent("1")])
                    events = await collect(subscription.chunks(), lambda got: len(got) >= 1)
                    assert [e.data for e in events] == ["1"]
                finally:
                    subscription.close()
        finally:
            held.close()
        stats = await admin.info("commandstats")
        refused = stats.get("cmdstat_client|unblock", {}).get("rejected_calls", 0)
        assert refused == 1, stats.get("cmdstat_client|unblock")  # (the reader's probe)
        assert "CLIENT UNBLOCK refused" in caplog.text
    finally:
        await broker.close()
        await admin.aclose()
