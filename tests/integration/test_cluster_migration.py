"""A topic's Cluster slot migrated (resharding) under a broker's publishers and subscribers."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from redis.crc import key_slot

from broker import constants as c
from tests.support.broker_process import BrokerProcess
from tests.support.oracle import delivery_problems
from tests.support.polling import await_until
from tests.support.redis_topologies import RedisClusterGroup, SlotMigration
from tests.support.sse import complete_events

TRYAGAINS_TO_OUTLAST = 20
"""TRYAGAIN answers the split slot gives before the migration goes on: more than
redis-py's own 16 tries at one command (the broker's first 503 before its fix),
well within the broker's patience (about 0.9 s of its backoff)."""
MAX_EVENTS = 2000  # (a bound on each publisher, far past what the test needs)


def cluster_with_broker(
    replicas: int = 0, env: dict[str, str] | None = None
) -> Iterator[tuple[RedisClusterGroup, BrokerProcess]]:
    """Three primaries (with ``replicas`` each), and a broker on them."""
    cluster = RedisClusterGroup(masters=3, replicas=replicas).start()
    try:
        broker = BrokerProcess(redis_url=cluster.url, env=env or {}).start()
        try:
            yield cluster, broker
        finally:
            broker.close()
    finally:
        cluster.close()


@pytest.fixture
def cluster_and_broker() -> Iterator[tuple[RedisClusterGroup, BrokerProcess]]:
    yield from cluster_with_broker()


def migration_of(cluster: RedisClusterGroup, topic: str) -> SlotMigration:
    """The move of ``topic``'s slot from its primary to another one (not begun)."""
    source = cluster.master_port_of(c.log_key(topic))
    target = next(port for port in cluster.master_ports() if port != source)
    return SlotMigration(cluster, key_slot(topic.encode()), source, target)


def topic_in_slot(slot: int) -> str:
    """A topic whose keys hash to ``slot``."""
    for _ in range(1_000_000):
        name = f"fresh-{uuid.uuid4().hex[:10]}"
        if key_slot(name.encode()) == slot:
            return name
    raise AssertionError(f"no topic name found for slot {slot}")


@dataclass
class Publisher:
    """Publishes 0, 1, 2... to a topic, each with its own Idempotency-Key; a 503 is
    retried with that key. ``acked``: the ids, in order; ``unavailable``: the 503s."""

    client: httpx.AsyncClient
    topic: str
    acked: list[str] = field(default_factory=list)
    unavailable: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        for n in range(MAX_EVENTS):
            if stop.is_set():
                return
            await self.publish(n)
        raise AssertionError(f"{self.topic}: still publishing after {MAX_EVENTS} events")

    async def publish(self, n: int) -> None:
        headers = {"content-type": "text/plain", "idempotency-key": f"{self.topic}-{n}"}
        for _ in range(50):
            answer = await self.client.post(
                f"/topics/{self.topic}/events", content=str(n), headers=headers, timeout=15
            )
            if answer.status_code in (200, 201):
                self.acked.append(answer.json()["id"])
                return
            assert answer.status_code == 503, answer.text  # never a 500, never a 4xx
            assert answer.headers.get("retry-after"), answer.headers
            self.unavailable += 1
        raise AssertionError(f"{self.topic}: event {n} refused 50 times")


@dataclass
class Subscriber:
    """Reads a topic from its start, reconnecting with Last-Event-ID when a stream ends
    (as EventSource does); ``received``: (id, event type) in arrival order."""

    client: httpx.AsyncClient
    topic: str
    received: list[tuple[str | None, str | None]] = field(default_factory=list)

    async def run(self) -> None:
        for _ in range(100):  # connections
            await self.read_one_stream()
        raise AssertionError(f"{self.topic}: the stream ended 100 times")

    async def read_one_stream(self) -> None:
        last = next((event_id for event_id, _ in reversed(self.received) if event_id), None)
        headers = {"accept": "text/event-stream"}
        if last is not None:
            headers["last-event-id"] = last
        params = {} if last is not None else {"from": "earliest"}
        url = f"/topics/{self.topic}/events"
        async with self.client.stream("GET", url, headers=headers, params=params) as stream:
            assert stream.status_code == 200
            raw, seen = b"", 0
            async for chunk in stream.aiter_bytes():
                raw += chunk
                events = complete_events(raw)
                self.received += [(e.get("id"), e.get("event")) for e in events[seen:]]
                seen = len(events)


@contextlib.asynccontextmanager
async def running(*tasks: asyncio.Task[None]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.timeout(120)  # (with its set-up: a cluster formed again takes 45 s more)
async def test_a_slot_migrated_under_publishers_and_subscribers_loses_and_refuses_nothing(
    cluster_and_broker: tuple[RedisClusterGroup, BrokerProcess],
) -> None:
    """The slot of a topic in use, and of a brand-new topic first published while it
    moves, is migrated step by step; its keys stay split between the two nodes (where
    Redis answers TRYAGAIN to every append) for longer than redis-py's own retries.
    Every publish succeeds without a 503 (the broker waits TRYAGAIN out, and follows
    ASK to the importing node), and each subscriber gets every acknowledged event
    exactly once, in order, live and when it resumes."""
    cluster, broker = cluster_and_broker
    topic = f"moving-{uuid.uuid4().hex[:10]}"
    migration = migration_of(cluster, topic)
    slot, target = migration.slot, migration.target
    fresh = topic_in_slot(slot)
    async with httpx.AsyncClient(base_url=broker.url, timeout=30) as client:
        # All six of the topic's keys exist (an ingest's line records too): with ASKING
        # the importing node then runs its append once they have all moved.
        ingest = await client.post(
            f"/topics/{topic}/events",
            content=b'{"data": "ingested"}\n',
            headers={"content-type": "application/x-ndjson", "idempotency-key": "ingest"},
        )
        assert ingest.status_code == 201, ingest.text
        publishers = [Publisher(client, topic), Publisher(client, fresh)]
        subscribers = [Subscriber(client, topic), Subscriber(client, fresh)]
        stop = asyncio.Event()
        in_use, newcomer = publishers[0], publishers[1]
        reading = [asyncio.create_task(s.run()) for s in subscribers]
        publishing = asyncio.create_task(in_use.run(stop))
        async with running(publishing, *reading):
            await await_until(lambda: len(in_use.acked) >= 5, timeout=10, what="publishing")
            before = len(in_use.acked)
            # (the importing node first asked to run a script it never had: NOSCRIPT)
            await asyncio.to_thread(cluster.client(target).script_flush)
            await asyncio.to_thread(migration.begin)
            publishing_fresh = asyncio.create_task(newcomer.run(stop))
            async with running(publishing_fresh):
                await asyncio.to_thread(migration.move, c.log_key(topic))  # split from here
                tryagains = await asyncio.to_thread(cluster.tryagain_replies)
                await await_until(
                    lambda: cluster.tryagain_replies() >= tryagains + TRYAGAINS_TO_OUTLAST,
                    timeout=10,
                    what="appends answered TRYAGAIN",
                )
                await asyncio.to_thread(migration.move_the_rest)
                asked = len(in_use.acked)  # all moved: ASK to the importing node
                await await_until(lambda: len(in_use.acked) >= asked + 3, timeout=10, what="ASK")
                await asyncio.to_thread(migration.finish)
                done = [len(p.acked) + 3 for p in publishers]
                await await_until(
                    lambda: all(len(p.acked) >= n for p, n in zip(publishers, done, strict=True)),
                    timeout=10,
                    what="publishes after the migration",
                )
                stop.set()
                await asyncio.wait_for(asyncio.gather(publishing, publishing_fresh), 20)
            # (the in-use topic's subscriber gets the ingest too: one more than acked)
            for subscriber, publisher, head in zip(subscribers, publishers, (1, 0), strict=True):
                await await_until(
                    lambda s=subscriber, p=publisher, h=head: len(s.received) >= h + len(p.acked),
                    timeout=10,
                    what=f"{subscriber.topic} delivered",
                )
        assert cluster.master_port_of(c.log_key(topic)) == target
        assert len(in_use.acked) > before
        assert in_use.unavailable == 0  # (the newcomer may get 503s: see deploy/README.md)
        first_of_topic = [ingest.json()["ids"][0]]
        acked = [first_of_topic + in_use.acked, newcomer.acked]
        for subscriber, expected in zip(subscribers, acked, strict=True):
            assert delivery_problems(expected, subscriber.received, gaps_allowed=False) == []
        # A subscriber that resumes from before the migration gets the rest, exactly.
        resumed = Subscriber(client, topic, received=[(in_use.acked[before - 1], None)])
        reading = [asyncio.create_task(resumed.run())]
        async with running(*reading):
            rest = len(in_use.acked) - before + 1
            await await_until(lambda: len(resumed.received) >= rest, timeout=10, what="resume")
        assert [event_id for event_id, _ in resumed.received[1:]] == in_use.acked[before:]


async def ingest(client: httpx.AsyncClient, topic: str) -> str:
    """One event by ingest, so the topic has all six keys; its id."""
    answer = await client.post(
        f"/topics/{topic}/events",
        content=b'{"data": "ingested"}\n',
        headers={"content-type": "application/x-ndjson", "idempotency-key": "ingest"},
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["ids"][0])


@pytest.mark.timeout(90)
async def test_live_subscribers_of_a_migrating_slot_get_its_events_before_it_is_final(
    cluster_and_broker: tuple[RedisClusterGroup, BrokerProcess],
) -> None:
    """Three topics of one slot, each with a live subscriber: one whose keys move first,
    one whose keys stay until the rest move, one never published (its log key exists
    nowhere). An XREAD of several keys of a migrating slot is refused (TRYAGAIN: the
    owner has some of them, from MIGRATING on, as a key that exists nowhere counts as
    one it lacks; ASK once it has none), so the reader reads such a slot key by key, a
    moved key from the importing node after ASKING. Events published at each step
    (slot MIGRATING, the keys split, all moved but the slot not final) reach their
    live subscribers at that step, before SETSLOT NODE; every event exactly once, in
    order."""
    cluster, broker = cluster_and_broker
    moved = f"moved-{uuid.uuid4().hex[:10]}"
    migration = migration_of(cluster, moved)
    slot, target = migration.slot, migration.target
    stays, quiet = topic_in_slot(slot), topic_in_slot(slot)
    async with httpx.AsyncClient(base_url=broker.url, timeout=30) as client:
        publishers = [Publisher(client, moved), Publisher(client, stays)]
        first = [[await ingest(client, p.topic)] for p in publishers]
        subscribers = [
            Subscriber(client, moved),
            Subscriber(client, stays),
            Subscriber(client, quiet),
        ]
        reading = [asyncio.create_task(s.run()) for s in subscribers]
        async with running(*reading):
            n = 0

            async def publish_and_deliver(step: str) -> None:
                nonlocal n
                for publisher in publishers:
                    await publisher.publish(n)
                n += 1
                for subscriber, publisher, head in zip(
                    subscribers, publishers, first, strict=False
                ):
                    expected = len(head) + len(publisher.acked)
                    await await_until(
                        lambda s=subscriber, e=expected: len(s.received) >= e,
                        timeout=10,
                        what=f"{subscriber.topic}: delivered live while {step}",
                    )

            await publish_and_deliver("the slot is stable")
            await asyncio.to_thread(migration.begin)
            await publish_and_deliver("the slot is MIGRATING, nothing moved")
            await asyncio.to_thread(migration.move, *c.topic_keys(moved))
            await publish_and_deliver("the topics' keys are split between the nodes")
            await asyncio.to_thread(migration.move_the_rest)
            await publish_and_deliver("every key moved, the slot not final")
            await asyncio.to_thread(migration.finish)
            publishers.append(Publisher(client, quiet))
            first.append([])
            await publish_and_deliver("the slot is final")
        assert cluster.master_port_of(c.log_key(moved)) == target
        for subscriber, publisher, head in zip(subscribers, publishers, first, strict=True):
            expected = head + publisher.acked
            assert delivery_problems(expected, subscriber.received, gaps_allowed=False) == []


@pytest.fixture
def replicated_cluster_and_broker() -> Iterator[tuple[RedisClusterGroup, BrokerProcess]]:
    """Three primaries with a replica each; a broker whose publishes WAIT for one."""
    yield from cluster_with_broker(replicas=1, env={"BROKER_PUBLISH_DURABILITY": "replicated"})


@pytest.mark.timeout(120)
async def test_replicated_publishes_follow_a_slot_migration_with_their_wait(
    replicated_cluster_and_broker: tuple[RedisClusterGroup, BrokerProcess],
) -> None:
    """With replicated durability the append and its WAIT go to the slot's node on one
    connection: while every key of the slot has moved but the slot is not final, that
    is the importing node after ASKING, and the WAIT counts its replica. Publishes
    then succeed (no 503) and reach the live subscriber before SETSLOT NODE."""
    cluster, broker = replicated_cluster_and_broker
    topic = f"replicated-{uuid.uuid4().hex[:10]}"
    migration = migration_of(cluster, topic)
    target = migration.target
    async with httpx.AsyncClient(base_url=broker.url, timeout=30) as client:
        publisher = Publisher(client, topic)
        first = [await ingest(client, topic)]
        await publisher.publish(0)  # (all six keys now: the importing node runs the append)
        subscriber = Subscriber(client, topic)
        async with running(asyncio.create_task(subscriber.run())):
            await await_until(lambda: len(subscriber.received) >= 2, timeout=10, what="live")
            await asyncio.to_thread(migration.begin)
            await asyncio.to_thread(migration.move_the_rest)
            for n in range(1, 4):
                await publisher.publish(n)
            assert publisher.unavailable == 0
            await await_until(
                lambda: len(subscriber.received) >= 1 + len(publisher.acked),
                timeout=10,
                what="delivered live while every key moved, the slot not final",
            )
            await asyncio.to_thread(migration.finish)
            await publisher.publish(4)
            await await_until(
                lambda: len(subscriber.received) >= 1 + len(publisher.acked),
                timeout=10,
                what="delivered once the slot is final",
            )
        assert cluster.master_port_of(c.log_key(topic)) == target
        assert publisher.unavailable == 0
        assert (
            delivery_problems(first + publisher.acked, subscriber.received, gaps_allowed=False)
            == []
        )
