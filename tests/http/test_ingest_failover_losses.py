"""Streaming ingest after a failover lost its lines, or its line records lapsed, or a
resend differs: what the ingest is told, and that the resend it is told to make stores
each line once, in order.

The faults here are done by hand on the topic's own keys (appends undone, a record's
time set back), not on Redis or the broker: one broker for the module, with
tests/http/conftest.py's ``broker_on_private_redis`` settings, on the session's
redis-server (one broker start for all, not one redis-server and broker a test); tests
keep apart by topic names. The faults on Redis itself are in test_ingest_faults.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as redis

from broker import constants as c
from brokerclient import AsyncPublisher, TopicClosed
from tests.http.conftest import HEARTBEAT
from tests.http.helpers import new_topic
from tests.http.test_ingest import RawIngest, chunk, history, line
from tests.http.test_ingest_faults import (
    NDJSON,
    answered_as_its_resend_says,
    body_of,
    datas,
    every_line_lost_mid_ingest,
    lines_4_and_5_lost_mid_ingest,
    open_ingest,
    resend_until_success,
    stored_datas,
    stored_is,
)
from tests.support.broker_process import BrokerProcess
from tests.support.failover import IngestAppends
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """``broker_on_private_redis``'s settings (a 1 s publish deadline), shared."""
    env = {**HEARTBEAT, "BROKER_PUBLISH_TIMEOUT_SECONDS": "1"}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


@pytest.fixture
async def client(broker: BrokerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=broker.url, timeout=30) as session:
        yield session


@pytest.fixture
async def redis_admin(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    """A client of the session's redis-server, for the test's own topic's keys."""
    admin = redis.Redis.from_url(redis_server.url)
    yield admin
    await admin.aclose()


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_lines_a_failover_lost_mid_body_end_the_ingest_and_the_resend_restores_the_order(
    broker: BrokerProcess, client: httpx.AsyncClient, redis_admin: redis.Redis, route: str
) -> None:
    """A failover to a replica that had not received lines 4-5 keeps the log, its epoch
    unchanged, without them (done by hand here: the appends undone). The ingest went
    on: line 6 stored after 3 with no gap, the producer answered 201 with ids for 4-5
    that no longer exist, and a resend under its key stored 4-5 after 6. Now the
    ingest stops at its next line (503, the connection closed), and the resend replays
    1-3 and stores 4-6 after them, in order."""
    topic, key, lines = new_topic(), f"gen-failover-{route}", body_of(6)
    problem = await lines_4_and_5_lost_mid_ingest(broker, client, redis_admin, route, topic, key)
    assert "5 line(s) were stored before" in problem["detail"], problem
    assert problem["resend"] == "whole" and "last_line_kept" not in problem, problem
    assert await stored_datas(client, topic) == datas(3)  # (line 6 not stored after 3)
    again = await resend_until_success(client, topic, key, b"".join(lines))
    assert again.status_code == 201 and len(again.json()["ids"]) == 6, again.text
    assert await stored_datas(client, topic) == datas(6)


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_lines_a_failover_lost_mid_body_end_an_ingest_without_a_key_naming_the_last_kept(
    broker: BrokerProcess, client: httpx.AsyncClient, redis_admin: redis.Redis, route: str
) -> None:
    """The same failover under an ingest with no Idempotency-Key (no line records to
    check): it went on, line 6 stored after 3 with no gap told, and a subscriber that
    had read 4-5 and one that came later disagreed, in silence. Now the ingest stops at
    its next line (nothing stored), telling the producer the lines after line 3 are
    lost: it sends those again, and the log holds each line once, in order. A 409
    without Retry-After: the whole stream resent, as a retried 503 is, would store
    lines 1-3 twice (no key to replay them by)."""
    topic, lines = new_topic(), body_of(6)
    problem = await lines_4_and_5_lost_mid_ingest(broker, client, redis_admin, route, topic, None)
    assert "the lines after line 3 are lost" in problem["detail"], problem
    assert await stored_datas(client, topic) == datas(3)  # (line 6 not stored after 3)
    await told_to_send_the_rest_after(client, topic, problem, 3)
    rest = await client.post(f"/topics/{topic}/events", content=b"".join(lines[3:]), headers=NDJSON)
    assert rest.status_code == 201, rest.text
    assert await stored_datas(client, topic) == datas(6)


async def test_every_line_a_failover_lost_of_an_ingest_without_a_key_is_told_lost(
    broker: BrokerProcess, client: httpx.AsyncClient, redis_admin: redis.Redis
) -> None:
    """A failover that lost each append of an ingest with no Idempotency-Key (lines 1-2,
    sent apart): the log kept (it held an event before), and the ingest is told the
    lines after line 0 are lost, all of them: the whole stream is the rest, resent
    whole (503 with Retry-After: none of it is stored twice)."""
    topic, lines = new_topic(), body_of(3)
    other = await client.post(f"/topics/{topic}/events", json={"data": "other"})
    assert other.status_code == 201, other.text
    before_1 = await IngestAppends.read(redis_admin, topic, None)
    ingest = await open_ingest(broker, topic, None, "lean")
    await ingest.send(lines[0])
    await await_until(lambda: stored_is(client, topic, ["other", "t1"]), timeout=5, what="1")
    await ingest.send(lines[1])  # (a second append)
    await await_until(lambda: stored_is(client, topic, ["other", *datas(2)]), timeout=5, what="2")
    await before_1.lose_since(redis_admin, 2)  # the failover
    await ingest.send(lines[2])
    try:
        answer = await ingest.answer(timeout=5)  # (the body still coming)
    finally:
        ingest.cut()
    problem = answered_as_its_resend_says(answer)
    assert answer.status == 503, answer.body
    assert "the lines after line 0 are lost, every line of it" in problem["detail"], problem
    assert problem["resend"] == "whole" and "last_line_kept" not in problem, problem
    assert "first_id" not in problem, problem
    assert await stored_datas(client, topic) == ["other"]


async def test_every_line_a_failover_lost_mid_body_ends_the_ingest_too(
    broker: BrokerProcess, client: httpx.AsyncClient, redis_admin: redis.Redis
) -> None:
    """A failover to a replica that had received none of the ingest's lines (1-2): the
    log kept (it held an event before), nothing left of the ingest, not even when it
    last wrote. The ingest went on: line 3 stored after the other event, and the resend
    stored 1-2 after 3. The entry it stored last is no longer in the log: the ingest
    stops (503), and the resend stores 1-3 in order."""
    topic, key, lines = new_topic(), "gen-failover-all", body_of(3)
    await every_line_lost_mid_ingest(broker, client, redis_admin, topic, key)
    again = await resend_until_success(client, topic, key, b"".join(lines))
    assert again.status_code == 201, again.text
    assert await stored_datas(client, topic) == ["other", *datas(3)]


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_an_ingest_whose_records_lapsed_is_refused_and_its_rest_sent_alone_stored_once(
    broker: BrokerProcess, client: httpx.AsyncClient, redis_admin: redis.Redis, route: str
) -> None:
    """A keyed ingest stores lines 1-3, then its records lapse under it, its entries kept
    (they could not be kept answering: Redis out of reach for most of the window while it
    paused; or Redis's clock stepped forward; here its last write's time set back by
    hand). It went on: line 4 recorded anew under its key, and the whole stream resent
    with the key, as its contract says, stored 1-3 twice, silently. Now line 4 is
    refused (409 ingest-records-lapsed, no Retry-After, the connection closed), nothing
    stored nor recorded, the producer told that lines up to line 3 are stored and no
    longer recorded, to send the rest as a stream of its own; done so under the same key,
    broken and resent, each line is stored once."""
    topic, key, lines = new_topic(), f"gen-lapsed-{route}", body_of(6)
    records, times = c.line_records_key(topic), c.line_times_key(topic)
    ingest = await open_ingest(broker, topic, key, route)
    try:
        await ingest.send(b"".join(lines[:3]))
        await await_until(lambda: stored_is(client, topic, datas(3)), timeout=5, what="3 stored")
        await redis_admin.zadd(times, {key: 0})  # (the records lapse)
        recorded = await redis_admin.hgetall(records)
        await ingest.send(lines[3])
        answer = await ingest.answer(timeout=5)  # (the body still coming)
    except TimeoutError:
        raise AssertionError(f"it went on: {await stored_datas(client, topic)}") from None
    finally:
        ingest.cut()
    assert answer.status == 409, answer.body
    assert "retry-after" not in answer.headers and answer.headers["connection"] == "close"
    problem = json.loads(answer.body)
    assert problem["type"] == "/problems#ingest-records-lapsed", problem
    detail = problem["detail"]
    assert "3 line(s) were stored, up to line 3" in detail, problem
    assert "send the lines after line 3 as a stream of their own" in detail, problem
    assert "not the whole stream again" in detail, problem
    assert await stored_datas(client, topic) == datas(3)
    await told_to_send_the_rest_after(client, topic, problem, 3)
    assert await redis_admin.hgetall(records) == recorded  # (nothing recorded anew)
    assert await redis_admin.zscore(times, key) == 0
    await the_rest_broken_then_resent(broker, client, topic, key, route, lines[3:])
    assert await stored_datas(client, topic) == datas(6)


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_an_ingest_whose_records_lapsed_on_a_closed_topic_is_told_closed(
    broker: BrokerProcess, client: httpx.AsyncClient, redis_admin: redis.Redis, route: str
) -> None:
    """As above, the topic closed by another producer before line 4: it was told 409
    ingest-records-lapsed (send the rest under K+3), and that stream only then 409
    topic-closed. None of its lines can be found a replay, and the topic refuses anything
    new: line 4 is told 409 topic-closed at once, with the lines stored before it."""
    topic, key, lines = new_topic(), f"gen-lapsed-closed-{route}", body_of(4)
    ingest = await open_ingest(broker, topic, key, route)
    try:
        await ingest.send(b"".join(lines[:3]))
        await await_until(lambda: stored_is(client, topic, datas(3)), timeout=5, what="3 stored")
        closed = await client.post(f"/topics/{topic}/close")
        assert closed.status_code == 201, closed.text
        await redis_admin.zadd(c.line_times_key(topic), {key: 0})  # (the records lapse)
        await ingest.send(lines[3])
        answer = await ingest.answer(timeout=5)  # (the body still coming)
    finally:
        ingest.cut()
    assert answer.status == 409, answer.body
    problem = json.loads(answer.body)
    assert problem["type"] == "/problems#topic-closed", problem
    assert "3 line(s) stored before it closed" in problem["detail"], problem
    assert await stored_datas(client, topic) == [*datas(3), {}]  # ({}: its end)


async def test_the_client_is_told_closed_where_the_records_of_its_stream_lapsed_on_a_closed_topic(
    broker: BrokerProcess, client: httpx.AsyncClient, redis_admin: redis.Redis
) -> None:
    """The Python client's ``stream()``, the topic closed and its records lapsed after
    line 3: it raises ``TopicClosed`` on the first answer, sending nothing under K+3 (it
    was told ingest-records-lapsed, sent lines 4-5 under K+3, and was only then told the
    topic closed)."""
    topic, key = new_topic(), "gen-lapsed-closed-client"
    answers: list[tuple[int, str, str | None]] = []

    async def record(response: httpx.Response) -> None:
        if response.request.method == "POST" and "/events" in response.request.url.path:
            await response.aread()
            kind = response.json().get("type") if response.status_code >= 400 else None
            answers.append(
                (response.status_code, response.request.headers["idempotency-key"], kind)
            )

    async def producer() -> AsyncIterator[dict[str, Any]]:
        for n in (1, 2, 3):
            yield {"data": f"t{n}"}
        await await_until(lambda: stored_is(client, topic, datas(3)), timeout=5, what="3")
        assert (await client.post(f"/topics/{topic}/close")).status_code == 201
        await redis_admin.zadd(c.line_times_key(topic), {key: 0})  # (the records lapse)
        yield {"data": "t4"}
        yield {"data": "t5"}

    hooks = {"response": [record]}
    async with (
        httpx.AsyncClient(base_url=broker.url, timeout=30, event_hooks=hooks) as http,
        AsyncPublisher(client=http) as publisher,
    ):
        with pytest.raises(TopicClosed):
            await publisher.stream(topic, producer(), idempotency_key=key)
    assert answers == [(409, key, "/problems#topic-closed")], answers
    assert await stored_datas(client, topic) == [*datas(3), {}]  # ({}: its end)


async def test_a_refusal_that_closes_an_ingest_still_coming_reaches_its_producer(
    broker: BrokerProcess, client: httpx.AsyncClient, redis_admin: redis.Redis
) -> None:
    """The 409 that says to send only the lines after line 3 (its records lapsed) closes
    the connection while the producer's body is still coming. Closed at once with those
    bytes unread, the kernel reset the connection and the answer was lost: the client
    took it for a broken connection and resent the whole stream under its key, which
    stored lines 1-3 twice (1,2,1,2,3 in tests/face, under load). Now the broker
    half-closes and reads on a moment: the answer arrives whole."""
    topic, key, lines = new_topic(), "gen-lapsed-still-coming", body_of(3)
    ingest = await open_ingest(broker, topic, key, "lean")
    try:
        await ingest.send(b"".join(lines))
        await await_until(lambda: stored_is(client, topic, datas(3)), timeout=5, what="3 stored")
        await redis_admin.zadd(c.line_times_key(topic), {key: 0})  # (the records lapse)
        # Line 4, and 2 MB more than the broker reads before it answers (not drained).
        still_coming = b"".join(body_of(100_000, prefix="more"))
        ingest.writer.write(chunk(line("t4") + still_coming))
        answer = await ingest.answer(timeout=5)
    finally:
        ingest.cut()
    assert answer.status == 409, answer.body
    assert json.loads(answer.body)["type"] == "/problems#ingest-records-lapsed"
    assert await stored_datas(client, topic) == datas(3)


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_lines_lost_from_a_keyed_ingest_whose_records_lapsed_say_after_which_line_to_go_on(
    broker: BrokerProcess, client: httpx.AsyncClient, redis_admin: redis.Redis, route: str
) -> None:
    """The failover that lost lines 4-5 of a keyed ingest whose records lapsed too (its
    last write's time set back by hand: Redis out of reach for most of the window while
    it paused). Its lines kept are no longer recorded under its key, so the whole stream
    resent would store them twice; the answer said so in words only, and a client (the
    Python one among them) took the 503 for one to resend whole. Now its members say to
    send the lines after line 3 as a stream of their own, and done so, each line is
    stored once; and it is a 409 without Retry-After (it was a 503 with one, which any
    retrying HTTP client answers by resending the whole stream under its key)."""
    topic, key, lines = new_topic(), f"gen-lost-lapsed-{route}", body_of(6)

    async def records_lapse(_ingest: RawIngest, _kept: IngestAppends) -> None:
        await redis_admin.zadd(c.line_times_key(topic), {key: 0})

    problem = await lines_4_and_5_lost_mid_ingest(
        broker, client, redis_admin, route, topic, key, before_line_6=records_lapse
    )
    assert "the lines after line 3 are lost" in problem["detail"], problem
    await told_to_send_the_rest_after(client, topic, problem, 3)
    await the_rest_broken_then_resent(broker, client, topic, f"{key}+3", route, lines[3:])
    assert await stored_datas(client, topic) == datas(6)


async def test_lines_lost_once_a_keyed_ingests_records_lapsed_are_not_resent_whole_by_the_client(
    broker: BrokerProcess, client: httpx.AsyncClient, redis_admin: redis.Redis
) -> None:
    """The Python client's ``stream()``, whose lines 4-5 a failover loses once its records
    lapsed (Redis out of reach while it paused; here its last write's time set back by
    hand): the lines kept, 1-3, are no longer recorded under its key, and the broker says
    to send the rest as a stream of its own. It said so in a 503 with Retry-After, which
    any retrying client (the Python one before it read ``resend``) answers by resending
    the whole stream under the key: 1-3 stored twice. Now it is a 409 without Retry-After
    (as ``ingest-records-lapsed``), and the client goes on with lines 4-6 under K+3."""
    topic, key = new_topic(), "gen-unrecorded"
    answers: list[tuple[int, str | None, str, str | None]] = []

    async def record(response: httpx.Response) -> None:
        if response.request.method == "POST":
            await response.aread()
            kind = response.json().get("type") if response.status_code >= 400 else None
            key_sent = response.request.headers["idempotency-key"]
            answers.append(
                (response.status_code, response.headers.get("retry-after"), key_sent, kind)
            )

    async def producer() -> AsyncIterator[dict[str, Any]]:
        for n in (1, 2, 3):
            yield {"data": f"t{n}"}
        await await_until(lambda: stored_is(client, topic, datas(3)), timeout=5, what="3")
        before_4 = await IngestAppends.read(redis_admin, topic, key)
        yield {"data": "t4"}
        yield {"data": "t5"}
        await await_until(lambda: stored_is(client, topic, datas(5)), timeout=5, what="5")
        await before_4.lose_since(redis_admin, 2)  # the failover
        await redis_admin.zadd(c.line_times_key(topic), {key: 0})  # (the records lapse)
        yield {"data": "t6"}

    hooks = {"response": [record]}
    async with (
        httpx.AsyncClient(base_url=broker.url, timeout=30, event_hooks=hooks) as http,
        AsyncPublisher(client=http) as publisher,
    ):
        result = await publisher.stream(topic, producer(), idempotency_key=key)
    assert await stored_datas(client, topic) == datas(6)  # (each line once, in order)
    lost = "/problems#ingest-lines-lost"
    assert answers == [(409, None, key, lost), (201, None, f"{key}+3", None)], answers
    assert (result.count, result.after_line, result.idempotency_key) == (6, 3, f"{key}+3")


async def test_a_resend_whose_lines_differ_is_refused_at_the_first_that_differs(
    broker: BrokerProcess, client: httpx.AsyncClient
) -> None:
    """A producer that made its stream again (an LLM asked twice does not answer twice
    alike) under the same key: line n answered as the first body's line n, and the
    lines past those stored appended after them, the topic holding two generations
    mixed, and 201. Now a line that is not the one stored under its number is a bad
    line (400 naming it): nothing of it or after it is stored."""
    topic, key = new_topic(), "gen-regenerated"
    first = body_of(5, "first")
    second = first[:2] + body_of(5, "second")[2:]  # (the same first two lines)
    ingest = await RawIngest.open(broker, topic, headers={"Idempotency-Key": key})
    await ingest.send(b"".join(first[:3]))
    await await_until(
        lambda: stored_is(client, topic, datas(3, "first")), timeout=5, what="3 lines stored"
    )
    ingest.cut()
    again = await client.post(
        f"/topics/{topic}/events",
        content=b"".join(second),
        headers={**NDJSON, "Idempotency-Key": key},
    )
    assert again.status_code == 400, again.text
    assert again.json()["detail"].startswith("line 3: "), again.text
    assert await stored_datas(client, topic) == datas(3, "first")
    # The same lines as first sent, then new ones: each line once, in order.
    same_then_more = await client.post(
        f"/topics/{topic}/events",
        content=b"".join(first),
        headers={**NDJSON, "Idempotency-Key": key},
    )
    assert same_then_more.status_code == 201, same_then_more.text
    assert await stored_datas(client, topic) == datas(5, "first")


async def told_to_send_the_rest_after(
    client: httpx.AsyncClient, topic: str, problem: dict[str, Any], line: int
) -> None:
    """The problem's members say to send the lines after ``line`` as a stream of their
    own, and name the ids of the first and last lines kept (the log's first and last)."""
    assert (problem["resend"], problem["last_line_kept"]) == ("after_line", line), problem
    ids = [event["id"] for event in await history(client, topic)]
    assert (problem["first_id"], problem["last_id"]) == (ids[0], ids[-1]), problem


async def the_rest_broken_then_resent(
    broker: BrokerProcess,
    client: httpx.AsyncClient,
    topic: str,
    key: str,
    route: str,
    rest: list[bytes],
) -> None:
    """The rest of a stream, as a stream of its own under ``key``: its first line stored,
    its connection broken, then the whole of it resent with the key until a success."""
    before = await stored_datas(client, topic)
    ingest = await open_ingest(broker, topic, key, route)
    try:
        await ingest.send(rest[0])
        expected = [*before, json.loads(rest[0])["data"]]
        await await_until(lambda: stored_is(client, topic, expected), timeout=5, what="stored")
    finally:
        ingest.cut()  # (the connection breaks)
    again = await resend_until_success(client, topic, key, b"".join(rest))
    assert again.status_code == 201 and len(again.json()["ids"]) == len(rest), again.text


async def test_lines_a_failover_lost_before_a_keyed_body_ended_on_blank_lines_are_told_lost(
    broker: BrokerProcess, client: httpx.AsyncClient, redis_admin: redis.Redis
) -> None:
    """A failover lost lines 4-5, and the body's last line is blank: no line came to be
    refused, and the ingest was answered 201 with ids of 4-5 that no longer exist. The
    end of a keyed body on blank lines is checked at the store (they may differ from
    another stream's lines there: out_of_step, lua/ingest_lines.lua), and finds them lost: the
    ingest is told, and the resend stores them again, in order."""
    topic, key, lines = new_topic(), "ended-blank-after-a-failover", body_of(5)
    ingest = await open_ingest(broker, topic, key, "lean")
    try:
        await ingest.send(b"".join(lines[:3]))
        await await_until(lambda: stored_is(client, topic, datas(3)), timeout=5, what="3 stored")
        before_4 = await IngestAppends.read(redis_admin, topic, key)
        await ingest.send(b"".join(lines[3:5]))
        await await_until(lambda: stored_is(client, topic, datas(5)), timeout=5, what="5 stored")
        await before_4.lose_since(redis_admin, 2)  # the failover
        await ingest.send(b"\n")
        answer = await ingest.end()
    finally:
        ingest.cut()
    assert answer.status != 201, answer.body  # (it was, with the ids of 4-5)
    assert answered_as_its_resend_says(answer)["resend"] == "whole"
    assert await stored_datas(client, topic) == datas(3)
    again = await resend_until_success(client, topic, key, b"".join(lines) + b"\n")
    assert again.status_code == 201 and len(again.json()["ids"]) == 5, again.text
    assert await stored_datas(client, topic) == datas(5)
