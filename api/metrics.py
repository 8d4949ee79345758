"""Prometheus metrics: the core's Observer, implemented with prometheus-client.

With several uvicorn workers the CLI sets ``PROMETHEUS_MULTIPROC_DIR`` so that
``/metrics`` on any worker reports the sum over all of them.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from broker.observer import Observer

PUBLISHED = Counter("broker_published_events_total", "Events appended to topic logs")
IDEMPOTENT_REPLAYS = Counter(
    "broker_idempotent_replays_total", "Publishes answered from an earlier Idempotency-Key"
)
DELIVERED = Counter(
    "broker_delivered_events_total", "Events written to subscribers (live or replayed)"
)
REPLAYED = Histogram(
    "broker_replay_events",
    "Events a subscriber caught up from the log in one go",
    buckets=(1, 10, 100, 1_000, 10_000, 100_000),
)
SUBSCRIBERS = Gauge(
    "broker_connected_subscribers", "Open event streams", multiprocess_mode="livesum"
)
LIVE_TOPICS = Gauge(
    "broker_live_topics", "Topics the live readers follow", multiprocess_mode="livesum"
)
LIVE_REGISTRATIONS = Gauge(
    "broker_live_registrations",
    "Subscriptions registered with the live readers, once per topic each",
    multiprocess_mode="livesum",
)
GAPS = Counter("broker_gaps_sent_total", "broker.gap notices sent", ["reason"])
DROPPED = Counter(
    "broker_slow_subscribers_dropped_total", "Subscribers disconnected for overflowing"
)
STORE_ERRORS = Counter("broker_store_errors_total", "Failed store operations", ["operation"])
STORE_LATENCY = Histogram(
    "broker_store_latency_seconds",
    "Store operation latency",
    ["operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)


@functools.cache
def _latency_of(operation: str) -> Any:
    """The labelled child, looked up once: publishes observe it on every request."""
    return STORE_LATENCY.labels(operation)


class PrometheusObserver(Observer):
    """Counts what the core reports."""

    def published(self, count: int, *, replayed: bool) -> None:
        if replayed:
            IDEMPOTENT_REPLAYS.inc()
        else:
            PUBLISHED.inc(count)

    def delivered(self, count: int) -> None:
        DELIVERED.inc(count)

    def replayed(self, count: int) -> None:
        REPLAYED.observe(count)

    def gap_sent(self, reason: str) -> None:
        GAPS.labels(reason).inc()

    def subscriber_dropped(self) -> None:
        DROPPED.inc()

    def live_changed(self, topics: int, registrations: int) -> None:
        LIVE_TOPICS.set(topics)
        LIVE_REGISTRATIONS.set(registrations)

    def store_error(self, operation: str) -> None:
        STORE_ERRORS.labels(operation).inc()

    def store_latency(self, operation: str, seconds: float) -> None:
        _latency_of(operation).observe(seconds)


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus text exposition, summed over workers when there are several."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
