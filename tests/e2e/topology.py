"""The Redis deployments the end-to-end suite runs the brokers on.

A topology is a parameter of the suite: each kind gives the brokers one URL and
knows how to restart its servers the way an operator would. Only a single
Redis exists today; Sentinel and Cluster topologies will slot in here once the
broker accepts their URLs.
"""

from __future__ import annotations

from typing import Protocol

from tests.support.redis_server import RedisServer


class RedisTopology(Protocol):
    """A running Redis deployment that the brokers reach through one URL."""

    name: str
    # True when a restart may drop acknowledged events, so a `broker.gap` is allowed.
    loses_acknowledged_writes_on_restart: bool

    @property
    def url(self) -> str: ...

    def stop(self) -> None:
        """Stop every server cleanly (SIGTERM): an outage, not a loss of data."""
        ...

    def start(self) -> RedisTopology:
        """Start every server again with its data."""
        ...

    def close(self) -> None: ...


class SingleRedis:
    """One redis-server with AOF on: a SIGTERM restart keeps every acknowledged write."""

    name = "single"
    loses_acknowledged_writes_on_restart = False

    def __init__(self) -> None:
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


TOPOLOGIES = {"single": SingleRedis}


def start_topology(name: str) -> RedisTopology:
    topology = TOPOLOGIES[name]()
    return topology.start()
