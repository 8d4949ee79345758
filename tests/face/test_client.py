"""The Python client against real broker processes on a real redis-server."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from broker import constants as c
from broker import errors as broker_errors
from brokerclient import (
    AsyncPublisher,
    AsyncSubscriber,
    Event,
    Publisher,
    PublishResult,
    RetryPolicy,
    SseDecoder,
    Subscriber,
    TopicClosed,
    TopicDeleted,
    Unreachable,
    event,
)
from brokerclient import attempts as attempts_module
from brokerclient.direct import DirectPublisher
from tests.support.broker_process import BrokerProcess
from tests.support.failover import IngestAppends
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer
from tests.support.sse import parse_events

PATIENT = RetryPolicy(attempts=60, backoff=0.05, max_backoff=0.5)


def _topic(kind: str) -> str:
    return f"face.{kind}.{uuid.uuid4().hex[:8]}"


def _history(url: str, topic: str) -> list[dict[str, object]]:
    response = httpx.get(
        f"{url}/topics/{topic}/events", headers={"Accept": "application/json"}, timeout=5
    )
    return list(response.json()["events"])


class LosesFirstAnswer(httpx.HTTPTransport):
    """Sends the first publish, then loses its answer and restarts the broker: the case
    where only the Idempotency-Key can tell that the retry must store nothing."""

    def __init__(self, broker: BrokerProcess) -> None:
        super().__init__()
        self.broker, self.calls, self.restarter = broker, 0, threading.Thread()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        response = super().handle_request(request)
        if self.calls == 1:
            response.read()
            assert response.status_code == 201
            self.broker.kill()
            self.restarter = threading.Thread(target=self.broker.start)
            self.restarter.start()
            raise httpx.ReadError("the answer was lost")
        return response


def test_publish_retried_through_a_broker_restart_stores_once(own_broker: BrokerProcess) -> None:
    topic = _topic("retry")
    transport = LosesFirstAnswer(own_broker)
    with (
        httpx.Client(base_url=own_broker.url, transport=transport, timeout=5) as client,
        Publisher(client=client, retry=PATIENT) as publisher,
    ):
        result = publisher.publish(topic, {"once": True})
    transport.restarter.join(timeout=30)
    assert transport.calls > 2  # refused while the broker was down, then answered
    assert result.replayed
    assert [e["data"] for e in _history(own_broker.url, topic)] == [{"once": True}]


def test_subscriber_resumes_across_a_broker_kill_with_no_gap_and_no_duplicate(
    own_broker: BrokerProcess,
) -> None:
    topic = _topic("resume")
    with Publisher(own_broker.url, retry=PATIENT) as publisher:
        publisher.publish_batch(topic, [event(n) for n in range(5)])
        received: list[int] = []
        with Subscriber(topic, own_broker.url, from_earliest=True, give_up_after=30) as sub:
            for item in sub:
                assert not item.is_gap, item
                received.append(item.json())
                if len(received) == 5:
                    own_broker.kill()
                    own_broker.start()
                    publisher.publish_batch(topic, [event(n) for n in range(5, 10)])
                if len(received) == 10:
                    break
    assert received == list(range(10))


def test_subscriber_from_now_loses_nothing_published_while_it_reconnects(
    own_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """Killed before its first event, a subscription "from now" resumes from where it
    began, not from a new "now" (as a fresh EventSource would, losing what came between)."""
    topic = _topic("now")
    received: queue.Queue[object] = queue.Queue()
    with Publisher(own_broker.url, retry=PATIENT) as publisher:
        publisher.publish(topic, "before")
        sub = Subscriber(topic, own_broker.url, give_up_after=30)
        reader = threading.Thread(target=lambda: [received.put(e.json()) for e in sub])
        reader.start()
        try:
            wait_until(lambda: _subscribers(own_broker.url, topic) == 1, timeout=10,
                       what="the subscription to be live")  # fmt: skip
            own_broker.kill()
            asyncio.run(_publish_direct(redis_server.url, topic, "while down"))
            own_broker.start()
            publisher.publish(topic, "after")
            assert [received.get(timeout=15), received.get(timeout=15)] == ["while down", "after"]
        finally:
            publisher.publish(topic, "last", close=True)
            reader.join(timeout=15)
            sub.close()


def test_a_multi_topic_subscriber_from_now_loses_nothing_published_while_it_reconnects(
    own_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """The same for two topics: the stream's cursor, sent once it is caught up (an id
    with no event), is where it resumes, for both topics."""
    topics = [_topic("now-a"), _topic("now-b")]
    received: queue.Queue[object] = queue.Queue()
    with Publisher(own_broker.url, retry=PATIENT) as publisher:
        for topic in topics:
            publisher.publish(topic, "before")
        sub = Subscriber(topics, own_broker.url, give_up_after=30)
        reader = threading.Thread(target=lambda: [received.put(e.json()) for e in sub])
        reader.start()
        try:
            wait_until(lambda: sub.last_event_id is not None, timeout=10,
                       what="the stream's cursor")  # fmt: skip
            own_broker.kill()
            for topic in topics:
                asyncio.run(_publish_direct(redis_server.url, topic, f"while down {topic}"))
            own_broker.start()
            got = sorted(str(received.get(timeout=15)) for _ in topics)
            assert got == sorted(f"while down {topic}" for topic in topics)
        finally:
            for topic in topics:
                publisher.publish(topic, "last", close=True)
            reader.join(timeout=15)
            sub.close()


def test_a_subscriber_at_a_topic_with_no_log_is_told_of_one_that_expired_while_away(
    redis_server: RedisServer,
) -> None:
    """A subscription from now at a topic with no log started ``?from=earliest``, and
    came back so after every drop: never told of a log that came and expired while it
    was away (a TTL topic: the LLM generation that ran while the broker restarted), it
    waited in silence. It now keeps the origin its stream stands at (asked for as a
    ``broker.position``, which it keeps and does not yield), as ``/client.js`` does."""
    topic, ttl = _topic("expired-away"), 4
    broker = BrokerProcess(
        redis_url=redis_server.url,
        env={"BROKER_HEARTBEAT_SECONDS": "1", "BROKER_TOPIC_TTL_SECONDS": str(ttl)},
    ).start()
    received: queue.Queue[Event] = queue.Queue()
    sub = Subscriber(topic, broker.url, give_up_after=30)
    reader = threading.Thread(target=lambda: [received.put(e) for e in sub], daemon=True)
    try:
        reader.start()
        wait_until(lambda: _subscribers(broker.url, topic) == 1, timeout=10,
                   what="the subscription to be live")  # fmt: skip
        # Away well before a later origin is due (a quarter of the TTL): the stream's
        # start is all the subscriber holds.
        time.sleep(0.2)
        broker.kill()
        asyncio.run(_publish_direct(redis_server.url, topic, "lost", topic_ttl_seconds=ttl))
        admin = redis.Redis.from_url(redis_server.url)
        wait_until(lambda: not admin.exists(*c.topic_keys(topic)), timeout=ttl + 5,
                   what="the topic to expire")  # fmt: skip
        broker.start()
        wait_until(lambda: _subscribers(broker.url, topic) == 1, timeout=10,
                   what="the subscriber to be back")  # fmt: skip
        with Publisher(broker.url, retry=PATIENT) as publisher:
            publisher.publish(topic, "after", close=True)
        reader.join(timeout=15)
    finally:
        sub.close()
        broker.close()
    seen = list(received.queue)
    assert [(e.event, e.json().get("reason") if e.is_gap else e.data) for e in seen] == [
        ("broker.gap", "unknown"),
        (None, '"after"'),
        ("broker.end", "{}"),
    ], seen


def _subscribers(url: str, topic: str) -> int:
    stats = httpx.get(f"{url}/stats", params={"topic": topic}, timeout=5).json()
    return int(stats["topics"][0]["subscribers"])


async def _publish_direct(
    redis_url: str, topic: str, data: object, topic_ttl_seconds: float | None = None
) -> None:
    async with DirectPublisher(redis_url, topic_ttl_seconds=topic_ttl_seconds) as direct:
        await direct.publish(topic, data)


def test_subscriber_stops_at_the_end_of_a_closed_topic(face_broker: BrokerProcess) -> None:
    topic = _topic("end")
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topic, 1, close=True)
    with Subscriber(topic, face_broker.url, from_earliest=True, give_up_after=10) as sub:
        seen = list(sub)  # ends by itself
    assert [(e.event, e.data) for e in seen] == [(None, "1"), ("broker.end", "{}")]
    # Resuming past the end: the broker answers 204 and the subscriber stops.
    with Subscriber(topic, face_broker.url, last_event_id=seen[-1].id, give_up_after=10) as sub:
        assert list(sub) == []
    with Publisher(face_broker.url) as publisher, pytest.raises(TopicClosed) as refused:
        publisher.publish(topic, 2)
    assert (refused.value.status, refused.value.end_id) == (409, seen[-1].id)


def test_a_stream_whose_topic_is_deleted_under_it_raises_topic_deleted_not_closed(
    face_broker: BrokerProcess,
) -> None:
    """The broker ends an ingest whose topic was deleted under it with 409
    ``topic-deleted``: the client raised ``TopicClosed`` for it (any 409), with no
    ``end_id``, as if the topic had been closed. It is ``TopicDeleted`` now, and the
    topic is not created again (nothing resent)."""
    topic = _topic("deleted-under")

    def lines() -> Iterator[dict[str, Any]]:
        yield event(1)
        yield event(2)
        wait_until(lambda: len(_history(face_broker.url, topic)) == 2, timeout=10, what="2 lines")
        assert httpx.delete(f"{face_broker.url}/topics/{topic}", timeout=5).status_code == 204
        yield event(3)
        yield event(4)

    with Publisher(face_broker.url) as publisher, pytest.raises(TopicDeleted) as refused:
        publisher.stream(topic, lines(), idempotency_key="deleted-under")
    assert not isinstance(refused.value, TopicClosed)
    assert (refused.value.status, refused.value.problem["type"]) == (
        409,
        "/problems#topic-deleted",
    )
    topic_info = httpx.get(f"{face_broker.url}/topics/{topic}", timeout=5)
    assert topic_info.status_code == 404, topic_info.text


def test_a_stream_whose_line_records_lapse_under_it_goes_on_with_the_rest_alone(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """The broker ends a keyed ingest whose line records lapsed under it with 409
    ``ingest-records-lapsed`` (a resend of the whole stream would store its lines
    stored twice). The client raised ``RequestFailed`` for it, leaving the rest to the
    caller. Now it goes on exactly as the answer says: the lines after line 2 as a
    stream of their own, under the key ``K+2``; each line stored once, in order, the
    topic open, and the result the whole stream's."""
    topic, key = _topic("records-lapsed"), "records-lapsed"

    def lines() -> Iterator[dict[str, Any]]:
        yield event(1)
        yield event(2)
        wait_until(lambda: len(_history(face_broker.url, topic)) == 2, timeout=10, what="2 lines")
        with redis.Redis.from_url(redis_server.url) as admin:
            admin.zadd(c.line_times_key(topic), {key: 0})  # (the records lapse)
        yield event(3)
        yield event(4)

    with Publisher(face_broker.url) as publisher:
        result = publisher.stream(topic, lines(), idempotency_key=key)
    history = _history(face_broker.url, topic)
    assert [e["data"] for e in history] == [1, 2, 3, 4]
    assert_the_whole_stream(result, history, after_line=2, key=f"{key}+2")


def assert_the_whole_stream(
    result: PublishResult, history: list[dict[str, object]], *, after_line: int, key: str
) -> None:
    """A stream gone on in parts has the whole stream's result: every line counted, its
    first and last ids, the key of its last part."""
    assert (result.after_line, result.idempotency_key) == (after_line, key), result
    assert (result.count, result.ids) == (len(history), []), result
    assert (result.first_id, result.last_id) == (history[0]["id"], history[-1]["id"]), result


class LosesLines4And5Unrecorded:
    """A failover that loses lines 4-5 of a keyed ingest (their appends undone) whose
    line records lapsed too (its last write's time set back: Redis out of reach for
    most of the window while it paused), done as the stream yields its lines: the
    broker answers line 6 with 409 ``ingest-lines-lost`` (a 503 before it), its lines
    kept no longer recorded under the key (``resend: after_line``, 3)."""

    LINES = 8

    def __init__(self, url: str, redis_url: str, topic: str, key: str) -> None:
        self.url, self.redis_url, self.topic, self.key = url, redis_url, topic, key
        self._before_4: IngestAppends | None = None

    def wait_for(self, count: int) -> None:
        wait_until(
            lambda: len(_history(self.url, self.topic)) == count, timeout=10, what=f"{count} lines"
        )

    async def before_4(self) -> None:
        async with aioredis.Redis.from_url(self.redis_url) as admin:
            self._before_4 = await IngestAppends.read(admin, self.topic, self.key)

    async def lose_4_and_5(self) -> None:
        assert self._before_4 is not None
        async with aioredis.Redis.from_url(self.redis_url) as admin:
            await self._before_4.lose_since(admin, 2)  # the failover
            await admin.zadd(c.line_times_key(self.topic), {self.key: 0})  # (records lapse)

    def lines(self) -> Iterator[dict[str, Any]]:
        yield from (event(n) for n in (1, 2, 3))
        self.wait_for(3)
        asyncio.run(self.before_4())
        yield from (event(n) for n in (4, 5))
        self.wait_for(5)
        asyncio.run(self.lose_4_and_5())
        yield from (event(n) for n in range(6, self.LINES + 1))

    async def async_lines(self) -> AsyncIterator[dict[str, Any]]:
        for n in (1, 2, 3):
            yield event(n)
        await asyncio.to_thread(self.wait_for, 3)
        await self.before_4()
        for n in (4, 5):
            yield event(n)
        await asyncio.to_thread(self.wait_for, 5)
        await self.lose_4_and_5()
        for n in range(6, self.LINES + 1):
            yield event(n)


def test_a_stream_whose_lines_a_failover_lost_unrecorded_goes_on_after_the_last_kept(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """A failover lost lines 4-5 of the stream, whose line records lapsed: the broker
    answers ``ingest-lines-lost`` (409; a 503 before it), saying the whole stream again
    would store lines 1-3 twice. The client retried every 503 by sending the whole
    stream again under its key: 1-3 stored twice, silently. Now it sends lines 4.. as a
    stream of their own under ``K+3``: every line stored once, in order."""
    topic, key = _topic("lines-lost"), "lines-lost-sync"
    fault = LosesLines4And5Unrecorded(face_broker.url, redis_server.url, topic, key)
    with Publisher(face_broker.url, retry=PATIENT) as publisher:
        result = publisher.stream(topic, fault.lines(), idempotency_key=key)
    history = _history(face_broker.url, topic)
    assert [e["data"] for e in history] == list(range(1, fault.LINES + 1))
    assert_the_whole_stream(result, history, after_line=3, key=f"{key}+3")


async def test_an_async_stream_whose_lines_a_failover_lost_unrecorded_goes_on_after_the_last_kept(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """The same through ``AsyncPublisher``, its events an async iterator."""
    topic, key = _topic("lines-lost"), "lines-lost-async"
    fault = LosesLines4And5Unrecorded(face_broker.url, redis_server.url, topic, key)
    async with AsyncPublisher(face_broker.url, retry=PATIENT) as publisher:
        result = await publisher.stream(topic, fault.async_lines(), idempotency_key=key)
    history = await asyncio.to_thread(_history, face_broker.url, topic)
    assert [e["data"] for e in history] == list(range(1, fault.LINES + 1))
    assert_the_whole_stream(result, history, after_line=3, key=f"{key}+3")


@pytest.mark.parametrize("several", [False, True])
def test_a_subscriber_on_a_client_with_query_parameters_keeps_its_own(
    face_broker: BrokerProcess, several: bool
) -> None:
    """A client passed in with query parameters of its own (an ``access_token``, say):
    httpx put them in place of the query the subscriber wrote into its path, so
    ``from_earliest`` was dropped and the history skipped in silence (the stream started
    from now), and a multi-topic stream lost its topics (400)."""
    topics = [_topic("params-a"), _topic("params-b")][: 2 if several else 1]
    with Publisher(face_broker.url) as publisher:
        for topic in topics:
            publisher.publish(topic, "first", close=True)
    params = {"access_token": "unused"}  # (authorization is off: the broker ignores it)
    with (
        httpx.Client(base_url=face_broker.url, params=params, timeout=10) as client,
        Subscriber(topics, client=client, from_earliest=True, give_up_after=10) as sub,
    ):
        seen = [(e.topic, e.event, e.data) for e in sub]  # ends by itself, at the ends
    assert sorted(seen, key=str) == sorted(
        [(topic, None, '"first"') for topic in topics]
        + [(topic, "broker.end", "{}") for topic in topics],
        key=str,
    )


async def test_an_async_subscriber_on_a_client_with_query_parameters_keeps_its_own(
    face_broker: BrokerProcess,
) -> None:
    topic = _topic("params-async")
    async with AsyncPublisher(face_broker.url) as publisher:
        await publisher.publish(topic, "first", close=True)
    params = {"access_token": "unused"}
    async with (
        httpx.AsyncClient(base_url=face_broker.url, params=params, timeout=10) as client,
        AsyncSubscriber(topic, client=client, from_earliest=True, give_up_after=10) as sub,
    ):
        seen = [(e.event, e.data) async for e in sub]
    assert seen == [(None, '"first"'), ("broker.end", "{}")]


class PublishAsTheStreamIsRequested:
    """An httpx request hook: publishes ``data`` to ``topic`` when the subscriber asks
    for its stream, after it asked where its topics end (``published``: the id)."""

    def __init__(self, publisher: Publisher, topic: str, data: str) -> None:
        self.publisher, self.topic, self.data = publisher, topic, data
        self.published: list[str] = []

    def __call__(self, request: httpx.Request) -> None:
        if request.headers.get("accept") == "text/event-stream" and not self.published:
            self.published.append(self.publisher.publish(self.topic, self.data).first_id or "")

    async def in_async(self, request: httpx.Request) -> None:
        await asyncio.to_thread(self, request)


@pytest.mark.parametrize("several", [False, True], ids=["one topic", "two"])
def test_a_subscriber_from_now_starts_where_its_topics_ended_when_it_asked(
    face_broker: BrokerProcess, several: bool
) -> None:
    """ "From now" is when it asked where each topic ends (``GET /topics/{t}``), not when
    its stream opened: what was published between is delivered. Several topics were not
    asked: a first stream that ended before the broker sent it a place (a draining
    instance's come-back answer) came back from a new "now", and what was published
    between was lost in silence. Here the publish comes as the stream is requested."""
    topics = [_topic("asked-a"), _topic("asked-b")][: 2 if several else 1]
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topics[0], "before")  # before it asked: not for it
        between = PublishAsTheStreamIsRequested(publisher, topics[-1], "between")
        hooks = {"request": [between]}
        with (
            httpx.Client(base_url=face_broker.url, event_hooks=hooks, timeout=10) as client,
            Subscriber(topics, client=client, give_up_after=10) as sub,
        ):
            received = iter(sub)
            first = next(received)
            publisher.publish(topics[0], "after")
            second = next(received)
    assert between.published, "the stream was never requested"
    assert [(first.topic, first.data), (second.topic, second.data)] == [
        (topics[-1], '"between"'),
        (topics[0], '"after"'),
    ]


def test_a_multi_topic_subscriber_goes_on_past_one_topics_end(face_broker: BrokerProcess) -> None:
    """It stops once every topic has ended, not at the first ``broker.end`` (the contract:
    a multi-topic stream goes on with the topics still open)."""
    first, second = _topic("ends-a"), _topic("ends-b")
    with Publisher(face_broker.url) as publisher:
        publisher.publish(first, "a", close=True)
        publisher.publish(second, "b")
        publisher.publish(second, "b2", close=True)
    topics = [first, second]
    with Subscriber(topics, face_broker.url, from_earliest=True, give_up_after=10) as sub:
        seen = list(sub)  # ends by itself, after both ends
    assert sorted(e.data for e in seen if not e.is_end) == ['"a"', '"b"', '"b2"']
    assert [e.event for e in seen].count("broker.end") == 2
    assert seen[-1].is_end
    # Each event says its topic (the wire says it only in the cursor that is its id).
    of = {e.data: e.topic for e in seen if not e.is_end}
    assert of == {'"a"': first, '"b"': second, '"b2"': second}
    assert sorted(e.topic or "" for e in seen if e.is_end) == sorted(topics)


def test_a_multi_topic_subscriber_from_the_earliest_tells_the_first_events_topic(
    redis_server: RedisServer,
) -> None:
    """Another topic of the stream was trimmed, so its start is not the origin: the first
    event came with topic None (the subscriber took every other topic to be at the
    origin; audit). The stream now sends its starting cursor before the replay."""
    trimmed, other = _topic("trim"), _topic("all")  # ("all" first: replayed first)
    env = {"BROKER_TOPIC_POLICIES": '[{"pattern": "face.trim.*", "maxlen": 5}]'}
    broker = BrokerProcess(redis_url=redis_server.url, env=env).start()
    try:
        with Publisher(broker.url) as publisher:
            publisher.publish(other, "first")
            publisher.publish_batch(trimmed, [event(n) for n in range(300)])
        assert int(httpx.get(f"{broker.url}/topics/{trimmed}").json()["length"]) < 300
        with Subscriber([other, trimmed], broker.url, from_earliest=True) as subscriber:
            first, second = next(iter(subscriber)), next(iter(subscriber))
    finally:
        broker.close()
    assert (first.data, first.topic) == ('"first"', other)
    assert second.topic == trimmed


def test_a_topic_closed_then_deleted_counts_as_one_end(own_broker: BrokerProcess) -> None:
    """A multi-topic subscriber saw ``a``'s end; ``a`` is then deleted, and the subscriber,
    coming back after a drop, is told of the deletion too: two ends of one topic. It
    counted ends, not topics, and stopped while ``b`` was open."""
    first, second = _topic("closed-deleted-a"), _topic("closed-deleted-b")
    seen: list[Event] = []
    with Publisher(own_broker.url, retry=PATIENT) as publisher:
        publisher.publish(first, "a", close=True)
        publisher.publish(second, "b")
        topics = [first, second]
        with Subscriber(topics, own_broker.url, from_earliest=True, give_up_after=30) as sub:
            for item in sub:
                seen.append(item)
                if len(seen) == 3:  # a, its end, and b
                    deleted = httpx.delete(f"{own_broker.url}/topics/{first}", timeout=10)
                    assert deleted.status_code == 204
                    own_broker.kill()  # a drop: the subscriber comes back with its cursor
                    own_broker.start()
                    publisher.publish(second, "b2", close=True)
    data = sorted(e.data for e in seen if not (e.is_end or e.is_gap))
    assert data == ['"a"', '"b"', '"b2"'], seen  # it went on with b
    assert seen[-1].is_end, seen


@pytest.mark.parametrize("other_topic", [False, True])
def test_a_deleted_topic_ends_the_subscriber(face_broker: BrokerProcess, other_topic: bool) -> None:
    """A DELETE ends the topic with a ``deleted`` gap: the subscriber hands it over and
    stops (on a multi-topic stream, once the other topic has ended too), instead of
    reconnecting, being told again, and waiting for ever on a log that is gone."""
    topic, other = _topic("deleted"), _topic("deleted-other")
    topics = [topic, other] if other_topic else [topic]
    with Publisher(face_broker.url) as publisher:
        for name in topics:
            publisher.publish(name, 1)
    seen: queue.Queue[Event] = queue.Queue()

    def follow() -> None:
        with Subscriber(topics, face_broker.url, from_earliest=True, give_up_after=10) as sub:
            for each in sub:
                seen.put(each)

    following = threading.Thread(target=follow, daemon=True)
    following.start()
    wait_until(lambda: seen.qsize() >= len(topics), timeout=10, what="the topics' events")
    assert httpx.delete(f"{face_broker.url}/topics/{topic}", timeout=10).status_code == 204
    if other_topic:
        closing = httpx.post(f"{face_broker.url}/topics/{other}/close", timeout=10)
        assert closing.status_code == 201, closing.text
    following.join(timeout=15)
    assert not following.is_alive(), "the subscriber did not stop"
    received = list(seen.queue)
    gaps = [e for e in received if e.is_gap]
    assert [g.json()["reason"] for g in gaps] == ["deleted"], received


async def test_streaming_ingest_stores_each_line_and_a_resend_stores_nothing(
    face_broker: BrokerProcess,
) -> None:
    topic = _topic("ingest")

    async def tokens() -> object:
        for n in range(5):
            yield event(f"token {n}", event="token")

    async with AsyncPublisher(face_broker.url) as publisher:
        first = await publisher.stream(topic, tokens(), idempotency_key="gen-1")  # type: ignore[arg-type]
        again = await publisher.stream(
            topic, [event(f"token {n}", event="token") for n in range(5)], idempotency_key="gen-1",
            close=True,
        )  # fmt: skip
    assert first.count == 5 and again.ids == first.ids
    history = _history(face_broker.url, topic)
    assert [e["data"] for e in history[:5]] == [f"token {n}" for n in range(5)]
    assert [e["event"] for e in history[5:]] == ["broker.end"]


async def test_direct_publisher_events_are_indistinguishable_on_the_wire(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """The same events, once over HTTP and once straight to Redis: the same SSE bytes."""
    http_topic, direct_topic = _topic("http"), _topic("direct")
    async with AsyncPublisher(face_broker.url) as publisher:
        await publisher.publish(http_topic, {"a": [1, 2]}, event="x", retry=500)
        await publisher.publish_text(http_topic, "two\r\nlines", event="t")
        await publisher.publish_batch(http_topic, [event(None), event("é")])
    async with DirectPublisher(redis_server.url) as direct:
        await direct.publish(direct_topic, {"a": [1, 2]}, event="x", retry=500)
        await direct.publish_text(direct_topic, "two\r\nlines", event="t")
        await direct.publish_batch(direct_topic, [event(None), event("é")])
        replay = await direct.publish(direct_topic, {"a": [1, 2]}, idempotency_key="k1")
        # An HTTP publish with the direct publisher's key is a replay: one set of records.
        http_again = httpx.post(
            f"{face_broker.url}/topics/{direct_topic}/events",
            json={"data": {"a": [1, 2]}},
            headers={"Idempotency-Key": "k1"},
        )
    assert http_again.status_code == 200 and http_again.json()["id"] == replay.id

    def frames(topic: str) -> list[tuple[str | None, str]]:
        raw = b""
        url = f"{face_broker.url}/topics/{topic}/events?from=earliest"
        with httpx.stream("GET", url, timeout=5) as response:
            for chunk in response.iter_raw():
                raw += chunk
                if len(parse_events(raw)) >= 4:
                    break
        # Everything after the id line, byte for byte.
        blocks = [b for b in raw.split(b"\n\n") if b.startswith(b"id:")][:4]
        return [(None, b.split(b"\n", 1)[1].decode()) for b in blocks]

    assert frames(direct_topic) == frames(http_topic)


def test_sse_decoder_follows_the_standard_across_chunk_boundaries() -> None:
    decoder = SseDecoder()
    stream = b": hi\r\nretry: 1500\r\nid: a\r\nevent: x\r\ndata: 1\r\ndata:2\r\n\r\ndata: 3\n\n"
    events = [e for i in range(len(stream)) for e in decoder.feed(stream[i : i + 1])]
    assert [(e.id, e.event, e.data) for e in events] == [("a", "x", "1\n2"), ("a", None, "3")]
    assert decoder.retry_ms == 1500


async def test_direct_publisher_closes_a_topic_as_the_broker_does(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """``close_topic`` sends the append script's close: subscribers get ``broker.end``
    and stop, closing again answers the same end, and a publish after it is refused."""
    topic = _topic("direct-close")
    async with DirectPublisher(redis_server.url, topic_ttl_seconds=60) as direct:
        await direct.publish_text(topic, "last token")
        end = await direct.close_topic(topic)
        assert await direct.close_topic(topic) == end
        other = _topic("direct-close-with")
        closed = await direct.publish(other, 1, close=True)
        assert closed.end_id is not None and closed.end_id != closed.ids[0]  # (as HTTP's)
        with pytest.raises(TopicClosed) as refused:
            await direct.publish(topic, "too late")
    # The client's error, as the HTTP publishers raise it, and the core's still.
    assert (refused.value.status, refused.value.end_id) == (409, end)
    assert isinstance(refused.value, broker_errors.TopicClosed)
    with Subscriber(topic, face_broker.url, from_earliest=True, give_up_after=10) as sub:
        seen = list(sub)  # ends by itself, at the end
    assert [(e.event, e.data) for e in seen] == [(None, "last token"), ("broker.end", "{}")]
    assert seen[-1].id == end
    # The close refreshed the topic's TTL, as the broker's close does.
    client = redis.Redis(port=redis_server.port)
    try:
        assert 0 < client.pttl(c.log_key(topic)) <= 60_000
    finally:
        client.close()


class BreaksFirstStream(httpx.HTTPTransport):
    """Sends the first streaming ingest's first two lines, then breaks the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.calls == 1:
            sent = b"".join(part for part, _ in zip(request.stream, range(2), strict=False))
            with httpx.Client(base_url=str(request.url.copy_with(path="/", query=None))) as direct:
                direct.post(  # what reached the broker before the break
                    request.url.path, content=sent, headers=dict(request.headers)
                )
            raise httpx.WriteError("the connection broke mid-stream")
        return super().handle_request(request)


def test_a_stream_broken_midway_is_resent_whole_and_stored_once(
    own_broker: BrokerProcess,
) -> None:
    """The retry sends the lines sent already, then the rest, under the same key: the
    broker stores each line once (``K:n``) however far the first attempt got."""
    topic = _topic("stream-retry")
    transport = BreaksFirstStream()
    with (
        httpx.Client(base_url=own_broker.url, transport=transport, timeout=5) as client,
        Publisher(client=client, retry=PATIENT) as publisher,
    ):
        result = publisher.stream(topic, (event({"n": n}) for n in range(5)))
    assert transport.calls == 2
    assert result.count == 5
    assert [e["data"] for e in _history(own_broker.url, topic)] == [{"n": n} for n in range(5)]


class BreaksEachStreamFurtherOn(httpx.HTTPTransport):
    """Breaks each of the first ``breaks`` streaming ingests after 3 more lines than the
    one before it sent (what reached the broker is sent to it): a long generation cut by
    one rolling restart after another."""

    def __init__(self, breaks: int) -> None:
        super().__init__()
        self.calls, self.breaks = 0, breaks

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.calls <= self.breaks:
            lines = 3 * self.calls
            sent = b"".join(part for part, _ in zip(request.stream, range(lines), strict=False))
            with httpx.Client(base_url=str(request.url.copy_with(path="/", query=None))) as direct:
                direct.post(request.url.path, content=sent, headers=dict(request.headers))
            raise httpx.WriteError("the connection broke mid-stream")
        return super().handle_request(request)


def test_a_stream_broken_again_and_again_further_on_each_time_goes_on(
    own_broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attempts are counted since the last one that got further: 6 breaks under a policy
    of 3 attempts (it gave up after the third, with 9 of 30 tokens stored, the topic never
    closed, and its viewers waiting for an end). (An attempt gets further only if it
    lasted a while: here the breaks come at once.)"""
    monkeypatch.setattr(attempts_module, "STREAM_WORKED_S", 0.0)
    topic = _topic("stream-breaks")
    transport = BreaksEachStreamFurtherOn(breaks=6)
    policy = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05)
    with (
        httpx.Client(base_url=own_broker.url, transport=transport, timeout=5) as client,
        Publisher(client=client, retry=policy) as publisher,
    ):
        result = publisher.stream(topic, (event({"n": n}) for n in range(30)), close=True)
    assert transport.calls == 7
    assert result.count == 30 and result.end_id is not None
    stored = _history(own_broker.url, topic)
    assert [e["data"] for e in stored] == [{"n": n} for n in range(30)] + [{}]
    assert stored[-1]["event"] == "broker.end"


def test_a_stream_to_a_broker_whose_redis_is_down_gives_up_in_its_attempts(
    private_redis: RedisServer,
) -> None:
    """Each attempt takes a line or two more from the iterator before the broker breaks
    it off (503): taken for progress, it was retried for as long as the iterator gave
    lines (for ever, from a live source), its replay buffer growing."""
    broker = BrokerProcess(redis_url=private_redis.url).start()
    topic, started = _topic("down"), time.monotonic()

    def tokens() -> Iterator[dict[str, object]]:
        for n in range(1500):  # 30 s at most
            if n == 20:
                private_redis.stop()
            yield {"data": n}
            time.sleep(0.02)

    try:
        policy = RetryPolicy(attempts=3, backoff=0.05, max_backoff=0.2)
        with Publisher(broker.url, retry=policy) as publisher, pytest.raises(Unreachable) as up:
            publisher.stream(topic, tokens(), idempotency_key="gen-down")
        assert time.monotonic() - started < 20, "retried for as long as lines came"
        assert up.value.idempotency_key == "gen-down" and (up.value.lines_sent or 0) >= 20
    finally:
        broker.close()


class LosesEveryAnswer(httpx.HTTPTransport):
    """Every request reaches the broker; every answer is lost on the way back."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        super().handle_request(request).read()
        raise httpx.ReadError("the connection broke before the answer")


@pytest.mark.parametrize("given_key", [None, "order-7"])
def test_a_publish_given_up_on_names_the_key_a_retry_must_send(
    face_broker: BrokerProcess, given_key: str | None
) -> None:
    """Stored, every answer lost: ``Unreachable`` carries the key (one made up for the
    publish, or the caller's), and a later retry with it stores nothing twice (without
    it, the caller's natural retry stored a second copy)."""
    topic = _topic("lost-answers")
    policy = RetryPolicy(attempts=3, backoff=0.01)
    with (
        httpx.Client(base_url=face_broker.url, transport=LosesEveryAnswer(), timeout=5) as client,
        Publisher(client=client, retry=policy) as publisher,
        pytest.raises(Unreachable) as given_up,
    ):
        publisher.publish(topic, {"order": 7}, idempotency_key=given_key)
    key = given_up.value.idempotency_key
    assert key is not None and (given_key is None or key == given_key)
    assert key in str(given_up.value)
    with Publisher(face_broker.url) as publisher:
        retried = publisher.publish(topic, {"order": 7}, idempotency_key=key)
    assert retried.replayed
    assert [e["data"] for e in _history(face_broker.url, topic)] == [{"order": 7}]


async def test_a_direct_publisher_can_wait_for_a_replica_as_the_broker_does(
    redis_server: RedisServer,
) -> None:
    """``durability="replicated"`` (``BROKER_PUBLISH_DURABILITY``): an append is confirmed
    only once a replica has it; with none, it fails as the broker's 503 does."""
    from broker.errors import StoreUnavailable

    topic = _topic("replicated")
    async with DirectPublisher(redis_server.url, durability="replicated") as publisher:
        with pytest.raises(StoreUnavailable) as refused:
            await publisher.publish(topic, 1)  # the suite's redis-server has no replica
    # Stored on the primary all the same: a retry with the key the publisher made up
    # (the error carries it) answers that append's id, and stores nothing twice.
    key = refused.value.idempotency_key
    assert key is not None
    async with DirectPublisher(redis_server.url) as publisher:
        retried = await publisher.publish(topic, 1, idempotency_key=key)
        assert retried.replayed and retried.idempotency_key == key
        assert (await publisher.publish(topic, 2)).ids
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.xlen(c.log_key(topic)) == 2


def test_a_token_stream_through_a_store_outage_goes_on_before_its_end(
    private_redis: RedisServer,
) -> None:
    """Redis stops for a moment mid-generation: the broker answers the stream 503 and
    closes it, the publisher (still sending) resends it at once, and the tokens after
    the outage reach the topic while the generation still runs. The rest of the body
    was read and dropped: nothing reached viewers until the generation ended."""
    env = {"BROKER_PUBLISH_TIMEOUT_SECONDS": "0.5"}
    broker = BrokerProcess(redis_url=private_redis.url, env=env).start()
    topic, process = _topic("outage"), private_redis.process
    assert process is not None
    stored_while_running: list[int] = []

    def tokens() -> Iterator[dict[str, object]]:
        yield from ({"data": n} for n in (1, 2, 3))
        wait_until(lambda: len(_history(broker.url, topic)) == 3, timeout=10, what="3 tokens")
        os.kill(process.pid, signal.SIGSTOP)
        try:
            yield {"data": 4}
            time.sleep(1.0)  # the producer's pause: its append fails meanwhile (0.5 s)
        finally:
            os.kill(process.pid, signal.SIGCONT)
        for n in range(5, 65):  # a token every 0.1 s, for 6 s at most
            yield {"data": n}
            time.sleep(0.1)
            stored = [e["data"] for e in _history(broker.url, topic)]
            if any(isinstance(d, int) and d >= 5 for d in stored):
                stored_while_running.extend(d for d in stored if isinstance(d, int))
                return

    try:
        with Publisher(broker.url, retry=PATIENT) as publisher:
            result = publisher.stream(topic, tokens(), idempotency_key="generation")
        assert stored_while_running, "no token after the outage was stored before the end"
        # Every token once, in order (the resend stored nothing twice).
        everything = [e["data"] for e in _history(broker.url, topic)]
        assert everything == list(range(1, result.count + 1))
    finally:
        broker.close()


def test_a_publisher_leaves_a_client_passed_in_open(face_broker: BrokerProcess) -> None:
    """The caller's client is the caller's to close (the subscriber already did so)."""
    with httpx.Client(base_url=face_broker.url, timeout=10) as client:
        with Publisher(face_broker.url, client=client) as publisher:
            publisher.publish(_topic("own-client"), 1)
        assert not client.is_closed
        assert client.get("/healthz").status_code == 200


def test_closing_a_subscriber_from_another_thread_ends_its_iteration(
    face_broker: BrokerProcess,
) -> None:
    """``close()`` while ``for e in subscriber`` waits on a quiet topic: it logged a
    ReadError, reconnected after 2 s, and raised httpx's "the client has been closed"."""
    topic = _topic("close")
    subscriber = Subscriber(topic, face_broker.url, from_earliest=True)
    got: list[Event] = []
    failed: list[BaseException] = []

    def iterate() -> None:
        try:
            got.extend(subscriber)
        except BaseException as error:  # (what the thread raised, for the assertion)
            failed.append(error)

    reading = threading.Thread(target=iterate)
    reading.start()
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topic, 1)
    wait_until(lambda: len(got) == 1, timeout=5, what="the subscriber's first event")
    subscriber.close()
    reading.join(timeout=5)
    assert not reading.is_alive() and failed == []


async def test_closing_an_async_subscriber_from_another_task_ends_its_iteration(
    face_broker: BrokerProcess,
) -> None:
    topic = _topic("aclose")
    subscriber = AsyncSubscriber(topic, face_broker.url, from_earliest=True)
    got: list[Event] = []

    async def iterate() -> None:
        async for e in subscriber:
            got.append(e)

    reading = asyncio.create_task(iterate())
    async with AsyncPublisher(face_broker.url) as publisher:
        await publisher.publish(topic, 1)
    async with asyncio.timeout(5):
        while len(got) < 1:
            await asyncio.sleep(0.02)
    await subscriber.aclose()
    async with asyncio.timeout(5):
        await reading  # (raises what the iteration raised)


ROOT = Path(__file__).resolve().parents[2]
BREAK_OUT = """
import asyncio, sys
from brokerclient import AsyncPublisher, AsyncSubscriber

async def main(url, topic):
    async with AsyncPublisher(url) as publisher:
        for n in range(3):
            await publisher.publish(topic, n)
    async with AsyncSubscriber(topic, url, from_earliest=True) as subscriber:
        async for event in subscriber:
            if event.data == "1":
                break

asyncio.run(main(*sys.argv[1:]))
"""


def test_breaking_out_of_an_async_subscriber_closes_it_quietly(face_broker: BrokerProcess) -> None:
    """``break`` out of ``async for`` inside ``async with``: the iteration's response was
    left suspended inside it, and asyncio, closing both at exit, printed "an error
    occurred during closing of asynchronous generator"."""
    done = subprocess.run(
        [sys.executable, "-c", BREAK_OUT, face_broker.url, _topic("break")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.parametrize("data", [float("nan"), [1.0, float("-inf")]])
async def test_a_direct_publisher_refuses_a_nan_or_an_infinity(
    redis_server: RedisServer, data: object
) -> None:
    """orjson writes each as ``null``: the event was stored altered, in silence (the
    HTTP publish refuses the body as JSON)."""
    topic = _topic("nan")
    async with DirectPublisher(redis_server.url) as publisher:
        with pytest.raises(broker_errors.InvalidInput, match="no JSON form"):
            await publisher.publish(topic, data)
        with pytest.raises(broker_errors.InvalidInput, match="no JSON form"):
            await publisher.publish_batch(topic, [event(1), event(data)])
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.exists(c.log_key(topic)) == 0


async def test_a_direct_publisher_refuses_a_lone_surrogate_as_bad_input(
    redis_server: RedisServer,
) -> None:
    """A Python string may hold a lone surrogate, which UTF-8 has not: the direct
    publisher raised a bare UnicodeEncodeError (audit), where a bad event is the core's
    ``InvalidInput``; nothing is stored."""
    topic = _topic("surrogate")
    async with DirectPublisher(redis_server.url) as publisher:
        for attempt in (
            publisher.publish_text(topic, "a\ud800"),
            publisher.publish(topic, {"\udc00": 1}),
            publisher.publish(topic, 1, event="\ud800"),
            publisher.publish_batch(topic, [event(1), event("\ud800")]),
        ):
            with pytest.raises(broker_errors.InvalidInput, match="lone surrogate"):
                await attempt
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.exists(c.log_key(topic)) == 0


def test_a_publisher_refuses_an_event_type_with_a_lone_surrogate_before_sending(
    face_broker: BrokerProcess,
) -> None:
    """As it refuses such data: a ValueError naming it, not a UnicodeEncodeError from
    inside httpx (audit); nothing reaches the broker."""
    topic = _topic("surrogate-type")
    with Publisher(face_broker.url) as publisher:
        with pytest.raises(ValueError, match="not valid Unicode") as refused:
            publisher.publish_text(topic, "x", event="\ud800")
    assert not isinstance(refused.value, UnicodeEncodeError)
    assert httpx.get(f"{face_broker.url}/topics/{topic}").status_code == 404


@pytest.fixture(scope="module")
def aging_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """Events of ``aged.*`` topics kept 1 s (read by age: the log stays, emptied)."""
    policies = '[{"pattern": "aged.*", "max_age_seconds": 1}]'
    process = BrokerProcess(redis_url=redis_server.url, env={"BROKER_TOPIC_POLICIES": policies})
    process.start()
    yield process
    process.close()


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_a_subscriber_from_now_of_a_topic_retention_emptied_is_told_nothing(
    aging_broker: BrokerProcess, sync: bool
) -> None:
    """A topic whose log retention emptied said ``last_id`` null: a multi-topic
    subscription "from now" put it at the origin in the cursor it began with, and was
    told ``trimmed`` first, of events it never asked for (review)."""
    aged, other = _topic("aged").replace("face.", "aged."), _topic("other")
    with Publisher(aging_broker.url) as publisher:
        publisher.publish(aged, "old")
        wait_until(
            lambda: httpx.get(f"{aging_broker.url}/topics/{aged}", timeout=5).json()["length"] == 0,
            timeout=10,
            what="the event to age out",
        )

        new = PublishAsTheStreamIsRequested(publisher, aged, "new")
        if sync:
            hooks: dict[str, Any] = {"request": [new]}
            with (
                httpx.Client(base_url=aging_broker.url, event_hooks=hooks, timeout=10) as client,
                Subscriber([aged, other], client=client, give_up_after=10) as sub,
            ):
                first = next(iter(sub))
        else:

            async def first_event() -> Event:
                hooks = {"request": [new.in_async]}
                async with (
                    httpx.AsyncClient(base_url=aging_broker.url, event_hooks=hooks) as client,
                    AsyncSubscriber([aged, other], client=client, give_up_after=10) as sub,
                ):
                    return await asyncio.wait_for(sub.__aiter__().__anext__(), 10)

            first = asyncio.run(first_event())
    assert (first.event, first.topic, first.data) == (None, aged, '"new"'), first
    assert f"{aged}~{new.published[0]}" in str(first.id).split("!")


def test_topics_named_with_dots_alone_are_reached(face_broker: BrokerProcess) -> None:
    """``.`` and ``..`` are topic names; as a URL's dot segments, httpx sent their
    routes to ``/topics`` (the listing) and ``/`` (the live page): a publish failed, and
    a subscription "from now" replayed history or failed."""
    with Publisher(face_broker.url) as publisher:
        for topic in (".", ".."):
            publisher.publish(topic, "before")  # not for the subscription below
        after = PublishAsTheStreamIsRequested(publisher, "..", "after")
        with (
            httpx.Client(base_url=face_broker.url, event_hooks={"request": [after]}) as client,
            Subscriber([".", ".."], client=client, give_up_after=10) as sub,
        ):
            first = next(iter(sub))
    assert (first.topic, first.data) == ("..", '"after"'), first
    assert f"..~{after.published[0]}" in str(first.id).split("!")
