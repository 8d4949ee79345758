"""Fixtures of the end-to-end suite: Redis, three brokers, a load balancer, SSE clients.

Each fixture starts real processes and stops them in its teardown, whether the
test passed or not. The Redis topology and the load balancer are parameters,
so every scenario runs over each combination.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.balancers import LoadBalancer
from tests.e2e.brokers import BrokerCluster
from tests.e2e.clients import (
    ChromiumEventSourceClient,
    ClientFactory,
    NodeEventSourceClient,
    SseClient,
)
from tests.e2e.topology import RedisTopology, start_topology

INSTANCES = 3


@pytest.fixture(params=["single"])
def redis_topology(request: pytest.FixtureRequest) -> Iterator[RedisTopology]:
    """A topology of topology.TOPOLOGIES; a test picks others with indirect parametrization."""
    topology = start_topology(request.param)
    try:
        yield topology
    finally:
        topology.close()


@pytest.fixture
def broker_cluster(redis_topology: RedisTopology, tmp_path: Path) -> Iterator[BrokerCluster]:
    cluster = BrokerCluster(INSTANCES, redis_topology.url, tmp_path, redis_topology.broker_env)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(params=["nginx", "haproxy"])
def load_balancer(
    request: pytest.FixtureRequest, broker_cluster: BrokerCluster, tmp_path: Path
) -> Iterator[LoadBalancer]:
    balancer = LoadBalancer(request.param, broker_cluster.ports, tmp_path)
    try:
        balancer.start()
        yield balancer
    finally:
        balancer.close()


def _started(client: SseClient, clients: list[SseClient]) -> SseClient:
    clients.append(client)  # before start(), so teardown stops a half-started client too
    client.start()
    return client


@pytest.fixture
def node_client(load_balancer: LoadBalancer, tmp_path: Path) -> Iterator[ClientFactory]:
    """Starts `eventsource` (npm) clients on a path behind the load balancer."""
    clients: list[SseClient] = []

    def start(path: str) -> SseClient:
        name = f"node-{len(clients)}"
        return _started(NodeEventSourceClient(name, load_balancer.url + path, tmp_path), clients)

    try:
        yield start
    finally:
        for client in clients:
            client.close()


@pytest.fixture
def chromium_client(load_balancer: LoadBalancer, tmp_path: Path) -> Iterator[ClientFactory]:
    """Starts headless Chromium pages whose own EventSource subscribes to a path."""
    clients: list[SseClient] = []

    def start(path: str) -> SseClient:
        name = f"chromium-{len(clients)}"
        client = ChromiumEventSourceClient(name, load_balancer.url, path, tmp_path)
        return _started(client, clients)

    try:
        yield start
    finally:
        for client in clients:
            client.close()
