"""The batched metrics (``api.metrics``): what the hot path counts reaches the exposition
exactly as prometheus-client's own calls would have put it, and in time."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api import metrics
from api.answers import route_class
from api.metrics import PrometheusObserver, render_metrics

LATENCIES = [0.0001, 0.0005, 0.0007, 0.003, 0.003, 0.2, 0.9, 1.0, 7.5]
"""One in every bucket, values on bucket bounds, and one past the last (+Inf)."""


def samples(text: bytes, family: str, operation: str) -> dict[str, float]:
    """The samples of one histogram's child, by name and bound: ``name{le}`` -> value."""
    found = {}
    for metric in text_string_to_metric_families(text.decode()):
        if metric.name != family:
            continue
        for sample in metric.samples:
            if sample.labels.get("operation") == operation:
                found[sample.name + sample.labels.get("le", "")] = sample.value
    return found


def test_batched_latencies_read_as_prometheus_client_would_have_counted_them() -> None:
    """Fails if prometheus-client's histogram internals (its buckets and sum values,
    written directly by the flush) moved: the pinned surface."""
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "broker_store_latency_seconds",
        "Store operation latency",
        ["operation"],
        buckets=metrics.STORE_LATENCY_BUCKETS,
        registry=reference_registry,
    )
    observer = PrometheusObserver()
    for seconds in LATENCIES:
        observer.store_latency("unit-test", seconds)
        reference.labels("unit-test").observe(seconds)
    assert samples(render_metrics()[0], "broker_store_latency_seconds", "unit-test") == (
        samples(generate_latest(reference_registry), "broker_store_latency_seconds", "unit-test")
    )


def test_a_scrape_sees_every_publish_counted_before_it() -> None:
    def published() -> float:
        for metric in text_string_to_metric_families(render_metrics()[0].decode()):
            if metric.name == "broker_published_events":
                return sum(s.value for s in metric.samples if s.name.endswith("_total"))
        raise AssertionError("no broker_published_events_total")

    before = published()
    observer = PrometheusObserver()
    for _ in range(5):
        observer.published(2, replayed=False)
    observer.published(1, replayed=True)  # an idempotent repeat: not an event published
    assert published() == before + 10


async def test_the_timer_flushes_without_a_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "FLUSH_SECONDS", 0.01)
    before = metrics.DELIVERED._value.get()
    observer = PrometheusObserver()
    observer.start_flushing()
    try:
        observer.delivered(7)
        for _ in range(200):  # bounded: 2 s at most
            if metrics.DELIVERED._value.get() == before + 7:
                break
            await asyncio.sleep(0.01)
        assert metrics.DELIVERED._value.get() == before + 7
    finally:
        observer.stop_flushing()
    observer.delivered(1)
    observer.stop_flushing()  # stopping flushes what is left
    assert metrics.DELIVERED._value.get() == before + 8


@pytest.mark.parametrize(
    ("method", "path", "headers", "route"),
    [
        ("POST", "/topics/t/events", [(b"content-type", b"application/json")], "publish"),
        ("POST", "/topics/t/events", [(b"content-type", b"application/x-ndjson")], "ingest"),
        ("GET", "/topics/t/events", [], "stream"),
        ("GET", "/topics/t/events", [(b"accept", b"application/json")], "history"),
        ("GET", "/events", [], "stream"),
        ("POST", "/topics/t/close", [], "close"),
        ("DELETE", "/topics/t", [], "delete"),
        ("GET", "/topics/t", [], "topic"),
        ("GET", "/topics", [], "topics"),
        ("GET", "/readyz/store", [], "probes"),
        ("GET", "/metrics", [], "metrics"),
        ("GET", "/static/page.css", [], "face"),
        ("PUT", "/topics/t", [], "other"),
        ("OPTIONS", "/topics/t/events", [], "other"),
        ("GET", "/topics/a/b/events", [], "other"),
        ("GET", "/no/such/route", [], "other"),
    ],
)
def test_a_request_is_classed_by_its_route_never_its_topic_or_path(
    method: str, path: str, headers: list[tuple[bytes, bytes]], route: str
) -> None:
    assert route_class({"method": method, "path": path, "headers": headers}) == route
