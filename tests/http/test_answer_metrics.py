"""``broker_http_responses_total{route,status}``: every answer counted once, under its
route and status, whichever way it was served: on the connection (a lean publish or
stream, a refusal written before any app) or by the app (a request uvicorn serves:
handed over, or sent behind another on the connection).

Each case scrapes before and after and asserts the whole difference: the series its
answers should move, by exactly their number, and no other (the scrapes' own
``route="metrics"`` aside).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.http.helpers import RawResponse, new_topic, raw_request, request_bytes
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer
from tests.support.tokens import JWT_SETTINGS

Answers = dict[tuple[str, str], float]
EVENT_STREAM = {"Accept": "text/event-stream"}
EVENT = b'{"data": {"n": 1}}'


def answers(url: str) -> Answers:
    """Every ``broker_http_responses_total`` sample: (route, status) -> count."""
    text = httpx.get(url + "/metrics", timeout=5).text
    found: Answers = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "broker_http_responses_total":
                found[(sample.labels["route"], sample.labels["status"])] = sample.value
    return found


def counted_between(before: Answers, after: Answers) -> Answers:
    """What moved, but the scrapes' own answers."""
    keys = set(before) | set(after)
    moved = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in keys}
    return {key: n for key, n in moved.items() if n and key[0] != "metrics"}


def publish_bytes(url: str, topic: str, body: bytes = EVENT, **headers: str) -> bytes:
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
    return request_bytes("POST", f"{url}/topics/{topic}/events", headers, body)


async def answered(url: str, raw: bytes) -> RawResponse:
    """One request on a new connection (its first: the connection's own code reads it)."""
    response = await raw_request(url, raw_head=raw)
    await response.close()
    return response


async def answered_by_app(url: str, raw: bytes) -> RawResponse:
    """One request sent behind a health check: uvicorn reads it, and the app answers."""
    health = request_bytes("GET", f"{url}/healthz")
    first = await raw_request(url, raw_head=health + raw)
    assert first.status == 200
    await first.read_sized_body()
    second = RawResponse(first.reader, first.writer)
    await second.read_head()
    await second.close()
    return second


@pytest.fixture(scope="module")
def open_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """Authorization off, on 127.0.0.1: requests naming another host are refused."""
    process = BrokerProcess(redis_url=redis_server.url, env={}).start()
    yield process
    process.close()


@pytest.fixture(scope="module")
def auth_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    process = BrokerProcess(redis_url=redis_server.url, env=JWT_SETTINGS).start()
    yield process
    process.close()


Case = Callable[[str, str], Awaitable[int]]
"""Sends its request(s) to the broker at ``url`` about ``topic``; the status it got."""


async def lean_publish(url: str, topic: str) -> int:
    return (await answered(url, publish_bytes(url, topic))).status


async def publish_by_app(url: str, topic: str) -> int:
    return (await answered_by_app(url, publish_bytes(url, topic))).status


async def bad_json_publish(url: str, topic: str) -> int:
    return (await answered(url, publish_bytes(url, topic, b'{"data": '))).status


async def too_large_publish(url: str, topic: str) -> int:
    head = publish_bytes(url, topic, b"")
    head = head.replace(b"Content-Length: 0", b"Content-Length: %d" % (1 << 30))
    return (await answered(url, head)).status


async def lean_ingest(url: str, topic: str) -> int:
    raw = publish_bytes(url, topic, EVENT + b"\n", **{"Content-Type": "application/x-ndjson"})
    return (await answered(url, raw)).status


async def lean_stream(url: str, topic: str) -> int:
    stream = await raw_request(f"{url}/topics/{topic}/events", headers=EVENT_STREAM)
    await stream.read_until(b"\n\n")  # the retry hint
    await stream.close()
    return stream.status


async def stream_by_app(url: str, topic: str) -> int:
    raw = request_bytes("GET", f"{url}/topics/{topic}/events", EVENT_STREAM)
    return (await answered_by_app(url, raw)).status


async def history(url: str, topic: str) -> int:
    raw = request_bytes("GET", f"{url}/topics/{topic}/events", {"Accept": "application/json"})
    return (await answered(url, raw)).status


async def unknown_path(url: str, topic: str) -> int:
    return (await answered(url, request_bytes("GET", f"{url}/no/such/route"))).status


async def refused_host(url: str, topic: str) -> int:
    raw = publish_bytes(url, topic).replace(b"Host: 127.0.0.1", b"Host: rebound.example", 1)
    return (await answered(url, raw)).status


async def head_too_large(url: str, topic: str) -> int:
    raw = publish_bytes(url, topic, **{"X-Padding": "x" * 100_000})
    return (await answered(url, raw)).status


CASES: list[tuple[Case, int, Answers]] = [
    (lean_publish, 201, {("publish", "201"): 1}),
    (publish_by_app, 201, {("probes", "200"): 1, ("publish", "201"): 1}),
    (bad_json_publish, 400, {("publish", "400"): 1}),  # handed to the app
    (too_large_publish, 413, {("publish", "413"): 1}),  # answered on its head
    (lean_ingest, 201, {("ingest", "201"): 1}),
    (lean_stream, 200, {("stream", "200"): 1}),
    (stream_by_app, 200, {("probes", "200"): 1, ("stream", "200"): 1}),
    (history, 200, {("history", "200"): 1}),
    (unknown_path, 404, {("other", "404"): 1}),
    (refused_host, 421, {("publish", "421"): 1}),
    (head_too_large, 431, {("other", "431"): 1}),
]


@pytest.mark.parametrize(("case", "status", "counted"), CASES, ids=[c[0].__name__ for c in CASES])
async def test_each_answer_is_counted_once_under_its_route_and_status(
    open_broker: BrokerProcess, case: Case, status: int, counted: Answers
) -> None:
    url = open_broker.url
    before = answers(url)
    assert await case(url, new_topic("answers")) == status
    assert counted_between(before, answers(url)) == counted


async def test_a_reconnect_past_a_closed_topics_end_counts_a_204(
    open_broker: BrokerProcess,
) -> None:
    url, topic = open_broker.url, new_topic("answers")
    before = answers(url)
    assert (await answered(url, publish_bytes(url, topic))).status == 201
    close = request_bytes("POST", f"{url}/topics/{topic}/close", {"Content-Length": "0"})
    assert (await answered(url, close)).status == 201
    reconnect = request_bytes("GET", f"{url}/topics/{topic}/events", EVENT_STREAM)
    assert (await answered(url, reconnect)).status == 204
    assert counted_between(before, answers(url)) == {
        ("publish", "201"): 1,
        ("close", "201"): 1,
        ("stream", "204"): 1,
    }


async def test_an_unauthorized_publish_counts_a_401(auth_broker: BrokerProcess) -> None:
    url = auth_broker.url
    before = answers(url)
    response = await answered(url, publish_bytes(url, new_topic("answers")))
    assert response.status == 401
    assert counted_between(before, answers(url)) == {("publish", "401"): 1}
