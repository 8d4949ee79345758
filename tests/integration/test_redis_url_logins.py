"""What a Sentinel or Cluster URL says, used by every client made from it, against real
servers: an ACL user (not ``default``) logs in the command clients, the per-node clients
that WAIT and the live reader; a TLS Cluster is verified with the URL's CA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker import NewEvent, StoreUnavailable
from broker.redis_open import open_store
from broker.redis_store import RedisStreamStore
from tests.support.redis_topologies import RedisClusterGroup, SentinelGroup
from tests.support.tls import TlsFiles

USER = "app"
PASSWORD = "pa/ss@word"
QUOTED = "pa%2Fss%40word"  # as a URL must carry it


def add_user(clients: list[redis.Redis]) -> None:
    """Each server gets the ACL user, and its replicas log in as it."""
    for client in clients:
        client.acl_setuser(
            USER, enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], channels=["*"],
            commands=["+@all"],
        )  # fmt: skip
        client.config_set("masteruser", USER)
        client.config_set("masterauth", PASSWORD)


def retire_default(clients: list[redis.Redis]) -> None:
    """``default`` off: a client that logs in as it with the user's password is refused."""
    for client in clients:  # connections already open (the helpers', replication) stay
        client.acl_setuser("default", enabled=False)


async def publish_and_read_live(store: RedisStreamStore, topic: str) -> None:
    """An append (a replicated one WAITs on its own connection) and a live read."""
    await store.open()
    result = await store.append(topic, [NewEvent("1")], idempotency_key="k")
    assert not result.replayed
    live = await store.read_live({topic: (0, 0)}, block_ms=2000)
    assert [entry.id for entry in live[topic]] == result.ids


@pytest.fixture
def cluster_with_user() -> Iterator[RedisClusterGroup]:
    group = RedisClusterGroup(masters=3, replicas=1).start()
    nodes = [group.client(port) for port in group.live_ports]
    add_user(nodes)
    retire_default(nodes)
    yield group
    group.close()


@pytest.mark.timeout(90)
async def test_a_cluster_url_logs_in_as_its_acl_user(
    cluster_with_user: RedisClusterGroup, topic: str
) -> None:
    hosts = ",".join(f"127.0.0.1:{port}" for port in cluster_with_user.servers)
    url = f"redis+cluster://{USER}:{QUOTED}@{hosts}"
    store = open_store(url, durability="replicated")
    try:
        await publish_and_read_live(store, topic)
    finally:
        await store.close()


@pytest.fixture
def sentinel_with_user() -> Iterator[SentinelGroup]:
    """The data servers ask for the ACL user; the Sentinels have no password, and log
    in to the servers as the user too (else they would see the primary down)."""
    group = SentinelGroup().start()
    servers = [group.client(port) for port in group.servers]
    add_user(servers)
    for sentinel in group.sentinels:
        client = group.client(sentinel.port)
        client.sentinel_set(group.service, "auth-user", USER)
        client.sentinel_set(group.service, "auth-pass", PASSWORD)
    retire_default(servers)
    yield group
    group.close()


@pytest.mark.timeout(90)
async def test_a_sentinel_url_logs_in_to_the_primary_as_its_acl_user(
    sentinel_with_user: SentinelGroup, topic: str
) -> None:
    hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in sentinel_with_user.sentinels)
    url = f"redis+sentinel://{USER}:{QUOTED}@{hosts}/{sentinel_with_user.service}"
    store = open_store(url, durability="replicated")
    try:
        await publish_and_read_live(store, topic)
    finally:
        await store.close()


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[tuple[RedisClusterGroup, TlsFiles]]:
    files = TlsFiles.make(tmp_path)
    group = RedisClusterGroup(masters=3, replicas=1, tls=files).start()
    yield group, files
    group.close()


@pytest.mark.timeout(90)
async def test_a_tls_cluster_is_verified_with_the_urls_ca(
    tls_cluster: tuple[RedisClusterGroup, TlsFiles], topic: str
) -> None:
    """Through the TLS ports only; every client (cluster, WAIT's node clients, the live
    reader's) verifies the server with the URL's CA."""
    group, files = tls_cluster
    hosts = ",".join(f"127.0.0.1:{port}" for port in group.tls_ports.values())
    store = open_store(
        f"rediss+cluster://{hosts}/?ssl_ca_certs={files.ca}", durability="replicated"
    )
    try:
        await publish_and_read_live(store, topic)
    finally:
        await store.close()


async def test_a_tls_cluster_unverified_only_when_the_url_says_so(
    tls_cluster: tuple[RedisClusterGroup, TlsFiles], topic: str
) -> None:
    """Without the CA the server's certificate is refused; ``ssl_cert_reqs=none`` (a
    private network, a self-signed certificate) skips the check."""
    group, _ = tls_cluster
    hosts = ",".join(f"127.0.0.1:{port}" for port in group.tls_ports.values())
    unverified = open_store(f"rediss+cluster://{hosts}")
    try:
        with pytest.raises(StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await unverified.ping()
    finally:
        await unverified.close()
    store = open_store(f"rediss+cluster://{hosts}/?ssl_cert_reqs=none")
    try:
        await publish_and_read_live(store, topic)
    finally:
        await store.close()
