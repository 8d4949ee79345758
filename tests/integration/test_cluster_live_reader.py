"""The Cluster live reader when one primary fails while another has news.

The healthy node's entries are delivered; the failure is logged, counted and
refreshes the slot map; the failed node's topics are read again, from where
they were, once it is back, and the reader says how long they went unread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio.cluster import NodesManager

from broker import NewEvent
from broker import constants as c
from broker.ids import StreamPosition
from broker.observer import Observer
from broker.redis_live_cluster import ClusterLiveReader
from broker.redis_open import open_store
from tests.support.polling import await_until
from tests.support.redis_topologies import RedisClusterGroup, wait_for


class CountingObserver(Observer):
    def __init__(self) -> None:
        self.store_errors: list[str] = []

    def store_error(self, operation: str) -> None:
        self.store_errors.append(operation)


@pytest.fixture
def cluster_to_break() -> Iterator[RedisClusterGroup]:
    """Three primaries that go on serving their own slots while one of them is down."""
    group = RedisClusterGroup(masters=3).start()
    for port in group.live_ports:
        group.client(port).config_set("cluster-require-full-coverage", "no")
    yield group
    group.close()


def topic_on(cluster: RedisClusterGroup, port: int) -> str:
    """A fresh topic whose keys live on the primary at ``port``."""
    for _ in range(10_000):
        topic = f"c-{uuid.uuid4().hex[:12]}"
        if cluster.master_port_of(c.log_key(topic)) == port:
            return topic
    raise AssertionError(f"no topic found on :{port}")


def keep_data_across_restarts(cluster: RedisClusterGroup, port: int) -> None:
    """AOF on, now and at the next start, so what the node holds survives its stop."""
    client = cluster.client(port)
    client.config_set("appendonly", "yes")
    cluster.servers[port].appendonly = True

    def written() -> bool:
        info: Any = client.info("persistence")
        return bool(
            info["aof_enabled"]
            and not info["aof_rewrite_in_progress"]
            and not info["aof_rewrite_scheduled"]
        )

    wait_for(written, 15, f"AOF written on :{port}")


@pytest.mark.timeout(90)
async def test_a_failing_node_is_logged_counted_and_refreshed_while_the_others_deliver(
    cluster_to_break: RedisClusterGroup,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = cluster_to_break
    healthy_port, failing_port = cluster.master_ports()[:2]
    healthy, failing = topic_on(cluster, healthy_port), topic_on(cluster, failing_port)
    await asyncio.to_thread(keep_data_across_restarts, cluster, failing_port)
    refreshes: list[int] = []
    initialize = NodesManager.initialize

    async def counted_initialize(self: NodesManager, *args: Any, **kwargs: Any) -> None:
        refreshes.append(1)
        await initialize(self, *args, **kwargs)

    monkeypatch.setattr(NodesManager, "initialize", counted_initialize)
    observer = CountingObserver()
    store = open_store(cluster.url, observer=observer)
    try:

        async def append(topic: str, data: str) -> StreamPosition:
            return (await store.append(topic, [NewEvent(data)])).ids[0].position

        a0, b0 = await append(healthy, "a0"), await append(failing, "b0")
        both = await store.read_live({healthy: (0, 0), failing: (0, 0)}, block_ms=2000)
        assert set(both) == {healthy, failing}  # the reader holds a connection to each node
        b1 = await append(failing, "b1")  # not read yet when its node goes down
        await asyncio.to_thread(cluster.servers[failing_port].stop)
        refreshes.clear()
        a1 = await append(healthy, "a1")

        with caplog.at_level(logging.WARNING, logger="broker.redis_live_cluster"):
            read = await store.read_live({healthy: a0, failing: b0}, block_ms=2000)
            assert [e.position for e in read[healthy]] == [a1], "the healthy node's entry"
            assert failing not in read, "the failed node's topic must keep its position"
            assert observer.store_errors == ["live_read"], "the failure was not counted"
            await await_until(lambda: bool(refreshes), timeout=5, what="a slot map refresh")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(str(failing_port) in w for w in warnings), f"not logged: {warnings}"

        await asyncio.to_thread(cluster.servers[failing_port].start)
        await asyncio.to_thread(cluster.wait_until_ok)
        again = await store.read_live({healthy: a1, failing: b0}, block_ms=5000)
        assert [e.position for e in again[failing]] == [b1], "read again from where it was"
        # How long it went unread, for the hub to check retention by age against: once.
        spells = store.take_unread_spells()
        assert set(spells) == {failing} and spells[failing] > 0, spells
        assert store.take_unread_spells() == {}
    finally:
        await store.close()


@pytest.mark.timeout(90)
async def test_a_frozen_node_does_not_hold_the_others_topics(
    cluster_to_break: RedisClusterGroup,
) -> None:
    """One primary that hangs (a long fork, swapping, a lost path; here SIGSTOP) held
    every poll, so every topic of every node, until its read timed out (10 s, again and
    again until the cluster failed it over: 15-20 s of the whole cluster stalled). The
    others' topics are read on; the frozen node's keep their positions."""
    cluster = cluster_to_break
    healthy_port, frozen_port = cluster.master_ports()[:2]
    healthy, frozen = topic_on(cluster, healthy_port), topic_on(cluster, frozen_port)
    store = open_store(cluster.url)
    process = cluster.servers[frozen_port].process
    assert process is not None
    try:

        async def append(topic: str, data: str) -> StreamPosition:
            return (await store.append(topic, [NewEvent(data)])).ids[0].position

        a0, b0 = await append(healthy, "a0"), await append(frozen, "b0")
        both = await store.read_live({healthy: (0, 0), frozen: (0, 0)}, block_ms=2000)
        assert set(both) == {healthy, frozen}  # the reader holds a connection to each node
        os.kill(process.pid, signal.SIGSTOP)
        try:
            for n in range(3):  # each poll while the node stays frozen
                a1 = await append(healthy, f"a{n + 1}")
                read = await asyncio.wait_for(
                    store.read_live({healthy: a0, frozen: b0}, block_ms=2000), timeout=3
                )
                assert [e.position for e in read[healthy]] == [a1], "the healthy node's entry"
                assert frozen not in read, "the frozen node's topic keeps its position"
                a0 = a1
        finally:
            os.kill(process.pid, signal.SIGCONT)
        b1 = await append(frozen, "b1")
        again = await store.read_live({healthy: a0, frozen: b0}, block_ms=5000)
        assert [e.position for e in again[frozen]] == [b1], "read again from where it was"
    finally:
        await store.close()


@pytest.mark.timeout(90)
async def test_a_node_slower_than_a_poll_is_still_delivered_from(
    cluster_to_break: RedisClusterGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose reads take longer than a poll waits for it (0.5 s) is slow, not
    failed: its answer, when it comes, is delivered (taken for a failure at once, each
    late answer came as after an outage and was dropped: nothing was delivered from
    such a node while it stayed slow)."""
    cluster = cluster_to_break
    fast_port, slow_port = cluster.master_ports()[:2]
    fast, slow = topic_on(cluster, fast_port), topic_on(cluster, slow_port)
    observer = CountingObserver()
    store = open_store(cluster.url, observer=observer)
    poll_node = ClusterLiveReader._poll_node

    async def slow_node(self: ClusterLiveReader, node: Any, slots: Any) -> Any:
        if int(node.port) == slow_port:
            await asyncio.sleep(c.CLUSTER_NODE_POLL_S + 0.2)
        return await poll_node(self, node, slots)

    monkeypatch.setattr(ClusterLiveReader, "_poll_node", slow_node)
    try:
        positions = {fast: (0, 0), slow: (0, 0)}
        stored = {fast: [], slow: []}
        delivered: dict[str, list[StreamPosition]] = {fast: [], slow: []}
        for n in range(5):
            for topic in (fast, slow):
                stored[topic].append(
                    (await store.append(topic, [NewEvent(str(n))])).ids[0].position
                )
            for _ in range(10):  # a few reads each: the slow node's answer comes late
                read = await store.read_live(positions, block_ms=200)
                for topic, entries in read.items():
                    delivered[topic] += [e.position for e in entries]
                    positions[topic] = entries[-1].position
                if all(delivered[t] == stored[t] for t in (fast, slow)):
                    break
        assert delivered == stored, "every entry of both nodes, once, in order"
        assert observer.store_errors == [], "a slow node is no failure"
        assert store.take_unread_spells() == {}
    finally:
        await store.close()


@pytest.fixture
def cluster_with_replicas() -> Iterator[RedisClusterGroup]:
    group = RedisClusterGroup(masters=3, replicas=1).start()
    yield group
    group.close()


def replica_of(cluster: RedisClusterGroup, port: int) -> int:
    nodes: Any = cluster.client(port).execute_command("CLUSTER", "NODES")
    text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
    lines = [line.split() for line in text.splitlines()]
    master_id = next(parts[0] for parts in lines if parts[1].startswith(f"127.0.0.1:{port}@"))
    return next(int(parts[1].split("@")[0].rsplit(":", 1)[1]) for parts in lines
                if parts[3] == master_id)  # fmt: skip


def take_over_without_the_newest(cluster: RedisClusterGroup, primary: int, replica: int) -> None:
    """``replica`` takes ``primary``'s slots (CLUSTER FAILOVER TAKEOVER) without what
    ``primary`` wrote since its link was cut; until ``primary`` is its replica."""
    wait_for(lambda: _role_of(cluster, primary) == "slave", 15, f":{primary} demoted")
    cluster.wait_until_ok()
    assert replica in cluster.master_ports()


def _role_of(cluster: RedisClusterGroup, port: int) -> str:
    info: Any = cluster.client(port).info("replication")
    return str(info["role"])


@pytest.mark.timeout(90)
async def test_a_topic_whose_slot_another_node_took_over_unnoticed_is_looked_at_again(
    cluster_with_replicas: RedisClusterGroup,
) -> None:
    """Found by tests/soak/cluster_hunt.py: a primary froze a moment (shorter than
    CLUSTER_NODE_STUCK_S, so its read was not yet failed), its replica, without the
    newest events, took over, and an append's MOVED refreshed the slot map meanwhile.
    The reader read the topic on at the new primary, from an entry that one lacks,
    with no failure seen: the hub never looked at the log again, and when another
    instance had numbered the log on past the lost entries, its subscribers passed
    the loss told nothing. A topic whose slot another node serves than at the last
    read is looked at again, as a failed node's is (``take_unread_spells``)."""
    cluster = cluster_with_replicas
    primary = cluster.master_ports()[0]
    replica = replica_of(cluster, primary)
    topic = topic_on(cluster, primary)
    store = open_store(cluster.url)
    try:

        async def append(data: str) -> StreamPosition:
            return (await store.append(topic, [NewEvent(data)])).ids[0].position

        e0 = await append("e0")
        assert topic in await store.read_live({topic: (0, 0)}, block_ms=2000)
        cluster.wait_for_replicas()
        replica_client = cluster.client(replica)
        replica_client.config_set("masterauth", "not-the-password")  # it cannot resync
        replica_client.execute_command("CLIENT", "KILL", "TYPE", "master")
        wait_for(
            lambda: replica_client.info("replication")["master_link_status"] == "down",  # type: ignore[index]
            5,
            "the replica's link down",
        )
        e1 = await append("e1")  # the replica will never have it
        [read] = (await store.read_live({topic: e0}, block_ms=2000))[topic]
        assert read.position == e1
        replica_client.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        await asyncio.to_thread(take_over_without_the_newest, cluster, primary, replica)
        replica_client.config_set("masterauth", "")
        await append("e2")  # MOVED: the store's slot map names the replica now
        again = await store.read_live({topic: e1}, block_ms=2000)
        assert [e.data for e in again[topic]] == [b"e2"]  # read on past the lost e1
        assert topic in store.take_unread_spells(), "the topic must be looked at again"
    finally:
        await store.close()
