"""Redis beyond one server: replicated durability, Sentinel failover, Redis Cluster."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest

from broker import Broker, BrokerLimits, EventId, NewEvent, StoreUnavailable, Subscription
from broker import constants as c
from broker.constants import GAP_EVENT
from broker.errors import StoreMisconfigured
from broker.ids import parse_cursor
from broker.model import IngestLines
from broker.redis_open import open_store
from tests.support.oracle import delivery_problems
from tests.support.polling import await_until, wait_until
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import RedisClusterGroup, SentinelGroup
from tests.support.sse import Event, collect, parse_events

MAX_PUBLISHED = 100_000
"""At ~150 events a second, some ten minutes: far past any test's own timeout."""


@pytest.fixture
def primary_and_replica() -> tuple[RedisServer, RedisServer]:  # type: ignore[misc]
    primary = RedisServer(extra_args=["--repl-diskless-sync-delay", "0"]).start()
    # No AOF on the replica: a SIGTERM during its first AOF rewrite after a sync is
    # refused by Redis 7.0 ("Writing initial AOF, can't exit"), and stop() would hang.
    replica_args = ["--replicaof", "127.0.0.1", str(primary.port)]
    replica = RedisServer(appendonly=False, extra_args=replica_args).start()
    yield primary, replica
    replica.close()
    primary.close()


async def wait_for_replica(primary: RedisServer) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(primary.url)
    try:

        async def online() -> bool:
            replica = (await client.info("replication")).get("slave0", {})
            return bool(replica.get("state") == "online")

        await await_until(online, timeout=15, what="the replica online")
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


# -- shared by the Sentinel and Cluster tests -----------------------------------------


def numbers(events: list[Event]) -> list[int]:
    return [int(e.data) for e in events if e.event is None]


@contextlib.asynccontextmanager
async def running_broker(url: str, **store_options: Any) -> AsyncIterator[Broker]:
    broker = Broker(open_store(url, **store_options), limits=BrokerLimits(heartbeat_seconds=0.5))
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()


class Reader:
    """A live subscription read in the background, as an SSE client would; keeps what came."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.raw = b""
        self._task = asyncio.create_task(self._read(), name="reader")

    async def _read(self) -> None:
        async for chunk in self.subscription.chunks():
            self.raw += chunk

    @property
    def events(self) -> list[Event]:
        return parse_events(self.raw)

    def ids(self) -> list[str]:
        return [str(e.id) for e in self.events if e.event is None]

    async def wait_live(self, timeout: float = 10) -> None:
        """Until it has caught up: what comes next can only come from the live reader."""
        live = "the subscription is live"
        await await_until(
            lambda: self.subscription.is_live, timeout=timeout, what=live, worker=self._task
        )

    async def wait_for_ids(self, ids: list[str], timeout: float) -> None:
        wanted = set(ids)
        reached = "events reach the reader"
        await await_until(
            lambda: wanted <= set(self.ids()), timeout=timeout, what=reached, worker=self._task
        )

    async def close(self) -> None:
        self.subscription.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Publisher:
    """Publishes 0, 1, 2... like a careful client: each with its own Idempotency-Key,
    retried on StoreUnavailable until acknowledged. ``acked`` holds the ids answered."""

    def __init__(self, broker: Broker, topic: str, retry_for: float) -> None:
        self.broker = broker
        self.topic = topic
        self.retry_for = retry_for
        self.acked: list[str] = []
        self.refused = 0
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="publisher")

    async def _run(self) -> None:
        for n in range(MAX_PUBLISHED):  # bounded: the tests stop it long before
            if self._stop.is_set():
                return
            self.acked.append(str(await self._publish(n)))
            await asyncio.sleep(0.005)  # a steady rate, not a flood: ~150 events a second

    async def _publish(self, n: int) -> EventId:
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                event = NewEvent(str(n))
                return (
                    await self.broker.publish(self.topic, [event], idempotency_key=f"n{n}")
                ).ids[0]
            except StoreUnavailable:
                self.refused += 1
                assert time.monotonic() < deadline, f"event {n} not acknowledged in time"
                await asyncio.sleep(0.05)

    async def wait_for_more(self, count: int, timeout: float) -> None:
        target = len(self.acked) + count
        acks = f"{count} more acks"
        await await_until(
            lambda: len(self.acked) >= target, timeout=timeout, what=acks, worker=self._task
        )

    async def stop(self) -> list[str]:
        """Let the publish in flight be acknowledged, then stop; every acknowledged id."""
        self._stop.set()
        await asyncio.wait_for(self._task, self.retry_for + 5)
        return self.acked

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def assert_oracle(acked: list[str], events: list[Event], *, gap_allowed: bool) -> None:
    """The suite's oracle, judged by id: an event stored on a primary that died before
    replicating it may reach a live subscriber although its publisher was never
    answered; the publisher's retry is then a new event (a new id), acknowledged."""
    received = [(e.id, e.event) for e in events]
    problems = delivery_problems(acked, received, gaps_allowed=gap_allowed, unacknowledged_ok=True)
    assert not problems, problems


# -- Sentinel -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel_group() -> Iterator[SentinelGroup]:
    """A primary, a replica and three Sentinels, shared by the tests that fail nothing over."""
    group = SentinelGroup().start()
    yield group
    group.close()


@pytest.fixture
def sentinel_group_to_fail() -> Iterator[SentinelGroup]:
    group = SentinelGroup().start()
    yield group
    group.close()


async def test_the_sentinel_store_opens_without_warnings(sentinel_group: SentinelGroup) -> None:
    store = open_store(sentinel_group.url)
    try:
        await store.ping()
    finally:
        await store.close()


async def test_sentinel_publish_and_resume(sentinel_group: SentinelGroup, topic: str) -> None:
    async with running_broker(sentinel_group.url) as broker:
        ids = [str((await broker.publish(topic, [NewEvent(str(n))])).ids[0]) for n in range(8)]
        subscription = await broker.subscribe({topic: EventId.parse(ids[2])})
        try:
            chunks = subscription.chunks()
            events = await collect(chunks, lambda ev: 7 in numbers(ev))
            assert numbers(events) == [3, 4, 5, 6, 7]
            assert [e.id for e in events] == ids[3:]
            assert not [e for e in events if e.event == GAP_EVENT]
            await broker.publish(topic, [NewEvent("8")])
            assert numbers(await collect(chunks, lambda ev: 8 in numbers(ev))) == [8]
        finally:
            subscription.close()
    primary = sentinel_group.client(sentinel_group.current_primary_port())
    assert primary.xlen(c.log_key(topic)) == 9  # written where the Sentinels point


@pytest.mark.timeout(60)
async def test_sentinel_failover_loses_no_acknowledged_event(
    sentinel_group_to_fail: SentinelGroup, topic: str
) -> None:
    """SIGKILL the primary mid-stream; replicated publishes survive on the promoted replica."""
    group = sentinel_group_to_fail
    async with running_broker(group.url, durability="replicated") as broker:
        await broker.publish(topic, [NewEvent("-1")])
        reader = Reader(await broker.subscribe({topic: "now"}))
        await reader.wait_live()
        publisher = Publisher(broker, topic, retry_for=30)
        try:
            await publisher.wait_for_more(30, timeout=10)
            await asyncio.to_thread(group.kill_primary)
            before_failover = len(publisher.acked)
            await asyncio.to_thread(group.wait_for_failover, 30)
            # The promoted replica is alone: give it a replica, or no publish is confirmed.
            await asyncio.to_thread(group.add_replica)
            await publisher.wait_for_more(30, timeout=20)
            acked = await publisher.stop()
            await reader.wait_for_ids(acked, timeout=20)
        finally:
            await publisher.cancel()
            await reader.close()
    assert publisher.refused > 0, "the kill did not interrupt publishing"
    assert len(acked) >= before_failover + 30
    assert_oracle(acked, reader.events, gap_allowed=False)


async def _acknowledged(broker: Broker, topic: str, n: int) -> str:
    """Publish ``n`` until acknowledged (retried with its key); its id."""
    for _ in range(300):  # bounded: 30 s of retries
        try:
            result = await broker.publish(topic, [NewEvent(str(n))], idempotency_key=f"z{n}")
            return str(result.ids[0])
        except StoreUnavailable:
            await asyncio.sleep(0.1)
    raise AssertionError(f"event {n} not acknowledged in 30 s")


@pytest.mark.timeout(90)
async def test_a_primary_that_comes_back_after_a_failover_gets_no_writes(
    sentinel_group_to_fail: SentinelGroup, topic: str
) -> None:
    """The primary froze (SIGSTOP), the Sentinels promoted its replica, and it came back,
    still a primary until they demote it, some seconds later. The store's connections
    to it had not failed (nothing was published meanwhile): its appends went on there,
    were acknowledged, and were dropped when it was demoted (audit: some 10 s of
    publishes). The store follows the Sentinels: they all reach the new primary."""
    group = sentinel_group_to_fail
    async with running_broker(group.url) as broker:
        await broker.publish(topic, [NewEvent("before")])
        store: Any = broker.store
        old = group.primary_port
        frozen = group.servers[old].process
        assert frozen is not None
        frozen.send_signal(signal.SIGSTOP)
        try:
            new = await asyncio.to_thread(group.wait_for_failover, 30)
            await await_until(
                lambda: store._primary_watch.primary == ("127.0.0.1", new),
                timeout=10,
                what="the store to follow the Sentinels",
            )
        finally:
            frozen.send_signal(signal.SIGCONT)
        acked = [await _acknowledged(broker, topic, n) for n in range(10)]

        def demoted() -> bool:  # (and in sync: what it took was dropped by then)
            info: Any = group.client(old).info("replication")
            return bool(info["role"] == "slave" and info.get("master_link_status") == "up")

        await asyncio.to_thread(
            lambda: wait_until(demoted, timeout=45, what="the old primary demoted")
        )
        kept = group.client(new).xrange(c.log_key(topic))
    stored = [f"{EventId.parse(acked[0]).epoch}.{raw_id.decode()}" for raw_id, _ in kept]
    assert set(acked) <= set(stored), "acknowledged events were dropped with the old primary"


# -- Cluster --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterGroup]:
    """Three masters without replicas, shared by the tests that kill nothing."""
    group = RedisClusterGroup(masters=3).start()
    yield group
    group.close()


@pytest.fixture
def cluster_with_replicas() -> Iterator[RedisClusterGroup]:
    group = RedisClusterGroup(masters=3, replicas=1).start()
    yield group
    group.close()


def topics_by_master(cluster: RedisClusterGroup, per_master: int) -> dict[int, list[str]]:
    """Fresh topic names, ``per_master`` of them on each master's slots."""
    found: dict[int, list[str]] = {port: [] for port in cluster.master_ports()}
    for _ in range(10_000):  # bounded: a master holds a third of the slots
        if min(len(topics) for topics in found.values()) >= per_master:
            return found
        topic = f"c-{uuid.uuid4().hex[:12]}"
        topics = found[cluster.master_port_of(c.log_key(topic))]
        if len(topics) < per_master:
            topics.append(topic)
    raise AssertionError(f"not {per_master} topics on each master in 10,000 names: {found}")


def tagged(topic: str, n: int) -> NewEvent:
    return NewEvent(orjson.dumps({"t": topic, "n": n}).decode())


def data_count(events: list[Event]) -> int:
    return sum(1 for e in events if e.event is None)


def by_topic(events: list[Event]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for event in events:
        if event.event is None:
            data: Any = event.json
            seen.setdefault(data["t"], []).append(data["n"])
    return seen


async def test_the_cluster_store_reads_live_without_warnings(
    cluster: RedisClusterGroup, topic: str
) -> None:
    store = open_store(cluster.url)
    try:
        assert await store.read_live({topic: (0, 0)}, block_ms=10) == {}
    finally:
        await store.close()


async def test_a_topics_keys_share_one_slot(cluster: RedisClusterGroup, topic: str) -> None:
    keys = [c.log_key(topic), c.meta_key(topic), c.records_key(topic), c.record_times_key(topic)]
    keys += [c.line_records_key(topic), c.line_times_key(topic)]
    assert len({cluster.keyslot(key) for key in keys}) == 1
    store = open_store(cluster.url)
    try:
        first = await store.append(topic, [NewEvent("1")], idempotency_key="k-1")
        again = await store.append(topic, [NewEvent("1")], idempotency_key="k-1")
    finally:
        await store.close()
    assert again.replayed
    assert again.ids == first.ids
    node = cluster.client(cluster.master_port_of(keys[0]))
    assert node.exists(*keys) == 4  # all written by one script, on one node


async def test_an_open_ingests_line_records_are_kept_on_a_cluster(
    cluster: RedisClusterGroup, topic: str
) -> None:
    """``keep_lines`` (lua/keep_lines.lua: the log, the meta and the two line-record keys,
    one slot) runs on the topic's node; it keeps the records of this log only."""
    store = open_store(cluster.url)
    try:
        first = await store.append(topic, [NewEvent("l1")], lines=IngestLines("K", [1]))
        node = cluster.client(cluster.master_port_of(c.log_key(topic)))
        written = node.zscore(c.line_times_key(topic), "K")
        assert await store.keep_lines(topic, "K", first.ids[0].epoch)
        assert node.zscore(c.line_times_key(topic), "K") >= written
        assert not await store.keep_lines(topic, "K", "another-epoch")
    finally:
        await store.close()


async def publish_to_each(broker: Broker, topics: list[str], count: int) -> dict[str, list[str]]:
    """``count`` events on every topic, interleaved so that every node has news at once."""
    published: dict[str, list[str]] = {t: [] for t in topics}
    for n in range(count):
        for t in topics:
            published[t].append(str((await broker.publish(t, [NewEvent(str(n))])).ids[0]))
    return published


def xread_connections(cluster: RedisClusterGroup, port: int) -> int:
    """Connections of a node whose last command was XREAD: the broker's live readers."""
    clients: Any = cluster.client(port).client_list()
    return sum(1 for client in clients if client["cmd"] == "xread")


async def test_topics_on_every_node_reach_their_live_subscribers(
    cluster: RedisClusterGroup,
) -> None:
    """Several topics per master, one subscriber each: the live reader serves them all."""
    topics = [t for ts in topics_by_master(cluster, 3).values() for t in ts]
    async with running_broker(cluster.url) as broker:
        # Logs that exist already: a reader failure then resyncs nobody from the log,
        # so what arrives can only have come through the live reader.
        await publish_to_each(broker, topics, 1)
        readers = {t: Reader(await broker.subscribe({t: "now"})) for t in topics}
        try:
            for reader in readers.values():
                await reader.wait_live()
            published = await publish_to_each(broker, topics, 10)
            for t in topics:
                await readers[t].wait_for_ids(published[t], timeout=10)
        finally:
            for reader in readers.values():
                await reader.close()
    for t in topics:
        assert readers[t].ids() == published[t]
        assert numbers(readers[t].events) == list(range(10))


async def test_one_live_read_connection_per_master_however_many_topics(
    cluster: RedisClusterGroup,
) -> None:
    """Live topics come and go on every node; the broker's connections per node do not grow."""
    by_master = topics_by_master(cluster, 10)
    first = [ts[0] for ts in by_master.values()]
    rest = [t for ts in by_master.values() for t in ts[1:]]
    async with running_broker(cluster.url) as broker:
        await publish_to_each(broker, first + rest, 1)  # existing logs: see above
        readers = [Reader(await broker.subscribe({t: "now"})) for t in first]
        try:
            for reader in readers:
                await reader.wait_live()
            published = await publish_to_each(broker, first, 1)
            for reader, t in zip(readers, first, strict=True):
                await reader.wait_for_ids(published[t], timeout=10)
            before = {port: cluster.connected_clients(port) for port in by_master}
            more = [Reader(await broker.subscribe({t: "now"})) for t in rest]
            readers += more
            for reader in more:
                await reader.wait_live()
            published = await publish_to_each(broker, rest, 1)
            for reader, t in zip(more, rest, strict=True):
                await reader.wait_for_ids(published[t], timeout=10)
            after = {port: cluster.connected_clients(port) for port in by_master}
            live_reads = {port: xread_connections(cluster, port) for port in by_master}

        finally:
            for reader in readers:
                await reader.close()
    assert live_reads == dict.fromkeys(by_master, 1), "one live reader per master"
    # The command pool (opened whole at start), the live reader, the slot-map query's
    # connection (to one startup node), the test's probes.
    bound = c.REDIS_POOL_SIZE + 1 + 1 + 2
    assert all(after[port] <= bound for port in after), (before, after)


async def test_a_multi_topic_subscription_across_nodes_resumes_by_its_cursor(
    cluster: RedisClusterGroup,
) -> None:
    topics = [ts[0] for ts in topics_by_master(cluster, 1).values()]
    async with running_broker(cluster.url) as broker:
        subscription = await broker.subscribe(dict.fromkeys(topics, "now"))
        try:
            for n in range(4):
                for t in topics:
                    await broker.publish(t, [tagged(t, n)])
            events = await collect(subscription.chunks(), lambda ev: data_count(ev) >= 12)
        finally:
            subscription.close()
        assert by_topic(events) == {t: [0, 1, 2, 3] for t in topics}
        seen = events[:7]  # the client read 7 events, then lost its connection
        cursor = parse_cursor(str(seen[-1].id))
        assert set(cursor) == set(topics)
        for t in topics:
            await broker.publish(t, [tagged(t, 4)])
        resumed = await broker.subscribe(dict(cursor))
        try:
            missed = 3 * 5 - 7
            events = await collect(resumed.chunks(), lambda ev: data_count(ev) >= missed)
        finally:
            resumed.close()
    assert not [e for e in events if e.event == GAP_EVENT]
    assert data_count(events) == missed
    before, after = by_topic(seen), by_topic(events)
    for t in topics:
        assert before.get(t, []) + after.get(t, []) == [0, 1, 2, 3, 4]


async def test_a_slot_migrating_stalls_no_other_topic_of_its_node(
    cluster: RedisClusterGroup,
) -> None:
    """One slot of a node is migrating and its topic's keys have moved (the node answers
    ASK for it): the live read of the node's other slots goes on (one refused read
    threw the node's whole answer away: every topic of the node stalled until the
    slot was final; audit)."""
    source, moving, staying, slot, target = _two_topics_of_one_node(cluster)
    async with running_broker(cluster.url) as broker:
        live, state = await _read_from_their_last(broker, moving, staying)
        _migrate_keys_of(cluster, slot, source, target)
        try:
            await broker.publish(staying, [tagged(staying, 1)])
            read = await live.read(state, 100)
        finally:
            _finish_migration(cluster, slot, target)
    assert list(read) == [staying] and len(read[staying]) == 1


async def test_a_slot_migrating_fails_no_append_of_another_slot(
    cluster: RedisClusterGroup,
) -> None:
    """Appends to a topic whose slot is migrating bounce between its two nodes (redis-py
    sends ASKING on one pooled connection and the command on another) until they fail:
    each bounce counted a MOVED, and every fifth closed every connection of the client,
    to every node, failing appends of other slots under way (audit: 208 in 4.5 s)."""
    topics = topics_by_master(cluster, 1)
    source, (moving,) = next(iter(topics.items()))
    others = [t for port, ts in topics.items() if port != source for t in ts]
    slot = cluster.client(source).cluster("keyslot", c.log_key(moving))
    target = next(port for port in cluster.master_ports() if port != source)
    async with running_broker(cluster.url) as broker:
        await broker.publish(moving, [tagged(moving, 0)])
        _migrate_keys_of(cluster, slot, source, target)
        try:

            async def append(topic: str) -> str:
                try:
                    await broker.publish(topic, [tagged(topic, 1)])
                except StoreUnavailable:
                    return "refused"
                return "stored"

            moved = [append(moving) for _ in range(20)]
            elsewhere = [append(others[n % len(others)]) for n in range(200)]
            outcomes = await asyncio.gather(*moved, *elsewhere)
        finally:
            _finish_migration(cluster, slot, target)
    assert outcomes[len(moved) :] == ["stored"] * len(elsewhere)


async def test_an_append_refused_while_its_slot_migrates_says_so(
    cluster: RedisClusterGroup,
) -> None:
    """An append to a topic whose slot stays half migrated (its keys moved, the slot not
    yet final: the importing node answers TRYAGAIN, as the topic has not all six of its
    keys) is refused once the broker stops waiting, and nothing ran, with a reason an
    operator can act on, not redis-py's "redis is unreachable: TTL exhausted." (audit)."""
    source, moving, _, slot, target = _two_topics_of_one_node(cluster)
    async with running_broker(cluster.url) as broker:
        await broker.publish(moving, [tagged(moving, 0)])
        _migrate_keys_of(cluster, slot, source, target)
        try:
            with pytest.raises(StoreUnavailable) as refused:
                await broker.publish(moving, [tagged(moving, 1)])
        finally:
            _finish_migration(cluster, slot, target)
        assert (await broker.store.state(moving)).length == 1  # (the refused one ran nowhere)
    assert "slot is being migrated" in str(refused.value)
    assert "TTL exhausted" not in str(refused.value)


async def test_a_live_read_follows_a_slot_that_moved_while_it_waited(
    cluster: RedisClusterGroup,
) -> None:
    """A slot moved while a live read polled (the others quiet): the read asks where the
    refreshed slot map says, within its block time (it asked the old node, answered
    MOVED, until the block time ended: 5 s of stall; review)."""
    source, moving, staying, slot, target = _two_topics_of_one_node(cluster)
    async with running_broker(cluster.url) as broker:
        live, state = await _read_from_their_last(broker, moving, staying)
        reading = asyncio.create_task(live.read(state, 3000))
        await asyncio.sleep(0.2)  # (it polls: nothing new)
        _migrate_keys_of(cluster, slot, source, target)
        _finish_migration(cluster, slot, target)
        await broker.publish(moving, [tagged(moving, 1)])  # (the append follows the MOVED)
        read = await reading
    assert list(read) == [moving] and len(read[moving]) == 1


def _two_topics_of_one_node(cluster: RedisClusterGroup) -> tuple[int, str, str, int, int]:
    """Two topics of one primary, on two slots: its port, the topic whose slot is to
    move, the other, that slot, and the primary it is to move to."""
    (source, (moving, staying)), *_ = topics_by_master(cluster, 2).items()
    slot = int(cluster.client(source).cluster("keyslot", c.log_key(moving)))
    assert slot != cluster.client(source).cluster("keyslot", c.log_key(staying))
    target = next(port for port in cluster.master_ports() if port != source)
    return source, moving, staying, slot, target


async def _read_from_their_last(broker: Broker, *topics: str) -> tuple[Any, dict[str, Any]]:
    """One event in each topic; the broker's live reader, and each topic's last id."""
    for topic in topics:
        await broker.publish(topic, [tagged(topic, 0)])
    live: Any = broker.store._live  # type: ignore[attr-defined]
    return live, {t: (await broker.store.state(t)).last_entry for t in topics}


def _node_id(cluster: RedisClusterGroup, port: int) -> str:
    raw = cluster.client(port).execute_command("CLUSTER", "MYID")
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _migrate_keys_of(cluster: RedisClusterGroup, slot: int, source: int, target: int) -> None:
    """Half a slot migration, as redis-cli does one: marked, and its keys moved."""
    source_id, target_id = _node_id(cluster, source), _node_id(cluster, target)
    cluster.client(target).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    cluster.client(source).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    keys = cluster.client(source).execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
    cluster.client(source).execute_command(
        "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys
    )


def _finish_migration(cluster: RedisClusterGroup, slot: int, target: int) -> None:
    """The slot is the target's, on every node (the cluster is shared by other tests)."""
    target_id = _node_id(cluster, target)
    for port in cluster.master_ports():
        cluster.client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def test_connections_per_node_do_not_grow_with_subscribers(
    cluster: RedisClusterGroup,
) -> None:
    topics = [t for ts in topics_by_master(cluster, 5).values() for t in ts]
    async with running_broker(cluster.url) as broker:
        subscriptions = [await broker.subscribe({t: "now"}) for t in topics]
        try:
            await publish_to_each(broker, topics, 1)
            before = {port: cluster.connected_clients(port) for port in cluster.master_ports()}
            for n in range(200):
                subscriptions.append(await broker.subscribe({topics[n % len(topics)]: "now"}))
            await publish_to_each(broker, topics, 1)
            after = {port: cluster.connected_clients(port) for port in cluster.master_ports()}
        finally:
            for subscription in subscriptions:
                subscription.close()
        assert broker.hub.subscriber_count == 0
    assert_connections_steady(before, after)


def assert_connections_steady(before: dict[int, int], after: dict[int, int]) -> None:
    """No node gained more than one connection.

    One, because two interrupts of the live read may race and open a second pooled
    command connection; what must never happen is one per subscriber or topic.
    """
    assert all(after[port] - before[port] <= 1 for port in before), (before, after)


@pytest.mark.timeout(60)
async def test_cluster_failover_of_a_topics_master(
    cluster_with_replicas: RedisClusterGroup, topic: str
) -> None:
    """SIGKILL the master of the topic's slot mid-stream; its replica takes over.

    Replication is asynchronous (durability "leader"): an acknowledged event the
    replica never got may be lost, but then only after a ``broker.gap``.
    """
    group = cluster_with_replicas
    async with running_broker(group.url) as broker:
        await broker.publish(topic, [NewEvent("-1")])
        reader = Reader(await broker.subscribe({topic: "now"}))
        await reader.wait_live()
        publisher = Publisher(broker, topic, retry_for=30)
        try:
            await publisher.wait_for_more(30, timeout=10)
            dead = await asyncio.to_thread(group.kill_master_of, c.log_key(topic))
            before_failover = len(publisher.acked)
            await asyncio.to_thread(group.wait_for_failover, c.log_key(topic), dead)
            await publisher.wait_for_more(30, timeout=20)
            acked = await publisher.stop()
            after_failover = acked[before_failover + 1 :]  # the one in flight may be either
            await reader.wait_for_ids(after_failover, timeout=20)
        finally:
            await publisher.cancel()
            await reader.close()
    assert publisher.refused > 0, "the kill did not interrupt publishing"
    assert_oracle(acked, reader.events, gap_allowed=True)


async def test_a_cluster_with_no_node_answering_is_store_unavailable(topic: str) -> None:
    """Every node down: redis-py's Cluster client raises ``RedisClusterException`` (not a
    ``RedisError``) once it tries to reconnect. Uncaught, a publish was a 500 (not
    retried) and a subscription a 500 (an EventSource gives up for good on it): each
    must be the store being unavailable (503 and Retry-After; a 200 with a come-back
    hint)."""
    group = RedisClusterGroup(masters=3).start()
    try:
        async with running_broker(group.url) as broker:
            await broker.publish(topic, [NewEvent("1")])
            for port in list(group.live_ports):
                group.servers[port].stop(kill=True)
            for _ in range(3):  # the first failure, then those of the reconnects
                with pytest.raises(StoreUnavailable):
                    await broker.publish(topic, [NewEvent("2")])
                with pytest.raises(StoreUnavailable):
                    await broker.store.state(topic)
                with pytest.raises(StoreUnavailable):
                    await broker.subscribe({topic: "now"})
    finally:
        group.close()


async def test_a_cluster_store_does_not_open_when_one_primary_may_evict(
    cluster: RedisClusterGroup,
) -> None:
    """Every primary holds topics: one that evicts is as bad as all of them."""
    node = cluster.client(cluster.master_ports()[-1])
    node.config_set("maxmemory", 100 * 1024 * 1024)
    node.config_set("maxmemory-policy", "volatile-lru")
    store = open_store(cluster.url)
    try:
        with pytest.raises(StoreMisconfigured, match="maxmemory-policy volatile-lru"):
            await store.open()
    finally:
        await store.close()
        node.config_set("maxmemory-policy", "noeviction")
        node.config_set("maxmemory", 0)
