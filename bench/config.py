"""Scenario sizes (full and quick), the figures the harness reports, and their targets."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Literal

SCENARIOS = ("publish-single", "publish-batch", "fanout", "broadcast", "storm", "idle")
LOADGEN_SATURATED = 0.9  # of one core, per load-generator process
MACHINE_CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is. The baseline may get smaller sizes where it cannot cope."""

    fanout_subscribers: int = 1000
    fanout_rate: int = 200
    fanout_seconds: float = 15.0
    fanout_sampled: int = 50  # subscribers that parse every event to record latency
    fanout_sweep_s: float = 0.05  # how often the other subscribers' sockets are read
    # The large-audience case (issue 13): few events, each to very many idle subscribers.
    broadcast_subscribers: int = 15_000
    broadcast_rate: float = 2.0
    broadcast_events: int = 20
    idle_subscribers: int = 10_000
    publish_connections: int = 8
    publish_seconds: float = 10.0
    batch_size: int = 100
    storm_clients: int = 5000
    storm_behind: int = 100
    storm_timeout_s: float = 30.0
    grace_s: float = 10.0
    connect_concurrency: int = 200
    loadgen_processes: int = 2


FULL = Sizes()
QUICK = Sizes(
    fanout_subscribers=20,
    fanout_rate=50,
    fanout_seconds=1.5,
    fanout_sampled=5,
    broadcast_subscribers=30,
    broadcast_rate=4.0,
    broadcast_events=4,
    idle_subscribers=100,
    publish_seconds=1.0,
    storm_clients=40,
    storm_timeout_s=10.0,
    grace_s=3.0,
    loadgen_processes=1,
)


def sizes_for(target: str, quick: bool) -> Sizes:
    """The baseline holds one Redis connection per subscriber: 10,000 would exhaust Redis's
    default maxclients, so it is measured idle with fewer."""
    sizes = QUICK if quick else FULL
    if target == "baseline" and not quick:
        return replace(sizes, idle_subscribers=2000, broadcast_subscribers=2000)
    return sizes


Better = Literal["higher", "lower"]


@dataclass(frozen=True)
class Figure:
    """One row of the table: a measured number, which way is better, and its target."""

    scenario: str
    key: str
    label: str
    better: Better
    target: float | None = None
    digits: int = 1

    def met(self, value: float) -> bool | None:
        if self.target is None:
            return None
        return value >= self.target if self.better == "higher" else value <= self.target

    def target_text(self) -> str:
        if self.target is None:
            return ""
        return (">= " if self.better == "higher" else "<= ") + f"{self.target:,g}"


FIGURES = (
    Figure("fanout", "deliveries_per_s", "fanout: deliveries/s", "higher", digits=0),
    Figure("fanout", "delivered_pct", "fanout: events delivered %", "higher", 100.0, 2),
    Figure("fanout", "cpu_us_per_delivery", "fanout: server CPU us/delivery", "lower", 6.0, 2),
    Figure("fanout", "latency_p50_ms", "fanout: latency p50 ms", "lower"),
    Figure("fanout", "latency_p99_ms", "fanout: latency p99 ms", "lower", 100.0),
    Figure("fanout", "latency_max_ms", "fanout: latency max ms", "lower"),
    Figure("broadcast", "deliveries_per_s", "broadcast: deliveries/s", "higher", digits=0),
    Figure("broadcast", "delivered_pct", "broadcast: events delivered %", "higher", 100.0, 2),
    Figure(
        "broadcast", "cpu_us_per_delivery", "broadcast: server CPU us/delivery", "lower", digits=2
    ),
    Figure("broadcast", "latency_p50_ms", "broadcast: latency p50 ms", "lower"),
    Figure("broadcast", "latency_p99_ms", "broadcast: latency p99 ms", "lower"),
    Figure("broadcast", "latency_max_ms", "broadcast: latency max ms", "lower"),
    Figure("publish-single", "events_per_s", "publish single: events/s", "higher", 6500, 0),
    Figure("publish-batch", "events_per_s", "publish batch: events/s", "higher", 100_000, 0),
    Figure("idle", "kb_per_subscriber", "idle: server memory KB/subscriber", "lower", 8.0, 2),
    Figure("idle", "redis_connections_growth", "idle: Redis conns added N/10->N", "lower", 0, 0),
    Figure("storm", "catch_up_s", "storm: time until all caught up s", "lower", 5.0, 2),
    Figure("storm", "caught_up_pct", "storm: clients caught up %", "higher", 100.0, 2),
    Figure("storm", "redis_commands", "storm: Redis commands issued", "lower", digits=0),
    Figure("storm", "redis_commands_per_client", "storm: Redis commands/client", "lower", 0.1, 3),
)

AUTH_TOLERANCE = 0.10
"""Authorization may cost publish and fan-out at most this much (the issue's bound)."""
AUTH_FIGURES = (
    *(
        figure
        for figure in FIGURES
        if (figure.scenario, figure.key)
        in {
            ("publish-single", "events_per_s"),
            ("fanout", "deliveries_per_s"),
            ("fanout", "cpu_us_per_delivery"),
            ("fanout", "latency_p50_ms"),
            ("fanout", "latency_p99_ms"),
        }
    ),
    # Less swayed by other load on the machine than events/s.
    Figure(
        "publish-single",
        "server_cpu_us_per_event",
        "publish single: server CPU us/event",
        "lower",
        digits=1,
    ),
)
