"""Operations: health, readiness, metrics, OpenAPI, freeing subscriptions, SIGTERM."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.http.helpers import (
    RawResponse,
    SseStream,
    metric_value,
    new_topic,
    publish_many,
    raw_request,
    read_metric,
    subscribe,
)
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until, wait_until
from tests.support.redis_server import RedisServer

EVENT_STREAM = {"Accept": "text/event-stream"}
METRICS = {
    "broker_published_events_total": "counter",
    "broker_delivered_events_total": "counter",
    "broker_connected_subscribers": "gauge",
    "broker_gaps_sent_total": "counter",
    "broker_slow_subscribers_dropped_total": "counter",
    "broker_replay_events": "histogram",
    "broker_store_errors_total": "counter",
    "broker_store_latency_seconds": "histogram",
}


def test_healthz_and_readyz(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    store = client.get("/readyz/store")
    assert store.status_code == 200
    assert store.json()["store"] == "redis", store.json()
    # The probes need no token: they name the kind of store, never where it is.
    for probe in (store, client.get("/readyz")):
        assert probe.json()["store"] == "redis"
        assert "127.0.0.1" not in probe.text, probe.text


async def test_readyz_is_503_only_while_draining() -> None:
    """Draining is the one reason a load balancer should send new connections elsewhere;
    the store's health is /readyz/store's to tell. In-process: a real drain is short."""
    from api.app import create_app

    app = create_app()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
            assert (await client.get("/readyz")).status_code == 200
            app.state.streams.draining = True
            draining = await client.get("/readyz")
            store = await client.get("/readyz/store")
    assert draining.status_code == 503
    assert draining.headers["retry-after"].isdigit()
    assert draining.json()["status"] == "draining"
    assert store.status_code == 200, "the store still answers while the instance drains"


def test_metrics_is_prometheus_text_with_the_broker_metrics(client: httpx.Client) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "version=" in response.headers["content-type"]
    for name, kind in METRICS.items():
        assert f"# TYPE {name} {kind}" in response.text, name
    for line in response.text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2, line


async def test_metrics_count_what_happens(aclient: httpx.AsyncClient) -> None:
    async def value(name: str, labels: dict[str, str] | None = None) -> float:
        text = (await aclient.get("/metrics")).text
        return metric_value(text, name, labels) or 0.0

    published = await value("broker_published_events_total")
    delivered = await value("broker_delivered_events_total")
    gaps = await value("broker_gaps_sent_total", {"reason": "unknown"})
    replays = await value("broker_replay_events_count")
    latency = await value("broker_store_latency_seconds_count")
    topic = new_topic()
    ids = await publish_many(aclient, topic, [1, 2, 3])
    async with subscribe(aclient, topic) as stream:
        await publish_many(aclient, topic, [4])
        await stream.next()
    async with subscribe(aclient, topic, last_event_id="abcdefgh.1-0") as stream:
        assert (await stream.next()).event == "broker.gap"
        await stream.take(len(ids) + 1)
    assert await value("broker_published_events_total") == published + 4
    assert await value("broker_delivered_events_total") >= delivered + 1
    assert await value("broker_gaps_sent_total", {"reason": "unknown"}) == gaps + 1
    assert await value("broker_replay_events_count") >= replays + 1
    assert await value("broker_store_latency_seconds_count") > latency


DELIVERED = "broker_delivered_events_total"


async def _delivered_and_deletion_notices(client: httpx.AsyncClient) -> tuple[float, float]:
    text = (await client.get("/metrics")).text
    deleted = metric_value(text, "broker_gaps_sent_total", {"reason": "deleted"})
    return metric_value(text, DELIVERED) or 0.0, deleted or 0.0


async def test_delivered_events_counts_the_events_written_to_each_subscriber(
    broker_on_redis: BrokerProcess,
) -> None:
    """``broker_delivered_events_total`` moves by the events written to subscribers,
    replayed or live, and by nothing else: a stream's cursor, retry hint and heartbeats
    are no events, nor is a deletion's ``broker.gap`` notice, which
    ``broker_gaps_sent_total`` counts. It counted the log's entries, the deletion's
    marker among them: one more per stream that saw the deletion live, none for a
    stream told of it as it resumed (the same notice)."""
    async with httpx.AsyncClient(base_url=broker_on_redis.url, timeout=10) as client:
        delivered, deletions = await _delivered_and_deletion_notices(client)
        topic = new_topic()
        earlier = await publish_many(client, topic, [1, 2, 3])
        async with (
            subscribe(client, topic) as live,
            subscribe(client, topic, params={"from": "earliest"}) as replayed,
        ):
            assert [e.id for e in await replayed.take(3)] == earlier
            later = await publish_many(client, topic, [4, 5])
            for stream in (live, replayed):
                assert [e.id for e in await stream.take(2)] == later
            assert (await client.delete(f"/topics/{topic}")).status_code == 204
            for stream in (live, replayed):
                assert (await stream.next()).event == "broker.gap"
                assert await stream.wait_ended(5), "a deleted topic's stream ends"
        async with subscribe(client, topic, last_event_id=later[-1]) as resumed:
            assert (await resumed.next()).event == "broker.gap"
        written = len(earlier) + 2 * len(later)  # (the replayed stream's, the live one's)
        assert await _delivered_and_deletion_notices(client) == (
            delivered + written,
            deletions + 3,
        )


def test_openapi_document_lists_the_contract_paths(client: httpx.Client) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert document["openapi"].startswith("3.1")
    assert document["info"]["title"] and document["info"]["version"]
    paths = document["paths"]
    assert set(paths["/topics/{topic}/events"]) >= {"get", "post"}
    for path in ("/events", "/topics/{topic}", "/healthz", "/readyz", "/readyz/store", "/metrics"):
        assert "get" in paths[path], path
    post = paths["/topics/{topic}/events"]["post"]
    assert set(post["responses"]) >= {"200", "201", "400", "413", "415", "503"}


def test_docs_is_html(client: httpx.Client) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "openapi.json" in response.text


@pytest.mark.parametrize("page", ["/", "/docs"])
def test_each_page_names_an_icon_the_broker_serves(client: httpx.Client, page: str) -> None:
    """Without one a browser asks for /favicon.ico, a 404 on every load of the page."""
    icon = re.search(r'<link rel="icon"[^>]* href="([^"]+)"', client.get(page).text)
    assert icon is not None, "no icon"
    answer = client.get("/" + icon.group(1))
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"


# -- subscriptions are freed ---------------------------------------------------------------


async def _open_stream(url: str) -> RawResponse:
    stream = await raw_request(url, headers=EVENT_STREAM)
    assert stream.status == 200
    await stream.read_until(b"\n\n")  # the retry hint: the subscription is open
    return stream


async def test_connected_subscribers_counts_open_streams(broker_on_redis: BrokerProcess) -> None:
    url = broker_on_redis.url
    streams = [await _open_stream(f"{url}/topics/{new_topic()}/events") for _ in range(5)]
    try:

        def count_is(expected: int) -> bool:
            return read_metric(url, "broker_connected_subscribers") == expected

        await asyncio.to_thread(
            wait_until, lambda: count_is(5), timeout=5, what="the gauge never showed 5 streams"
        )
        for stream in streams[:2]:
            await stream.close()
        await asyncio.to_thread(
            wait_until, lambda: count_is(3), timeout=5, what="the gauge did not drop to 3"
        )
    finally:
        for stream in streams:
            await stream.close()


async def test_client_disconnects_free_their_subscriptions(broker_on_redis: BrokerProcess) -> None:
    url = broker_on_redis.url
    topic = new_topic()
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        await publish_many(client, topic, ["seed"])
        baseline_fds = await _open_fds(client)
        for cycle in range(200):
            path = f"{url}/topics/{topic}/events" if cycle % 2 else f"{url}/events?topic={topic}"
            stream = await _open_stream(path)
            await stream.close()

        async def settled() -> bool:
            text = (await client.get("/metrics")).text
            subscribers = metric_value(text, "broker_connected_subscribers")
            fds = metric_value(text, "process_open_fds") or 0
            return subscribers == 0 and fds <= baseline_fds + 5

        await await_until(settled, timeout=10, what="subscriptions or sockets were not freed")
        # The broker still serves the topic that saw 200 subscribers come and go.
        async with subscribe(client, topic) as stream:
            [live] = await publish_many(client, topic, ["after"])
            assert (await stream.next()).id == live


async def _open_fds(client: httpx.AsyncClient) -> float:
    value = metric_value((await client.get("/metrics")).text, "process_open_fds")
    assert value is not None, "process_open_fds is missing"
    return value


# -- SIGTERM ------------------------------------------------------------------------------


async def test_sigterm_ends_every_stream_cleanly_and_exits_0(
    broker_on_redis: BrokerProcess,
) -> None:
    url = broker_on_redis.url
    topic = new_topic()
    streams = [
        await _open_stream(f"{url}/topics/{topic}/events"),
        await _open_stream(f"{url}/topics/{new_topic()}/events?from=earliest"),
        await _open_stream(f"{url}/events?topic={topic}&topic={new_topic()}"),
    ]
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            [event_id] = await publish_many(client, topic, ["before shutdown"])
        await streams[0].read_until(event_id.encode())
        started = time.monotonic()
        code = await asyncio.to_thread(broker_on_redis.terminate, 10)
        elapsed = time.monotonic() - started
        assert code == 0, broker_on_redis.log()
        assert elapsed < 5, f"shutdown took {elapsed:.1f}s: the streams held it up"
        for stream in streams:
            await stream.read_to_end(timeout=5)  # fails on a reset or a cut body
            assert stream.complete
            assert await asyncio.wait_for(stream.reader.read(), 5) == b""
    finally:
        for stream in streams:
            await stream.close()


async def test_an_httpx_sse_stream_ends_cleanly_on_sigterm(broker_on_redis: BrokerProcess) -> None:
    topic = new_topic()
    async with httpx.AsyncClient(base_url=broker_on_redis.url, timeout=10) as client:
        async with SseStream(client, f"/topics/{topic}/events") as stream:
            [event_id] = await publish_many(client, topic, ["x"])
            assert (await stream.next()).id == event_id
            assert await asyncio.to_thread(broker_on_redis.terminate, 10) == 0
            assert await stream.wait_ended(5)
            assert stream.error is None, f"the stream was cut, not ended: {stream.error!r}"


async def test_stats_rates_hold_on_a_host_whose_clock_is_off(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, topic: str
) -> None:
    """Event ids carry Redis's clock: a rate window placed by this host's clock (three
    hours ahead here) held none of them, and every topic read 0 events/s."""
    from api.app import create_app

    monkeypatch.setenv("BROKER_REDIS_URL", redis_server.url)
    app = create_app()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
            for n in range(3):
                published = await client.post(f"/topics/{topic}/events", json={"data": n})
                assert published.status_code == 201
            real_time = time.time
            monkeypatch.setattr(time, "time", lambda: real_time() + 3 * 3600)
            stats = (await client.get("/stats", params={"topic": topic})).json()
    [row] = [row for row in stats["topics"] if row["topic"] == topic]
    assert row["events_per_second"] > 0
