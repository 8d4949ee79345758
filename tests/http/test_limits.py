"""Limits: event, body and batch sizes (413), topics per subscription, the idempotency window."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.http.conftest import LIMITS
from tests.http.helpers import (
    RawResponse,
    SseStream,
    assert_problem,
    new_topic,
    publish_json,
    raw_request,
)
from tests.support.broker_process import BrokerProcess
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer

MAX_EVENT = int(LIMITS["BROKER_MAX_EVENT_BYTES"])
MAX_BODY = int(LIMITS["BROKER_MAX_BODY_BYTES"])
MAX_BATCH = int(LIMITS["BROKER_MAX_BATCH"])
MAX_TOPICS = int(LIMITS["BROKER_MAX_TOPICS_PER_SUBSCRIPTION"])
TEXT = {"Content-Type": "text/plain; charset=utf-8"}


def publish_text(client: httpx.Client, topic: str, body: bytes) -> httpx.Response:
    return client.post(f"/topics/{topic}/events", content=body, headers=TEXT)


def stored(client: httpx.Client, topic: str) -> int | None:
    """The topic's length, or None while it has never had an event."""
    response = client.get(f"/topics/{topic}")
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    return int(response.json()["length"])


def test_an_event_of_exactly_max_event_bytes_is_accepted(limits_client: httpx.Client) -> None:
    topic = new_topic()
    assert publish_text(limits_client, topic, b"x" * MAX_EVENT).status_code == 201


def test_a_text_event_over_max_event_bytes_is_413(limits_client: httpx.Client) -> None:
    topic = new_topic()
    assert_problem(publish_text(limits_client, topic, b"x" * (MAX_EVENT + 1)), 413)
    # Bytes, not characters: 513 two-byte characters are 1026 bytes.
    assert_problem(publish_text(limits_client, topic, "é".encode() * (MAX_EVENT // 2 + 1)), 413)
    assert stored(limits_client, topic) is None


def test_a_json_event_over_max_event_bytes_is_413(limits_client: httpx.Client) -> None:
    topic = new_topic()
    response = limits_client.post(f"/topics/{topic}/events", json={"data": "x" * (2 * MAX_EVENT)})
    assert_problem(response, 413)
    assert stored(limits_client, topic) is None


def test_an_events_type_counts_toward_max_event_bytes(limits_client: httpx.Client) -> None:
    """Data and type together: a long type with one byte of data passed the limit."""
    topic = new_topic()
    posted = limits_client.post(
        f"/topics/{topic}/events", json={"data": "", "event": "e" * (MAX_EVENT - 2)}
    )  # its data is '""': two bytes
    assert posted.status_code == 201, posted.text
    over = {"data": "", "event": "e" * (MAX_EVENT - 1)}
    assert_problem(limits_client.post(f"/topics/{topic}/events", json=over), 413)
    text_over = limits_client.post(
        f"/topics/{topic}/events",
        params={"event": "e" * MAX_EVENT},
        content=b"x",
        headers=TEXT,
    )
    assert_problem(text_over, 413)
    line = json.dumps({"data": 1, "event": "e" * MAX_EVENT}).encode() + b"\n"
    ingest = limits_client.post(
        f"/topics/{topic}/events", content=line, headers={"Content-Type": "application/x-ndjson"}
    )
    assert_problem(ingest, 413)
    assert stored(limits_client, topic) == 1


def test_a_batch_with_one_event_over_the_limit_stores_nothing(limits_client: httpx.Client) -> None:
    topic = new_topic()
    assert limits_client.post(f"/topics/{topic}/events", json={"data": 0}).status_code == 201
    batch = [{"data": 1}, {"data": "x" * (2 * MAX_EVENT)}, {"data": 3}]
    assert_problem(limits_client.post(f"/topics/{topic}/events", json=batch), 413)
    assert stored(limits_client, topic) == 1


def test_a_batch_of_max_batch_is_accepted_and_one_more_is_413(limits_client: httpx.Client) -> None:
    topic = new_topic()
    full = [{"data": n} for n in range(MAX_BATCH)]
    response = limits_client.post(f"/topics/{topic}/events", json=full)
    assert response.status_code == 201, response.text
    assert len(response.json()["ids"]) == MAX_BATCH
    over = [{"data": n} for n in range(MAX_BATCH + 1)]
    assert_problem(limits_client.post(f"/topics/{topic}/events", json=over), 413)
    assert stored(limits_client, topic) == MAX_BATCH


def test_a_body_over_max_body_bytes_is_413(limits_client: httpx.Client) -> None:
    topic = new_topic()
    body = b'{"data": 1}' + b" " * MAX_BODY  # valid JSON, small event, big body
    response = limits_client.post(
        f"/topics/{topic}/events", content=body, headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 413)
    text = publish_text(limits_client, topic, b"x" * (MAX_BODY + 1))
    assert_problem(text, 413)
    assert stored(limits_client, topic) is None


def test_a_body_of_exactly_max_body_bytes_is_accepted(limits_client: httpx.Client) -> None:
    topic = new_topic()
    head = b'{"data": 1}'
    body = head + b" " * (MAX_BODY - len(head))
    response = limits_client.post(
        f"/topics/{topic}/events", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 201, response.text


async def _answer_of(response: RawResponse) -> tuple[int, dict[str, object]]:
    try:
        body = await response.read_sized_body(timeout=8)
    finally:
        await response.close()
    return response.status, json.loads(body)


async def test_a_chunked_body_over_the_limit_is_refused_before_it_ends(
    limits_broker: BrokerProcess,
) -> None:
    """No Content-Length: the broker stops once it has read past the limit.

    The client sends a little more than the limit and then nothing: the body never
    ends, so only a broker that refuses early can answer at all.
    """
    topic = new_topic()
    head = (
        f"POST /topics/{topic}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = b" " * 1024
    chunks = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") * (2 * MAX_BODY // len(piece))
    response = await asyncio.wait_for(raw_request(limits_broker.url, raw_head=head + chunks), 8)
    status, problem = await _answer_of(response)
    assert status == 413, problem
    assert problem["status"] == 413
    with httpx.Client(base_url=limits_broker.url) as check:
        assert stored(check, topic) is None


async def test_a_huge_content_length_is_refused_without_reading_the_body(
    limits_broker: BrokerProcess,
) -> None:
    topic = new_topic()
    head = (
        f"POST /topics/{topic}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n"
    ).encode()
    response = await asyncio.wait_for(raw_request(limits_broker.url, raw_head=head + b"{"), 8)
    status, problem = await _answer_of(response)
    assert status == 413, problem
    with httpx.Client(base_url=limits_broker.url) as check:
        assert stored(check, topic) is None


async def test_the_default_body_limit_is_one_mebibyte(http_broker: BrokerProcess) -> None:
    topic = new_topic()
    head = (
        f"POST /topics/{topic}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {1024 * 1024 + 1}\r\n\r\n"
    ).encode()
    response = await asyncio.wait_for(raw_request(http_broker.url, raw_head=head), 8)
    status, _ = await _answer_of(response)
    assert status == 413
    exact = b'{"data": 1}'.ljust(1024 * 1024)
    async with httpx.AsyncClient(base_url=http_broker.url, timeout=10) as client:
        ok = await client.post(
            f"/topics/{topic}/events", content=exact, headers={"Content-Type": "application/json"}
        )
        assert ok.status_code == 201, ok.text


def test_the_default_event_and_batch_limits(client: httpx.Client) -> None:
    topic = new_topic()
    assert publish_text(client, topic, b"x" * 65536).status_code == 201
    assert_problem(publish_text(client, topic, b"x" * 65537), 413)
    batch = [{"data": n} for n in range(1000)]
    assert client.post(f"/topics/{topic}/events", json=batch).status_code == 201
    assert_problem(client.post(f"/topics/{topic}/events", json=[*batch, {"data": 0}]), 413)
    assert stored(client, topic) == 1001


async def test_more_topics_than_allowed_per_subscription_is_400(
    limits_broker: BrokerProcess,
) -> None:
    topics = [new_topic() for _ in range(MAX_TOPICS + 1)]
    async with httpx.AsyncClient(base_url=limits_broker.url, timeout=10) as client:
        response = await client.get(
            "/events", params={"topic": topics}, headers={"Accept": "text/event-stream"}
        )
        assert_problem(response, 400)
        # At the limit it is a stream, and it delivers.
        async with SseStream(client, "/events", params={"topic": topics[:MAX_TOPICS]}) as stream:
            await publish_json(client, topics[MAX_TOPICS - 1], {"data": "ok"})
            assert (await stream.next()).data == '"ok"'


def test_an_idempotency_key_expires_after_the_window(limits_client: httpx.Client) -> None:
    topic = new_topic()
    headers = {"Idempotency-Key": "short-lived"}
    first = limits_client.post(f"/topics/{topic}/events", json={"data": 1}, headers=headers)
    assert first.status_code == 201
    repeat = limits_client.post(f"/topics/{topic}/events", json={"data": 1}, headers=headers)
    assert repeat.status_code == 200 and repeat.json() == first.json()

    def stored_anew() -> httpx.Response | None:
        again = limits_client.post(f"/topics/{topic}/events", json={"data": 1}, headers=headers)
        if again.status_code == 200:
            assert again.json() == first.json()
            return None
        assert again.status_code == 201, again.text
        return again

    again = wait_until(stored_anew, timeout=6, interval=0.2, what="the key never expired")
    assert again.json() != first.json()
    assert stored(limits_client, topic) == 2


async def test_a_stream_of_as_many_long_topics_as_allowed_resumes(
    redis_server: RedisServer,
) -> None:
    """Topics per stream raised (and the head limit with them, as the broker asks): the
    cursor of 80 topics of 200 characters (20,000 bytes) was refused as "cursor too
    long" by a fixed 16 KiB bound, so those streams never resumed (audit)."""
    topics = sorted(f"{new_topic()}-{n:02d}".ljust(200, "x") for n in range(80))
    env = {"BROKER_MAX_TOPICS_PER_SUBSCRIPTION": "80", "BROKER_MAX_HEAD_BYTES": "65536"}
    broker = BrokerProcess(redis_url=redis_server.url, env=env).start()
    try:
        async with httpx.AsyncClient(base_url=broker.url, timeout=10) as client:
            async with SseStream(client, "/events", params={"topic": topics}) as stream:
                await publish_json(client, topics[-1], {"data": 1})
                first = await stream.next()
            await publish_json(client, topics[0], {"data": 2})
            assert first.id is not None and len(first.id) > 16_384
            resume = {"Last-Event-ID": first.id}
            async with SseStream(client, "/events", resume, {"topic": topics}) as stream:
                assert (await stream.next()).data == "2"
    finally:
        broker.close()
