"""Prometheus metrics: the core's Observer, implemented with prometheus-client.

With several uvicorn workers the CLI sets ``PROMETHEUS_MULTIPROC_DIR`` so that
``/metrics`` on any worker reports the sum over all of them.

The counts made on every request (events published and delivered, append
latencies, answers by route and status) are summed in plain numbers and
written to prometheus-client at most every ``FLUSH_SECONDS``, and before each
scrape. With several workers every prometheus-client update is a locked write
to a memory-mapped file behind a ``getpid()`` system call: measured, 6.1 µs of
a publish's ~110 µs of server CPU for its three updates, against 0.3 µs summed
here. So a scrape sees its own worker's counts exactly and the other workers'
as of at most a second ago.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import math
import os
import weakref
from typing import Any, Literal, get_args

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
STORE_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
STORE_LATENCY = Histogram(
    "broker_store_latency_seconds",
    "Store operation latency",
    ["operation"],
    buckets=STORE_LATENCY_BUCKETS,
)
HTTP_RESPONSES = Counter(
    "broker_http_responses_total",
    "HTTP answers written, by route class and status (streams once, as their head is sent)",
    ["route", "status"],
)
LINGERING_CLOSES = Counter(
    "broker_lingering_closes_total",
    "Connections closed lingering after an answer given while the client was still"
    " sending, by how the lingering ended (api.lingering)",
    ["ending"],
)

RouteClass = Literal[
    "publish",
    "ingest",
    "stream",
    "history",
    "close",
    "delete",
    "topics",
    "topic",
    "probes",
    "metrics",
    "face",
    "other",
]
"""The ``route`` label: a fixed few, never a topic or a path (``api.answers.route_class``)."""


FLUSH_SECONDS = 1.0
"""How long the per-request counts may wait in a worker before prometheus-client has them."""

_LATENCY_BOUNDS = (*STORE_LATENCY_BUCKETS, math.inf)  # prometheus-client adds the +Inf bucket
_LIVE_OBSERVERS: weakref.WeakSet[PrometheusObserver] = weakref.WeakSet()
_PENDING_RESPONSES: dict[RouteClass, dict[int, int]] = {r: {} for r in get_args(RouteClass)}
"""Answers since the last flush, by route then status (measured: 107 ns a count, where
one dict keyed by (route, status) took 178, hashing a new tuple twice)."""


def count_response(route: RouteClass, status: int) -> None:
    """One HTTP answer written; summed here, like the core's per-request counts, on
    every path that writes one (the app, and the lean paths of ``api.connections``)."""
    by_status = _PENDING_RESPONSES[route]
    by_status[status] = by_status.get(status, 0) + 1


@functools.cache
def _responses_of(route: RouteClass, status: int) -> Any:
    return HTTP_RESPONSES.labels(route, str(status))


def _flush_responses() -> None:
    for route, by_status in _PENDING_RESPONSES.items():
        for status, count in by_status.items():
            _responses_of(route, status).inc(count)
        by_status.clear()


@functools.cache
def _latency_of(operation: str) -> Any:
    """The labelled child, looked up once: publishes observe it on every request."""
    return STORE_LATENCY.labels(operation)


class _PendingLatencies:
    """Latencies observed since the last flush: a count per bucket, and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(_LATENCY_BOUNDS)
        self.total = 0.0

    def add(self, seconds: float) -> None:
        # The first bucket whose bound is >= the value: prometheus-client's own rule.
        self.counts[bisect.bisect_left(_LATENCY_BOUNDS, seconds)] += 1
        self.total += seconds

    def flush_to(self, child: Any) -> None:
        """Add them to the histogram's child. prometheus-client has no bulk observe:
        its bucket and sum values are written directly (pinned version; the surface
        is tested in tests/unit/test_metrics.py)."""
        for bucket, count in zip(child._buckets, self.counts, strict=True):
            if count:
                bucket.inc(count)
        child._sum.inc(self.total)
        self.counts = [0] * len(_LATENCY_BOUNDS)
        self.total = 0.0


class PrometheusObserver(Observer):
    """Counts what the core reports (the per-request counts batched: see the module)."""

    def __init__(self) -> None:
        self._published = 0
        self._delivered = 0
        self._latencies: dict[str, _PendingLatencies] = {}
        self._flusher: asyncio.TimerHandle | None = None
        _LIVE_OBSERVERS.add(self)

    def start_flushing(self) -> None:
        """Flush every ``FLUSH_SECONDS`` on the running loop, until ``stop_flushing``."""
        self._flusher = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._tick)

    def stop_flushing(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.flush()

    def _tick(self) -> None:
        self.flush()
        self.start_flushing()

    def flush(self) -> None:
        """Hand what was counted since the last flush to prometheus-client."""
        if self._published:
            PUBLISHED.inc(self._published)
            self._published = 0
        if self._delivered:
            DELIVERED.inc(self._delivered)
            self._delivered = 0
        for operation, pending in self._latencies.items():
            if pending.total or any(pending.counts):
                pending.flush_to(_latency_of(operation))
        _flush_responses()  # (the edge's counts, on the same timer)

    def published(self, count: int, *, replayed: bool) -> None:
        if replayed:
            IDEMPOTENT_REPLAYS.inc()
        else:
            self._published += count

    def delivered(self, count: int) -> None:
        self._delivered += count

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
        pending = self._latencies.get(operation)
        if pending is None:
            pending = self._latencies[operation] = _PendingLatencies()
        pending.add(seconds)


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus text exposition, summed over workers when there are several
    (this worker's counts flushed first)."""
    for observer in list(_LIVE_OBSERVERS):
        observer.flush()
    _flush_responses()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
