"""Scenario sizes (full and quick), the figures the harness reports, and their targets."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Literal

SCENARIOS = (
    "publish-single",
    "publish-batch",
    "fanout",
    "broadcast",
    "storm",
    "idle",
    "sessions",
    "churn",
)
# The baseline has no topic close, so a churn of topics that end is not its job.
BROKER_ONLY = frozenset({"churn"})
# Nchan is driven with the broker's publish and subscribe routes only: it runs `sessions`
# by one POST per token without a close, as the baseline does; churn closes every topic.
NOT_FOR_NCHAN = frozenset({"churn"})
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
    # The pauses that let a server settle before the idle and storm scenarios read its
    # memory, its Redis connections or Redis's calls (2 s the longest, at 1.0), scaled.
    settle_s: float = 1.0
    connect_concurrency: int = 200
    loadgen_processes: int = 2
    sessions_modes: str = "post,ingest,direct"  # the ways of publishing measured (for --set)
    sessions_concurrent: int = 500  # generations running at once, each on its own topic
    sessions_rate: float = 20.0  # tokens/s of one generation
    sessions_tokens: int = 100
    sessions_rounds: int = 3  # generations each slot runs, one after another
    sessions_drop_fraction: float = 0.2  # subscribers that drop mid-generation and resume
    sessions_ttl_s: float = 10.0  # BROKER_TOPIC_TTL_SECONDS for the sessions run
    sessions_grace_s: float = 15.0  # a session not over this long after its close fails
    churn_rate: float = 200.0  # new topics/s
    churn_live: int = 5000  # topics open at once (each lives churn_live / churn_rate s)
    churn_events: int = 3  # per topic, spread over its life; the last one closes it
    churn_measure_s: float = 15.0  # after the ramp (one lifetime)
    churn_publishers: int = 32  # keep-alive publishing connections per load generator


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
    sessions_concurrent=10,
    sessions_tokens=20,
    sessions_rounds=2,
    sessions_ttl_s=2.0,
    sessions_grace_s=5.0,
    churn_rate=20.0,
    churn_live=60,
    churn_measure_s=3.0,
    churn_publishers=4,
)


def sizes_for(target: str, quick: bool) -> Sizes:
    """The baseline holds one Redis connection per subscriber: 10,000 would exhaust Redis's
    default maxclients, so it is measured idle with fewer."""
    sizes = QUICK if quick else FULL
    if target == "baseline" and not quick:
        return replace(sizes, idle_subscribers=2000, broadcast_subscribers=2000)
    return sizes


def server_env(scenario: str, sizes: Sizes) -> dict[str, str]:
    """Settings a scenario runs the server with: `sessions` measures expiry."""
    if scenario == "sessions":
        return {"BROKER_TOPIC_TTL_SECONDS": f"{sizes.sessions_ttl_s:g}"}
    return {}


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
    baseline: bool = True  # whether the baseline can produce it
    nchan: bool = True  # whether Nchan can, in a scenario it runs (it only POSTs, never closes)

    def met(self, value: float) -> bool | None:
        if self.target is None:
            return None
        return value >= self.target if self.better == "higher" else value <= self.target

    def target_text(self) -> str:
        if self.target is None:
            return ""
        return (">= " if self.better == "higher" else "<= ") + f"{self.target:,g}"


def _per_mode(
    key: str, label: str, better: Better, target: float | None, digits: int
) -> list[Figure]:
    """A sessions figure for each way of publishing (the baseline and Nchan only have one
    POST per token)."""
    return [
        Figure("sessions", f"{key}_{mode}", f"sessions ({name}): {label}", better, target, digits,
               baseline=mode == "post", nchan=mode == "post")
        for mode, name in (("post", "POST/token"), ("ingest", "ingest"), ("direct", "direct"))
    ]  # fmt: skip


SESSIONS_FIGURES = (
    *_per_mode("exact_pct", "sessions exact %", "higher", 100.0, 2),
    *_per_mode("cpu_us_per_token", "server CPU us/token", "lower", None, 1),
    Figure("sessions", "ingest_vs_post_cpu", "sessions: ingest CPU/token / POST's", "lower", 0.2, 3,
           baseline=False, nchan=False),
    Figure("sessions", "direct_vs_post_cpu", "sessions: direct CPU/token / POST's", "lower", None,
           3, baseline=False, nchan=False),
    Figure("sessions", "ingest_vs_post_publishing_cpu",
           "sessions: ingest / POST CPU/token, publishing only (less direct's)", "lower", None, 3,
           baseline=False, nchan=False),
    *_per_mode("redis_cpu_us_per_token", "Redis CPU us/token", "lower", None, 1),
    *_per_mode("latency_p50_ms", "token latency p50 ms", "lower", None, 1),
    *_per_mode("latency_p99_ms", "token latency p99 ms", "lower", None, 1),
    Figure("sessions", "redis_keys_after_ttl", "sessions: Redis keys after the TTL", "lower", 0, 0),
    Figure("sessions", "redis_memory_kb_after_ttl", "sessions: Redis memory KB added, after TTL",
           "lower"),
)  # fmt: skip
CHURN_FIGURES = (
    Figure("churn", "new_topics_per_s", "churn: new topics/s", "higher", None, 0, baseline=False),
    Figure("churn", "live_topics", "churn: live topics", "higher", None, 0, baseline=False),
    Figure("churn", "delivery_p50_ms", "churn: delivery p50 ms (append->receipt)", "lower", None,
           1, baseline=False),
    Figure("churn", "delivery_p99_ms", "churn: delivery p99 ms (append->receipt)", "lower", 100.0,
           1, baseline=False),
    Figure("churn", "latency_p50_ms", "churn: latency p50 ms (publish->receipt)", "lower", None,
           1, baseline=False),
    Figure("churn", "latency_p99_ms", "churn: latency p99 ms (publish->receipt)", "lower", None,
           1, baseline=False),
    Figure("churn", "delivered_pct", "churn: events delivered %", "higher", 100.0, 2,
           baseline=False),
    Figure("churn", "server_cores", "churn: server CPU cores", "lower", None, 2, baseline=False),
    Figure("churn", "redis_cores", "churn: Redis CPU cores", "lower", None, 2, baseline=False),
    Figure("churn", "xread_us", "churn: Redis us per XREAD", "lower", None, 0, baseline=False),
)  # fmt: skip

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
    *SESSIONS_FIGURES,
    *CHURN_FIGURES,
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
