"""Replicated durability on a Cluster, and the per-node clients: they log in as the cluster does."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator

import pytest
from redis.asyncio.connection import SSLConnection

from broker import NewEvent
from broker import constants as c
from broker.redis_open import open_store
from tests.support.redis_topologies import RedisClusterGroup


@pytest.fixture
def cluster_with_password() -> Iterator[tuple[RedisClusterGroup, str]]:
    """Three primaries with a replica each, then a password on every node."""
    group = RedisClusterGroup(masters=3, replicas=1).start()
    password = uuid.uuid4().hex
    for port in group.live_ports:  # replicas first learn it, then every node asks for it
        group.client(port).config_set("masterauth", password)
    for port in group.live_ports:
        group.client(port).config_set("requirepass", password)
    yield group, password
    group.close()


@pytest.mark.timeout(90)
async def test_a_replicated_publish_on_a_cluster_with_a_password(
    cluster_with_password: tuple[RedisClusterGroup, str], topic: str
) -> None:
    """The append and its WAIT, on one connection of the cluster client to the topic's node."""
    cluster, password = cluster_with_password
    hosts = ",".join(f"127.0.0.1:{port}" for port in cluster.servers)
    store = open_store(f"redis+cluster://:{password}@{hosts}", durability="replicated")
    try:
        result = await store.append(topic, [NewEvent("1")], idempotency_key="k")
        assert not result.replayed
        assert (await store.state(topic)).length == 1
    finally:
        await store.close()


async def test_a_tls_clusters_node_clients_use_tls_and_its_password() -> None:
    """The node client's pool, unopened (test_redis_url_logins runs a TLS Cluster)."""
    store = open_store("rediss+cluster://:secret@127.0.0.1:1", durability="replicated")
    try:
        client = store._open_node_client("127.0.0.1", 1)
        pool = client.connection_pool
        assert issubclass(pool.connection_class, SSLConnection)
        assert pool.connection_kwargs["password"] == "secret"
        await client.aclose()
    finally:
        await store.close()


@pytest.mark.timeout(60)
async def test_a_cancelled_command_drops_its_connection_but_asks_for_no_slot_map(
    topic: str,
) -> None:
    """A publisher that leaves mid-append cancels it: the connection goes (a reply may
    be unread), but nothing says the node failed, so the slot map is not asked again
    (a storm of cancels refreshed it back to back: review). A publish whose deadline
    passed is cancelled too, after its reply was awaited that long: then the node may
    have failed, and the map is asked again (second review: retries went to a dead
    node)."""
    cluster = RedisClusterGroup(masters=3).start()
    store = open_store(cluster.url)
    try:
        await store.append(topic, [NewEvent("1")])
        node = cluster.client(cluster.master_port_of(c.log_key(topic)))
        node.client_pause(5000, all=False)  # (its writes wait: the read is in flight)
        append = asyncio.ensure_future(store.append(topic, [NewEvent("2")]))
        await asyncio.sleep(0)  # (no timing: the append is sent on the next turn)
        done, _ = await asyncio.wait({append}, timeout=0.5)
        assert not done, "the append was answered through the pause"
        append.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await append
        assert store._slots is not None
        assert store._slots._refresh is None, "a cancel asked for the slot map"
        with pytest.raises(TimeoutError):  # (as the edges give a publish its deadline)
            async with asyncio.timeout(c.CLUSTER_HUNG_REPLY_S + 0.2):
                await store.append(topic, [NewEvent("3")])
        assert store._slots._refresh is not None, "a deadline's cancel asked for no map"
        node.client_unpause()
        assert (await store.state(topic)).length in (1, 2, 3)  # (the cancelled may be in)
    finally:
        await store.close()
        cluster.close()
