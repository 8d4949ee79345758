"""Each process holds a bounded number of Redis connections, whatever the load.

The command pool is opened whole when the store opens, plus the live reader's
connection per lane of LIVE_LANE_TOPICS live topics (at most LIVE_LANES_MAX);
bursts of reads, subscribes and publishes wait for a free connection instead of
opening more, and after a Redis restart the pool opens them all again. Counted by
the server itself (CLIENT LIST, INFO clients).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from broker import Broker, NewEvent, StoreUnavailable
from broker import constants as c
from broker.redis_open import open_store
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import RedisClusterGroup, SentinelGroup


async def broker_connections(url: str) -> int:
    """Connections to the server at ``url``, except the one this count uses."""
    probe = redis.Redis.from_url(url, single_connection_client=True)
    try:
        own = int(await probe.client_id())
        return sum(1 for client in await probe.client_list() if int(client["id"]) != own)
    finally:
        await probe.aclose()


async def wait_for_connections(url: str, expected: int, timeout: float) -> None:
    async def reached() -> bool:
        return await broker_connections(url) == expected

    await await_until(reached, timeout=timeout, what=f"{expected} connections", interval=0.05)


def fresh_topics(count: int) -> list[str]:
    prefix = uuid.uuid4().hex[:8]
    return [f"conn-{prefix}-{n}" for n in range(count)]


async def test_a_burst_of_commands_opens_no_connection(private_redis: RedisServer) -> None:
    store = open_store(private_redis.url, pool_size=4)
    try:
        await store.open()
        assert await broker_connections(private_redis.url) == 4 + 2  # the pool, appends, reader
        topics = fresh_topics(300)
        await asyncio.gather(*(store.append(t, [NewEvent("x")]) for t in topics[:100]))
        # Distinct topics: nothing is coalesced, every call wants a connection at once.
        results = await asyncio.gather(
            *(store.state(t) for t in topics),
            *(store.read_range(t, (0, 0), 10) for t in topics),
            *(store.append(t, [NewEvent("y")]) for t in topics[100:]),
        )
        assert len(results) == 800  # none refused: they waited for a free connection
        assert await broker_connections(private_redis.url) == 4 + 2
    finally:
        await store.close()
    assert await broker_connections(private_redis.url) == 0


async def test_subscribers_arriving_in_waves_open_no_connection(
    private_broker: Broker, private_redis: RedisServer
) -> None:
    """The idle benchmark in small: subscribers "from now" come 200 at a time. Only the
    live reader's lanes grow, one per LIVE_LANE_TOPICS live topics (at most
    LIVE_LANES_MAX), whatever the subscribers."""
    # The command pool, the appends' connection, the live reader's first lane.
    assert await broker_connections(private_redis.url) == c.REDIS_POOL_SIZE + 1 + 1
    subscriptions = []
    try:
        for wave_number in range(1, 6):
            wave = fresh_topics(200)  # each one's state is read: no two share a read
            subscriptions += await asyncio.gather(
                *(private_broker.subscribe({t: "now"}) for t in wave)
            )
            lanes = min(c.LIVE_LANES_MAX, -(-200 * wave_number // c.LIVE_LANE_TOPICS))
            await wait_for_connections(private_redis.url, c.REDIS_POOL_SIZE + 1 + lanes, 10)
        more = await asyncio.gather(*(private_broker.subscribe({t: "now"}) for t in wave))
        subscriptions += more  # more subscribers of the same topics: no connection
        await asyncio.sleep(0.2)
        assert await broker_connections(private_redis.url) == c.REDIS_POOL_SIZE + 1 + lanes
        assert private_broker.hub.subscriber_count == 1200
    finally:
        for subscription in subscriptions:
            subscription.close()


async def test_the_pool_opens_whole_again_after_a_restart(
    private_broker: Broker, private_redis: RedisServer
) -> None:
    topic = fresh_topics(1)[0]
    subscription = await private_broker.subscribe({topic: "now"})  # the live reader reconnects too
    try:
        private_redis.restart(keep_data=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                await private_broker.publish(topic, [NewEvent("after")])
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "Redis did not come back"
                await asyncio.sleep(0.05)
        # One publish needs one connection; the pool reopens all of them (+ the
        # appends' connection, the live reader).
        await wait_for_connections(private_redis.url, c.REDIS_POOL_SIZE + 2, timeout=10)
    finally:
        subscription.close()


async def test_a_store_opened_while_redis_is_down_fills_its_pool_once_it_is_back(
    private_redis: RedisServer,
) -> None:
    private_redis.stop()
    store = open_store(private_redis.url, pool_size=3)
    try:
        await store.open()  # logs a warning, does not fail
        private_redis.start()
        await store.ping()
        await wait_for_connections(private_redis.url, 3, timeout=10)  # no reader yet
    finally:
        await store.close()


# -- Sentinel and Cluster ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel_group() -> Iterator[SentinelGroup]:
    group = SentinelGroup().start()
    yield group
    group.close()


def connected_clients(group: SentinelGroup, port: int) -> int:
    info: Any = group.client(port).info("clients")
    return int(info["connected_clients"])


async def test_the_sentinel_store_keeps_a_fixed_pool_on_the_primary(
    sentinel_group: SentinelGroup,
) -> None:
    # The Sentinels and the replica are connected to the primary too: count the change.
    primary = sentinel_group.current_primary_port()
    before = connected_clients(sentinel_group, primary)
    store = open_store(sentinel_group.url, pool_size=4)
    try:
        await store.open()
        # The pool, the appends' connection, the live reader.
        assert connected_clients(sentinel_group, primary) == before + 4 + 2
        topics = fresh_topics(200)
        await asyncio.gather(*(store.state(t) for t in topics))
        await asyncio.gather(*(store.append(t, [NewEvent("x")]) for t in topics))
        assert connected_clients(sentinel_group, primary) == before + 4 + 2
    finally:
        await store.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterGroup]:
    group = RedisClusterGroup(masters=3).start()
    yield group
    group.close()


async def test_the_cluster_store_keeps_a_fixed_pool_on_each_primary(
    cluster: RedisClusterGroup,
) -> None:
    ports = cluster.master_ports()
    before = {port: cluster.connected_clients(port) for port in ports}
    store = open_store(cluster.url, pool_size=4)
    try:
        await store.open()
        opened = {port: cluster.connected_clients(port) - before[port] for port in ports}
        # The pool of each primary; where the slot map was asked, a startup node's one.
        assert all(4 <= n <= 5 for n in opened.values()), opened
        topics = fresh_topics(300)
        # Far more at once than a node's pool holds: they wait for their turn, and
        # none is refused (redis-py's cluster pools raise when all are in use).
        await asyncio.gather(*(store.state(t) for t in topics))
        await asyncio.gather(*(store.append(t, [NewEvent("x")]) for t in topics))
        after = {port: cluster.connected_clients(port) - before[port] for port in ports}
        assert after == opened
    finally:
        await store.close()


def command_pool(store: Any) -> Any:
    """The store's command pool (a FixedPool)."""
    return store._client.connection_pool


async def test_idle_connections_are_handed_out_by_the_fast_path(private_redis: RedisServer) -> None:
    store = open_store(private_redis.url, pool_size=4)
    try:
        await store.open()
        pool = command_pool(store)
        before = pool.fast_takes
        # One at a time: an idle connection is always there. (Appends have their own
        # connection: broker.redis_raw.)
        for topic in fresh_topics(20):
            await store.append(topic, [NewEvent("x")])
            await store.state(topic)
            await store.read_range(topic, (0, 0), 10)
        assert pool.fast_takes - before >= 40
        assert await broker_connections(private_redis.url) == 4 + 2
    finally:
        await store.close()


async def test_a_connection_the_server_closed_while_idle_is_not_handed_out(
    private_redis: RedisServer,
) -> None:
    """Appends go through no retry (one may have run): an idle connection that Redis
    closed (CLIENT KILL, its idle timeout, a proxy) must be reopened before use, by
    the fast path too, not found dead by the next append."""
    store = open_store(private_redis.url, pool_size=4)
    probe = redis.Redis.from_url(private_redis.url, single_connection_client=True)
    try:
        await store.open()
        topics = fresh_topics(8)
        await asyncio.gather(*(store.append(t, [NewEvent("x")]) for t in topics))
        pool = command_pool(store)
        idle = list(pool._available_connections)
        assert idle, "the pool holds idle connections"
        own = int(await probe.client_id())
        for client in await probe.client_list():
            if int(client["id"]) != own:
                await probe.client_kill_filter(_id=int(client["id"]))

        def every_idle_one_saw_its_end() -> bool:
            return all(c._reader is None or c._reader.at_eof() for c in idle)

        await await_until(every_idle_one_saw_its_end, timeout=5, what="the kills seen")
        for topic in topics:  # one at a time: each would take an idle (dead) connection
            result = await store.append(topic, [NewEvent("y")])
            assert len(result.ids) == 1
    finally:
        await probe.aclose()
        await store.close()


KEEPALIVE_IDLE_S = 30


def keepalive_timers(redis_port: int) -> list[tuple[int, float]]:
    """This machine's TCP connections to the port, as the kernel lists them: each one's
    active timer (2: keepalive) and seconds until it fires (/proc/net/tcp, USER_HZ 100)."""
    timers = []
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        remote_port, state = int(fields[2].split(":")[1], 16), fields[3]
        if remote_port == redis_port and state == "01":  # ESTABLISHED, client side
            timer, when = fields[5].split(":")
            timers.append((int(timer, 16), int(when, 16) / 100))
    return timers


async def test_every_connection_to_redis_sends_keepalives(private_redis: RedisServer) -> None:
    """A NAT or load balancer that forgets an idle flow (AWS NAT after 350 s) would
    leave idle connections dead, the next command on each waiting 5 s for nothing.
    Keepalives after 30 s of idleness keep the flow, or find it gone: redis-py's
    default, which the broker leans on (redis_options)."""
    broker = Broker(open_store(private_redis.url, pool_size=2))
    await broker.start()
    try:
        topic = f"keepalive-{uuid.uuid4().hex[:8]}"
        subscription = await broker.subscribe({topic: "now"})  # a live lane, blocked
        await broker.publish(topic, [NewEvent("1")])  # the appends' connection
        timers = keepalive_timers(private_redis.port)
        print("TIMERS", timers)
        assert len(timers) >= 2 + 1 + 1, timers  # the pool, appends, a lane
        assert all(timer == 2 and when <= KEEPALIVE_IDLE_S for timer, when in timers), timers
        subscription.close()
    finally:
        await broker.close()


async def test_a_pool_busy_for_its_whole_wait_drops_no_connection(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection in use for the pool's wait (a saturated process) was taken for
    Redis failing: the idle connections were dropped while other commands took them,
    and those failed in turn ("TCPTransport closed"; bench, 2026-11-29). Redis is fine:
    the command is refused (503, a stream's come-back) and the connections stay."""
    dropped: list[object] = []

    async def drop_spy(client: object) -> None:
        dropped.append(client)

    monkeypatch.setattr("broker.redis_store.drop_idle_connections", drop_spy)
    store = open_store(private_redis.url, pool_size=2)
    try:
        await store.open()
        pool = command_pool(store)
        pool.timeout = 0.2
        held = [await pool.get_connection() for _ in range(2)]
        with pytest.raises(StoreUnavailable, match=r"in use for 0\.2 s") as refused:
            await store.state(fresh_topics(1)[0])
        assert "unreachable" not in str(refused.value)
        for connection in held:
            await pool.release(connection)
        assert dropped == []
        assert all(connection.is_connected for connection in held)
        assert await store.state(fresh_topics(1)[0]) is not None  # and it serves at once
    finally:
        await store.close()
