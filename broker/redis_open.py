"""From a ``BROKER_REDIS_URL`` to a store: one Redis, Sentinel, Cluster, or the embedded store.

Parses the URL, builds the command client (its pool), the live reader, and the
``RedisStreamStore`` over both. Nothing here runs a command.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from broker import constants as c
from broker.observer import Observer
from broker.redis_listing import NodeClientFactory
from broker.redis_live import LiveReader
from broker.redis_live_cluster import ClusterLiveReader
from broker.redis_live_links import LocalWrites
from broker.redis_options import client_options, pool_options, reader_options
from broker.redis_pools import BoundedCluster, FixedPool, FixedSentinelPool
from broker.redis_primary import PrimaryWatch, WatchedSentinelPool
from broker.redis_store import RedisStreamStore
from broker.redis_urls import (
    REDIS_PORT,
    SENTINEL_PORT,
    ServersUrl,
    check_database_path,
    cluster_options,
    sentinel_service,
    split_servers_url,
)


def open_store(
    url: str | None,
    *,
    durability: str = "leader",
    pool_size: int = c.REDIS_POOL_SIZE,
    observer: Observer | None = None,
    **options: Any,
) -> RedisStreamStore:
    """A store for a URL: one Redis, Sentinel, Cluster; the embedded store when empty.

    - ``redis://``, ``rediss://``, ``unix://``: one Redis server (``/db`` a number);
    - ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``:
      the primary that the Sentinels name ``service``, followed across failovers
      (not ``rediss+sentinel``: no TLS through Sentinel);
    - ``redis+cluster://[[user]:password@]host:port[,host:port...][/][?options]`` (or
      ``rediss+cluster`` with the TLS options of ``redis_urls.TLS_OPTIONS``): a Redis
      Cluster, from any of its nodes.

    A URL with anything that would not be used (a path, an option) is a ValueError.

    Each process keeps ``pool_size`` command connections per Redis server (per
    Cluster primary), all opened by ``RedisStreamStore.open``, and one for the live
    reader (one per primary on a Cluster); see ``FixedPool``. ``observer`` counts
    the live reader's failures that it does not raise (a Cluster node failing
    while the others answered).
    """
    if not url:
        return _embedded_store(**options)
    replicas = 1 if durability == "replicated" else 0
    options |= {
        "description": _redact(url),
        "replicas_to_confirm": replicas,
        "pool_size": pool_size,
    }
    scheme = url.partition("://")[0].lower()
    if scheme.endswith("+sentinel"):
        return _sentinel_store(split_servers_url(url, SENTINEL_PORT), **options)
    if scheme.endswith("+cluster"):
        return _cluster_store(split_servers_url(url, REDIS_PORT), observer, **options)
    check_database_path(url)
    pool = FixedPool.from_url(url, **pool_options(pool_size))
    client = redis.Redis.from_pool(pool)
    reader = redis.Redis.from_url(url, single_connection_client=True, **reader_options())
    return RedisStreamStore(client, LiveReader(reader, client), **options)


URL_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster", "rediss+cluster")
"""What ``open_store`` takes (and ``rediss+sentinel``, to say why it cannot)."""


def check_redis_url(url: str) -> None:
    """A ValueError for a URL the store cannot use, said at start (before anything
    connects): it was a traceback from the app's start-up, not naming the setting, and
    an option the connection does not take only failed there, as a TypeError."""
    scheme = url.partition("://")[0].lower()
    if scheme not in (*URL_SCHEMES, "rediss+sentinel"):  # (redis-py's named only three)
        raise ValueError(f"the scheme is none of {', '.join(s + '://' for s in URL_SCHEMES)}")
    open_store(url)  # (builds clients, connects nothing)
    if scheme.endswith(("+sentinel", "+cluster")):
        return
    pool = redis.ConnectionPool.from_url(url)
    try:
        pool.connection_class(**pool.connection_kwargs)  # (what each connection is made of)
    except TypeError as error:
        raise ValueError(f"an option the connection does not take: {error}") from None


def _sentinel_store(url: ServersUrl, **options: Any) -> RedisStreamStore:
    service, db = sentinel_service(url)
    # The URL's credentials log in to the primary (both pools), not to the Sentinels:
    # those have their own (often none; AUTH to one without a password fails).
    kwargs = client_options() | url.credentials() | {"db": db}
    sentinel = Sentinel(url.hosts, sentinel_kwargs=client_options(), **kwargs)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(
        service, connection_pool_class=FixedSentinelPool, **pool_options(options["pool_size"])
    )
    reader_pool = WatchedSentinelPool(service, sentinel, **(kwargs | reader_options()))  # type: ignore[no-untyped-call]
    # Not single_connection_client: that client reconnects to the address it had
    # (redis-py skips the Sentinel lookup there), i.e. to a dead primary forever.
    # Through the pool every reconnect asks the Sentinels; from_pool also closes it.
    reader = redis.Redis.from_pool(reader_pool)
    live = LiveReader(reader, client)
    watch = PrimaryWatch(sentinel, service)
    for pool in (client.connection_pool, reader_pool):
        pool.watch = watch
        watch.pools.append(pool)
    return RedisStreamStore(
        client, live, also_close=sentinel.sentinels, primary_watch=watch, **options
    )


def _cluster_store(url: ServersUrl, observer: Observer | None, **options: Any) -> RedisStreamStore:
    common = cluster_options(url)  # the same login and TLS for every client below
    cluster = BoundedCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in url.hosts],
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        retry=Retry(NoBackoff(), 0),  # a retried append could store twice; MOVED is still followed
        # Not the whole client closed after every fifth MOVED (redis-py's default): during
        # a slot migration, appends of that slot bounce between its nodes (redis-py's
        # ASKING and the command may take two pooled connections), and each close failed
        # every command under way, to every node (audit). A MOVED patches its slot, and
        # failures refresh the map (SlotCommands, the live reader).
        reinitialize_steps=0,
        max_connections=options["pool_size"],  # per node; see open_cluster_pools
        **common,
    )
    reader = reader_options() | common | {"single_connection_client": True}
    live = ClusterLiveReader(cluster, reader, observer)
    node_client = _node_client_factory(common, options["pool_size"])
    return RedisStreamStore(cluster, live, node_client=node_client, **options)


def _node_client_factory(common: dict[str, Any], size: int) -> NodeClientFactory:
    """Clients of single Cluster nodes (the listing's SCANs), logged in and
    encrypted as the cluster client is: without them a password or TLS Cluster refuses.
    ``common``: the cluster client's options of ``cluster_options``."""
    options = pool_options(size) | common
    if options.pop("ssl"):  # a pool takes no ssl=, but its connection class
        options["connection_class"] = SSLConnection  # what ssl=True picks in redis-py

    def open_node_client(host: str, port: int) -> redis.Redis:
        pool = redis.BlockingConnectionPool(host=host, port=port, **options)
        return redis.Redis.from_pool(pool)

    return open_node_client


EMBEDDED_POOL_SIZE = 64
"""Connections of the embedded store's client (in-process, cheap; commands beyond
wait for one)."""


def _embedded_store(**options: Any) -> RedisStreamStore:
    import fakeredis

    server = fakeredis.FakeServer()
    # A pool that waits for a connection, as FixedPool does on Redis: redis-py's default
    # pool raised past 100 connections, and 101 commands at once (a listing's states,
    # a reconnect storm) got 503s and "come back later".
    client = fakeredis.FakeAsyncRedis(
        server=server,
        connection_pool_class=redis.BlockingConnectionPool,
        max_connections=EMBEDDED_POOL_SIZE,
    )
    reader = fakeredis.FakeAsyncRedis(server=server, single_connection_client=True)
    writes = LocalWrites()
    return RedisStreamStore(
        client,
        LiveReader(reader, client, raw=False, local_writes=writes),
        durable=False,
        local_writes=writes,
        description="embedded (in-process, not durable)",
        **options,
    )


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"
