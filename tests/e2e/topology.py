"""The Redis deployments the end-to-end suite runs the brokers on.

A topology is a parameter of the suite: each kind gives the brokers one URL
(and any broker setting it needs) and knows how to fail its servers the way
production does and to recover the way an operator would:

- single: one redis-server with AOF; it can be stopped and started (SIGTERM),
  an outage without loss.
- sentinel: a primary, two replicas and three Sentinels; the primary can be
  SIGKILLed, a Sentinel failover promotes a replica, and the operator then
  adds a fresh replica so the group is redundant again.
- cluster: three primaries with a replica each; the primary serving a topic's
  slot can be SIGKILLed, its replica takes the slots over, and the crashed node
  is restarted (with its nodes.conf), rejoining as the new primary's replica.

Sentinel and Cluster brokers publish with BROKER_PUBLISH_DURABILITY=replicated:
a publish is acknowledged only once a replica has it (WAIT 1), and a failover
promotes the replica with the most data, so no acknowledged event is lost and
no `broker.gap` is allowed. That is also why each topology keeps a replica
available after a failover (two replicas; a restarted node): without one,
every replicated publish would answer 503.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from broker.constants import log_key
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import RedisClusterGroup, SentinelGroup

REPLICATED = {"BROKER_PUBLISH_DURABILITY": "replicated"}
FAILOVER_TIMEOUT = 30.0


class RedisTopology(Protocol):
    """A running Redis deployment that the brokers reach through one URL."""

    name: str
    # True when a failure may drop acknowledged events, so a `broker.gap` is allowed.
    loses_acknowledged_writes_on_restart: bool
    # BROKER_* settings every broker of the deployment runs with.
    broker_env: dict[str, str]

    @property
    def url(self) -> str: ...

    def start(self) -> RedisTopology:
        """Start every server (again, with its data)."""
        ...

    def close(self) -> None:
        """Teardown: kill every server and forget its data; never raises."""
        ...


@runtime_checkable
class RestartableRedis(RedisTopology, Protocol):
    """A deployment that can be stopped as a whole and started again with its data."""

    def stop(self) -> None:
        """Stop every server cleanly (SIGTERM): an outage, not a loss of data."""
        ...


@runtime_checkable
class FailoverRedis(RedisTopology, Protocol):
    """A deployment with replicas that fails over when the primary of a topic crashes."""

    def kill_primary(self, topic: str) -> int:
        """SIGKILL the primary that serves `topic`; its port."""
        ...

    def wait_for_failover(self, topic: str) -> int:
        """Until a replica has taken over `topic` and takes writes; the new primary's port."""
        ...

    def restore_redundancy(self) -> str:
        """Give every primary a replica in sync again (as an operator would); what was done."""
        ...


class SingleRedis:
    """One redis-server with AOF on: a SIGTERM restart keeps every acknowledged write."""

    name = "single"
    loses_acknowledged_writes_on_restart = False

    def __init__(self) -> None:
        self.broker_env: dict[str, str] = {}
        self.server = RedisServer(appendonly=True)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> SingleRedis:
        self.server.start()
        return self

    def stop(self) -> None:
        # SIGTERM, so redis-server flushes its AOF before it exits.
        self.server.stop()

    def close(self) -> None:
        self.server.close()


class SentinelRedis:
    """A primary, two replicas, three Sentinels (quorum 2, down after 3 s).

    Down after 3 s, not 1: on a loaded 2-core CI machine a primary can stall
    for a second (AOF fsync), and a failover nobody asked for may promote the
    replica that had not confirmed the newest writes (WAIT 1 of 2 replicas).

    Two replicas, so that right after a failover the new primary still has one
    to confirm replicated publishes, before the operator adds another.
    """

    name = "sentinel"
    loses_acknowledged_writes_on_restart = False

    def __init__(self) -> None:
        self.broker_env = dict(REPLICATED)
        self.group = SentinelGroup(replicas=2, down_after_ms=3000)

    @property
    def url(self) -> str:
        return self.group.url

    def start(self) -> SentinelRedis:
        self.group.start()
        return self

    def kill_primary(self, topic: str) -> int:
        return self.group.kill_primary()  # every topic lives on the one primary

    def wait_for_failover(self, topic: str) -> int:
        return self.group.wait_for_failover(FAILOVER_TIMEOUT)

    def restore_redundancy(self) -> str:
        replica = self.group.add_replica(wait=False)
        self.group.wait_for_replicas(2, timeout=FAILOVER_TIMEOUT)
        return f"new replica :{replica.port} of :{self.group.primary_port} in sync"

    def close(self) -> None:
        self.group.close()


class ClusterRedis:
    """Three primaries with one replica each (cluster-node-timeout 1 s)."""

    name = "cluster"
    loses_acknowledged_writes_on_restart = False

    def __init__(self) -> None:
        self.broker_env = dict(REPLICATED)
        self.group = RedisClusterGroup(masters=3, replicas=1)
        self._crashed: list[int] = []

    @property
    def url(self) -> str:
        return self.group.url

    def start(self) -> ClusterRedis:
        self.group.start()
        return self

    def kill_primary(self, topic: str) -> int:
        port = self.group.kill_master_of(log_key(topic))
        self._crashed.append(port)
        return port

    def wait_for_failover(self, topic: str) -> int:
        key = log_key(topic)
        return self.group.wait_for_failover(key, self._crashed[-1], FAILOVER_TIMEOUT)

    def restore_redundancy(self) -> str:
        """Restart the crashed nodes: with their nodes.conf they rejoin as replicas.

        A restarted primary refuses queries until the cluster has reconfigured it
        (Redis waits before it rejoins as a writable primary), so its empty data
        set is never served.
        """
        restarted = []
        while self._crashed:
            port = self._crashed.pop()
            self.group.servers[port].start()
            restarted.append(port)
        self.group.wait_until_ok(FAILOVER_TIMEOUT)
        self.group.wait_for_replicas(FAILOVER_TIMEOUT)
        return f"restarted {restarted}: every primary has a replica in sync"

    def close(self) -> None:
        self.group.close()


TOPOLOGIES: dict[str, type[SingleRedis] | type[SentinelRedis] | type[ClusterRedis]] = {
    "single": SingleRedis,
    "sentinel": SentinelRedis,
    "cluster": ClusterRedis,
}


def start_topology(name: str) -> RedisTopology:
    topology = TOPOLOGIES[name]()
    try:
        return topology.start()
    except BaseException:
        topology.close()
        raise
