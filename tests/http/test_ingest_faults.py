"""Streaming ingest under faults: a producer that resends its whole body with its
Idempotency-Key until it is answered with a success leaves every line stored once, in
order, and a subscriber that reconnects with Last-Event-ID sees exactly that.

Each fault is real: a redis-server whose connections are killed, whose writes are
paused, that is restarted (with and without its data); a broker process killed. The
body goes chunked over a raw socket, so that a fault lands between two lines the
broker has already stored and one it is storing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from importlib import resources
from typing import Any

import httpx
import pytest
import redis.asyncio as redis

from broker import constants as c
from tests.http.helpers import RawResponse, new_topic, request_bytes
from tests.http.test_ingest import RawIngest, history, line
from tests.support.broker_process import BrokerProcess
from tests.support.failover import IngestAppends
from tests.support.holding_proxy import HoldingProxy
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer
from tests.support.slow_redis_proxy import SlowRedisProxy
from tests.support.sse import last_event_id, parse_sse, whole_blocks

NDJSON = {"Content-Type": "application/x-ndjson"}
RESENDS = 20
"""A producer gives up after this many answers that are not a success."""
RECONNECTS = 50
"""A subscriber gives up after this many streams."""


def body_of(count: int, prefix: str = "t") -> list[bytes]:
    return [line(f"{prefix}{n}") for n in range(1, count + 1)]


def datas(count: int, prefix: str = "t") -> list[str]:
    return [f"{prefix}{n}" for n in range(1, count + 1)]


async def resend_until_success(
    client: httpx.AsyncClient, topic: str, key: str, body: bytes
) -> httpx.Response:
    """The producer: the whole body again with the same key, until a 200/201."""
    answers: list[str] = []
    for _ in range(RESENDS):
        try:
            answer = await client.post(
                f"/topics/{topic}/events",
                content=body,
                headers={**NDJSON, "Idempotency-Key": key},
            )
        except httpx.TransportError as error:
            answers.append(repr(error))
            continue
        if answer.status_code in (200, 201):
            return answer
        assert answer.status_code == 503, answer.text
        answers.append(answer.text)
    raise AssertionError(f"no success in {RESENDS} resends: {answers}")


class Subscriber:
    """An EventSource's view of the topic: reads on, and reconnects with the last id
    it saw when its stream breaks (a bounded number of times)."""

    def __init__(self, url: str, topic: str) -> None:
        self._url, self._topic = url, topic
        self.events: list[tuple[str, str, str]] = []  # (type, data, id)
        self.last_id = ""
        self._task: asyncio.Task[None] | None = None
        self._opened = asyncio.Event()

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._read())
        await asyncio.wait_for(self._opened.wait(), 10)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def datas(self) -> list[Any]:
        return [json.loads(data) for kind, data, _ in self.events if kind == "message"]

    def gaps(self) -> list[dict[str, Any]]:
        return [json.loads(data) for kind, data, _ in self.events if kind == "broker.gap"]

    async def until(self, count: int, timeout: float = 20) -> list[Any]:
        """The messages once ``count`` of them came."""
        await await_until(
            lambda: len(self.datas()) >= count,
            timeout=timeout,
            what=f"{count} events on the subscriber ({self.datas()})",
        )
        return self.datas()

    async def _read(self) -> None:
        async with httpx.AsyncClient(
            base_url=self._url, timeout=httpx.Timeout(5, read=None)
        ) as client:
            for _ in range(RECONNECTS):
                try:
                    await self._stream(client)
                except (httpx.HTTPError, OSError):
                    pass
                await asyncio.sleep(0.05)  # (an EventSource's retry delay: a pace, no race)

    async def _stream(self, client: httpx.AsyncClient) -> None:
        headers = {"Accept": "text/event-stream"}
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        async with client.stream(
            "GET", f"/topics/{self._topic}/events", headers=headers
        ) as response:
            if response.status_code != 200:
                return
            self._opened.set()
            pending = b""
            async for chunk in response.aiter_bytes():
                blocks, pending = whole_blocks(pending + chunk)
                for event in parse_sse(blocks):
                    kind = event.get("event") or "message"
                    self.events.append((kind, event["data"], event.get("id", "")))
                self.last_id = last_event_id(blocks, self.last_id)


@pytest.fixture
def broker(broker_on_private_redis: BrokerProcess) -> BrokerProcess:
    return broker_on_private_redis  # (tests/http/conftest.py)


@pytest.fixture
async def client(broker: BrokerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=broker.url, timeout=30) as session:
        yield session


async def stored_datas(client: httpx.AsyncClient, topic: str) -> list[Any]:
    return [event["data"] for event in await history(client, topic)]


async def an_append_waits_in_redis(admin: redis.Redis) -> bool:
    """A client (the broker's appends) blocked in an EVALSHA: held by CLIENT PAUSE."""
    clients = await admin.client_list()
    return any("b" in c["flags"] and c["cmd"] == "evalsha" for c in clients)


async def test_a_connection_killed_with_an_append_in_flight_loses_and_reorders_nothing(
    private_redis: RedisServer,
    broker: BrokerProcess,
    client: httpx.AsyncClient,
    redis_admin: redis.Redis,
) -> None:
    topic, key, lines = new_topic(), "gen-kill", body_of(10)
    async with Subscriber(broker.url, topic) as subscriber:
        ingest = await RawIngest.open(broker, topic, headers={"Idempotency-Key": key})
        await ingest.send(b"".join(lines[:3]))
        await subscriber.until(3)
        await redis_admin.execute_command("CLIENT", "PAUSE", 10000, "WRITE")
        try:
            await ingest.send(b"".join(lines[3:6]))
            await await_until(
                lambda: an_append_waits_in_redis(redis_admin), timeout=5, what="append held"
            )
            await redis_admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        finally:
            await redis_admin.execute_command("CLIENT", "UNPAUSE")
        answer = await ingest.answer()
        assert answer.status == 503, answer.body
        assert "3 line(s) stored" in json.loads(answer.body)["detail"], answer.body
        ingest.cut()
        again = await resend_until_success(client, topic, key, b"".join(lines))
        assert len(again.json()["ids"]) == 10
        assert await stored_datas(client, topic) == datas(10)
        assert await subscriber.until(10) == datas(10)
        assert subscriber.gaps() == []


async def test_a_write_redis_applies_after_the_ingest_gave_up_on_it_is_stored_once_in_order(
    private_redis: RedisServer,
    broker: BrokerProcess,
    client: httpx.AsyncClient,
    redis_admin: redis.Redis,
) -> None:
    """Writes paused past BROKER_PUBLISH_TIMEOUT_SECONDS: the ingest answers 503 with the
    lines it knows stored; Redis runs the held append once the pause ends (its
    connection still open); the resend finds every line recorded and stores nothing."""
    topic, key, lines = new_topic(), "gen-pause", body_of(6)
    async with Subscriber(broker.url, topic) as subscriber:
        ingest = await RawIngest.open(broker, topic, headers={"Idempotency-Key": key})
        await ingest.send(b"".join(lines[:3]))
        await subscriber.until(3)
        await redis_admin.execute_command("CLIENT", "PAUSE", 20000, "WRITE")
        try:
            await ingest.send(b"".join(lines[3:]))
            answer = await ingest.answer()
            assert await an_append_waits_in_redis(redis_admin)  # (unconfirmed, not dropped)
        finally:
            await redis_admin.execute_command("CLIENT", "UNPAUSE")
        ingest.cut()
        assert answer.status == 503, answer.body
        detail = json.loads(answer.body)["detail"]
        assert "did not confirm" in detail and "3 line(s) stored" in detail, detail
        assert await subscriber.until(6) == datas(6)  # the held append, run late
        again = await resend_until_success(client, topic, key, b"".join(lines))
        assert again.status_code == 200, again.text  # all of it replayed
        assert again.headers["idempotent-replayed"] == "true"
        assert await stored_datas(client, topic) == datas(6)
    assert subscriber.datas() == datas(6) and subscriber.gaps() == []


async def test_a_broker_killed_mid_body_then_the_resend_to_another_stores_each_line_once(
    private_redis: RedisServer, broker: BrokerProcess, redis_admin: redis.Redis
) -> None:
    """SIGKILL with an append in flight (held by a pause); the producer resends to
    another instance on the same Redis."""
    other = BrokerProcess(redis_url=private_redis.url, env={"BROKER_HEARTBEAT_SECONDS": "1"})
    other.start()
    try:
        topic, key, lines = new_topic(), "gen-sigkill", body_of(6)
        async with Subscriber(other.url, topic) as subscriber:
            ingest = await RawIngest.open(broker, topic, headers={"Idempotency-Key": key})
            await ingest.send(b"".join(lines[:3]))
            await subscriber.until(3)
            await redis_admin.execute_command("CLIENT", "PAUSE", 20000, "WRITE")
            try:
                await ingest.send(b"".join(lines[3:5]))
                await await_until(
                    lambda: an_append_waits_in_redis(redis_admin), timeout=5, what="append held"
                )
                broker.kill()
            finally:
                await redis_admin.execute_command("CLIENT", "UNPAUSE")
            ingest.cut()
            async with httpx.AsyncClient(base_url=other.url, timeout=30) as to_other:
                again = await resend_until_success(to_other, topic, key, b"".join(lines))
                assert len(again.json()["ids"]) == 6, again.text
                assert await stored_datas(to_other, topic) == datas(6)
            assert await subscriber.until(6) == datas(6)
        assert subscriber.datas() == datas(6) and subscriber.gaps() == []
    finally:
        other.close()


async def test_a_redis_restarted_without_its_data_mid_body_ends_the_ingest_and_the_resend_is_whole(
    private_redis: RedisServer, broker: BrokerProcess, client: httpx.AsyncClient
) -> None:
    """The lines stored before the restart are lost with the log. The ingest went on
    into a new log and answered 201; a resend under its key (its answer lost, or a
    later fault) then found lines 4-6 recorded there and stored 1-3 after them: out of
    order, and no gap between told. Now the ingest stops at its first line after the
    loss, and the resend stores the whole stream in the new log, in order."""
    topic, key, lines = new_topic(), "gen-restart", body_of(6)
    async with Subscriber(broker.url, topic) as subscriber:
        ingest = await RawIngest.open(broker, topic, headers={"Idempotency-Key": key})
        await ingest.send(b"".join(lines[:3]))
        await subscriber.until(3)
        await asyncio.to_thread(private_redis.restart, keep_data=False)
        await ingest.send(b"".join(lines[3:]))
        answer = await ingest.end()
        ingest.cut()
        assert answer.status == 503, answer.body
        problem = json.loads(answer.body)
        assert problem["type"] == "/problems#ingest-log-lost", problem
        assert "after 3 line(s)" in problem["detail"], problem
        assert await stored_datas(client, topic) == []  # (nothing began a new log)
        again = await resend_until_success(client, topic, key, b"".join(lines))
        assert again.status_code == 201 and len(again.json()["ids"]) == 6, again.text
        assert await stored_datas(client, topic) == datas(6)
        assert await subscriber.until(9) == datas(3) + datas(6)
    # The loss is told between the two, where the lost log ended.
    kinds = [kind for kind, _, _ in subscriber.events]
    assert kinds == ["message"] * 3 + ["broker.gap"] + ["message"] * 6, subscriber.events
    assert subscriber.gaps()[0]["reason"] == "unknown"


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_a_topic_deleted_mid_body_ends_the_ingest_with_409_and_is_not_created_again(
    broker: BrokerProcess, client: httpx.AsyncClient, route: str
) -> None:
    """A DELETE while an ingest goes on: its log is gone, on purpose. It was told 503
    ingest-log-lost, Retry-After: 1, and a producer that resent its stream as told
    created again the topic its owner had deleted. Now it is 409 topic-deleted, no
    Retry-After, the connection closed (the producer learns at once, and stops), how
    many lines went with the log said, and nothing stored: the topic stays deleted.
    The store answered all along: nothing says it failed."""
    topic, key, lines = new_topic(), f"gen-deleted-{route}", body_of(3)
    ingest = await open_ingest(broker, topic, key, route)
    await ingest.send(b"".join(lines[:2]))
    await await_until(lambda: stored_is(client, topic, datas(2)), timeout=5, what="2 stored")
    deleted = await client.delete(f"/topics/{topic}")
    assert deleted.status_code in (200, 204), deleted.text
    await ingest.send(lines[2])
    try:
        answer = await ingest.answer(timeout=5)  # (the body still coming)
    finally:
        ingest.cut()
    assert answer.status == 409, answer.body
    problem = json.loads(answer.body)
    assert problem["type"] == "/problems#topic-deleted", problem
    assert problem["detail"].startswith("the topic was deleted while this ingest"), problem
    assert "the 2 line(s) of it stored before" in problem["detail"], problem
    assert "retry-after" not in answer.headers and answer.headers["connection"] == "close"
    assert (await client.get(f"/topics/{topic}")).status_code == 404  # (not created again)
    assert_no_store_failure_told(broker, (await client.get("/metrics")).text)


async def test_a_log_lost_mid_body_ends_the_ingest_and_is_no_store_failure(
    broker: BrokerProcess, client: httpx.AsyncClient, redis_admin: redis.Redis
) -> None:
    """The topic's keys gone mid-ingest (as when it expires): the ingest stops (503
    ingest-log-lost). The store answered all along: nothing says it failed (it was
    counted in broker_store_errors_total and logged as an outage, "answered 503 until
    it answers", then "answers again" at the next publish)."""
    topic, key, lines = new_topic(), "gen-expired", body_of(3)
    ingest = await RawIngest.open(broker, topic, headers={"Idempotency-Key": key})
    await ingest.send(b"".join(lines[:2]))
    await await_until(lambda: stored_is(client, topic, datas(2)), timeout=5, what="2 stored")
    await redis_admin.delete(*c.topic_keys(topic))  # (what its expiry does)
    await ingest.send(lines[2])
    try:
        answer = await ingest.answer(timeout=5)  # (the body still coming)
    finally:
        ingest.cut()
    assert answer.status == 503, answer.body
    assert json.loads(answer.body)["type"] == "/problems#ingest-log-lost", answer.body
    assert "after 2 line(s)" in json.loads(answer.body)["detail"], answer.body
    assert_no_store_failure_told(broker, (await client.get("/metrics")).text)


def assert_no_store_failure_told(broker: BrokerProcess, metrics: str) -> None:
    rows = metrics.splitlines()
    assert [row for row in rows if row.startswith("broker_store_errors_total{")] == []
    assert "store: a publish failed" not in broker.log(), broker.log()


async def test_a_redis_restarted_with_its_data_mid_body_loses_nothing(
    private_redis: RedisServer, broker: BrokerProcess, client: httpx.AsyncClient
) -> None:
    topic, key, lines = new_topic(), "gen-restart-aof", body_of(6)
    async with Subscriber(broker.url, topic) as subscriber:
        ingest = await RawIngest.open(broker, topic, headers={"Idempotency-Key": key})
        await ingest.send(b"".join(lines[:3]))
        await subscriber.until(3)
        await asyncio.to_thread(private_redis.restart, keep_data=True)
        await ingest.send(b"".join(lines[3:]))
        answer = await ingest.end()
        ingest.cut()
        assert answer.status == 201, answer.body
        assert await stored_datas(client, topic) == datas(6)
        assert await subscriber.until(6) == datas(6)
    assert subscriber.gaps() == []


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_a_failover_loss_told_to_a_keyless_ingest_is_answered_when_its_log_reads_slowly(
    private_redis: RedisServer, redis_admin: redis.Redis, route: str
) -> None:
    """The same failover, with the log slow to read back (its appends answered at once,
    its replays late: a Redis busy with other clients' reads). To tell the producer the
    last line kept, the ingest reads the log back, entry by entry, while its append's
    deadline still ran: past it, the deadline cancelled the reads, and the cancellation
    went out of the ingest whole; the producer, still sending, got no answer at all
    (its connection left open, silent), and did not learn which lines to send again.
    Now it is told its lines were lost (409 ingest-lines-lost, no Retry-After: resent
    whole, the lines kept would be stored twice), that the log could not be read to tell
    which, and the connection closes. (Another keyless ingest's line stored after the
    failover: else the meta's newest keyless entry, line 3's, tells which were kept, and
    nothing is read: append.lua.)"""
    range_sha = hashlib.sha1(
        resources.files("broker").joinpath("lua", "range.lua").read_text().encode()
    ).hexdigest()
    topic, lines = new_topic(), body_of(6)
    with SlowRedisProxy(private_redis.port) as proxy:
        env = {"BROKER_HEARTBEAT_SECONDS": "1", "BROKER_PUBLISH_TIMEOUT_SECONDS": "1"}
        broker = BrokerProcess(redis_url=proxy.url, env=env).start()
        try:
            async with httpx.AsyncClient(base_url=broker.url, timeout=30) as client:
                ingest = await open_ingest(broker, topic, None, route)
                await ingest.send(b"".join(lines[:3]))
                await await_until(lambda: stored_is(client, topic, datas(3)), timeout=5, what="3")
                before_4 = await IngestAppends.read(redis_admin, topic, None)
                await ingest.send(b"".join(lines[3:5]))
                await await_until(lambda: stored_is(client, topic, datas(5)), timeout=5, what="5")
                await before_4.lose_since(redis_admin, 2)  # the failover
                other = await client.post(
                    f"/topics/{topic}/events", content=line("other"), headers=NDJSON
                )
                assert other.status_code == 201, other.text
                proxy.slow_down(range_sha.encode(), 2)  # (each read of the log: past 1 s)
                await ingest.send(lines[5])
                try:
                    answer = await ingest.answer(timeout=15)  # (the body still coming)
                finally:
                    ingest.cut()
                proxy.normal()
                assert proxy.held, "no read of the log was slowed"
                assert answer.headers["connection"] == "close"
                problem = answered_as_its_resend_says(answer)
                assert answer.status == 409, answer.body
                assert "could not be read to tell" in problem["detail"], problem
                assert problem["resend"] == "unknown", problem  # (no client can go on exactly)
                assert problem["last_line_kept_at_most"] == 4, problem
                assert await stored_datas(client, topic) == [*datas(3), "other"]
        finally:
            broker.close()


BODY_TIMEOUT_S = 1  # (the window, twice it, is what the pauses below wait out)
SHORTEST_WINDOW = {
    "BROKER_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT_S),
    "BROKER_IDEMPOTENCY_SECONDS": str(2 * BODY_TIMEOUT_S),  # (the shortest allowed)
    "BROKER_PUBLISH_TIMEOUT_SECONDS": "10",  # (a store slow to answer is waited for)
}


@pytest.fixture
def shortest_window_broker(private_redis: RedisServer) -> Iterator[BrokerProcess]:
    """A broker of the test's own redis-server whose idempotency window is the shortest
    its body timeout allows (twice it)."""
    process = BrokerProcess(redis_url=private_redis.url, env=SHORTEST_WINDOW).start()
    yield process
    process.close()


async def test_every_line_a_failover_lost_is_told_however_late_the_next_append_runs(
    shortest_window_broker: BrokerProcess, redis_admin: redis.Redis
) -> None:
    """The failover that lost every line of the ingest, its next append run later than
    half the window after its last line: here Redis holds it (writes paused) a little
    longer than the body's timeout, a store slow to answer (a pause near the body's
    timeout, the idle deadline firing up to an eighth late, did too). Only a line stored
    within half the window had to be recorded: the ingest went on, line 3 stored after
    the other event, untold. Now it stops (503), nothing stored."""
    broker, topic, key = shortest_window_broker, new_topic(), "gen-late"
    async with httpx.AsyncClient(base_url=broker.url, timeout=30) as client:
        held_ms = int(BODY_TIMEOUT_S * 1000 * 1.15)  # (past half the window: it ends by itself)

        async def pause_writes() -> None:
            await redis_admin.execute_command("CLIENT", "PAUSE", held_ms, "WRITE")

        await every_line_lost_mid_ingest(
            broker, client, redis_admin, topic, key, before_line_3=pause_writes
        )


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_lines_lost_after_a_pause_past_the_window_are_replayed_by_the_whole_stream(
    shortest_window_broker: BrokerProcess, redis_admin: redis.Redis, route: str
) -> None:
    """The failover that lost lines 4-5 of a keyed ingest, which then paused past the
    window (blank lines kept its body going). The records of lines 1-3 lapsed in the
    pause, the store told the loss by the entry stored last, and the ingest was told to
    send the lines after line 3 as a stream of their own (d50d2f9: the whole stream had
    stored 1-3 twice). Now its records are kept answering while it is open: it is told
    to send the whole stream again with its key, and done so, each line is stored once."""
    broker, topic, key = shortest_window_broker, new_topic(), "gen-paused"
    lines, pause = body_of(6), PausePastTheWindow(redis_admin)
    async with httpx.AsyncClient(base_url=broker.url, timeout=30) as client:
        problem = await lines_4_and_5_lost_mid_ingest(
            broker, client, redis_admin, route, topic, key, before_line_6=pause
        )
        assert problem["type"] == "/problems#ingest-lines-lost", problem
        detail = problem["detail"]
        assert "line 5, is no longer there" in detail, problem
        assert "the lines kept are replayed" in detail, problem
        assert await stored_datas(client, topic) == datas(3)
        stream = b"".join(lines[:5]) + pause.sent + lines[5]
        again = await resend_until_success(client, topic, key, stream)
        assert again.status_code == 201, again.text
        assert await stored_datas(client, topic) == datas(6)


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_a_keyed_ingest_paused_past_the_window_then_broken_is_resent_whole_once(
    shortest_window_broker: BrokerProcess, redis_admin: redis.Redis, route: str
) -> None:
    """A keyed ingest stores lines 1-3, pauses past the window (blank lines keep its body
    going: its timeout runs from each read), stores line 4, and its connection breaks.
    Its records lapsed in the pause, line 4 began anew under its key, and the whole
    stream resent with its key stored 1-3 twice. Now its records are kept answering
    while it is open: the resend replays 1-4 and stores 5-6, each line once."""
    broker, topic, key = shortest_window_broker, new_topic(), "gen-long-pause"
    lines = body_of(6)
    async with httpx.AsyncClient(base_url=broker.url, timeout=30) as client:
        ingest = await open_ingest(broker, topic, key, route)
        try:
            await ingest.send(b"".join(lines[:3]))
            await await_until(lambda: stored_is(client, topic, datas(3)), timeout=5, what="3")
            written = await IngestAppends.read(redis_admin, topic, key)
            pause = PausePastTheWindow(redis_admin)
            await pause(ingest, written)
            await ingest.send(lines[3])
            await await_until(lambda: stored_is(client, topic, datas(4)), timeout=5, what="4")
        finally:
            ingest.cut()  # (the connection breaks)
        stream = b"".join(lines[:3]) + pause.sent + b"".join(lines[3:])
        again = await resend_until_success(client, topic, key, stream)
        assert again.status_code == 201, again.text
        assert await stored_datas(client, topic) == datas(6)


TTL_S = BODY_TIMEOUT_S  # (under the window, as its default is: an expiry the records outlive)


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_a_topic_expires_whole_under_an_open_keyed_ingest_that_pauses_past_its_ttl(
    private_redis: RedisServer, redis_admin: redis.Redis, route: str
) -> None:
    """An open keyed ingest's line records are kept answering, but its topic is not kept:
    nobody publishing to it for its TTL (the ingest sending blank lines), it expires
    whole, and the ingest's next line is told its log was lost; the whole stream resent
    with its key is stored again, once."""
    env = {**SHORTEST_WINDOW, "BROKER_TOPIC_TTL_SECONDS": str(TTL_S)}
    broker = BrokerProcess(redis_url=private_redis.url, env=env).start()
    topic, key, lines = new_topic(), "gen-expiring", body_of(2)
    try:
        async with httpx.AsyncClient(base_url=broker.url, timeout=30) as client:
            ingest = await open_ingest(broker, topic, key, route)
            try:
                await ingest.send(lines[0])
                await await_until(lambda: stored_is(client, topic, datas(1)), timeout=5, what="1")
                blanks = await blank_lines_until_expired(ingest, redis_admin, topic)
                await ingest.send(lines[1])
                answer = await ingest.answer(timeout=5)  # (the body still coming)
            finally:
                ingest.cut()
            assert answer.status == 503, answer.body
            assert json.loads(answer.body)["type"] == "/problems#ingest-log-lost", answer.body
            stream = lines[0] + blanks + lines[1]
            again = await resend_until_success(client, topic, key, stream)
            assert again.status_code == 201, again.text
            assert await stored_datas(client, topic) == datas(2)
    finally:
        broker.close()


async def blank_lines_until_expired(
    ingest: RawIngest, redis_admin: redis.Redis, topic: str
) -> bytes:
    """Blank lines (a read each, paced within the body's timeout) until every key of the
    topic is gone; the blank lines sent."""
    pace_s, sent = BODY_TIMEOUT_S / 8, b""
    for _ in range(int(4 * TTL_S / pace_s)):
        if not await redis_admin.exists(*c.topic_keys(topic)):
            return sent
        await ingest.send(b"\n")
        sent += b"\n"
        await asyncio.sleep(pace_s)  # (a producer's pause, paced: no race behind it)
    raise AssertionError("the topic did not expire")


class PausePastTheWindow:
    """The ingest sends blank lines (a read each: its body's timeout does not fire) until
    Redis's clock is past the window after the last write of its lines that Redis kept.
    ``sent``: the blank lines sent (numbered lines of the stream, as any: its resend
    whole sends them too)."""

    WINDOW_MS = int(SHORTEST_WINDOW["BROKER_IDEMPOTENCY_SECONDS"]) * 1000
    PACE_S = BODY_TIMEOUT_S / 8

    def __init__(self, redis_admin: redis.Redis) -> None:
        self._redis_admin = redis_admin
        self.sent = b""

    async def __call__(self, ingest: RawIngest, kept: IngestAppends) -> None:
        assert kept.at is not None, "none of its lines was kept"
        for _ in range(int(4 * self.WINDOW_MS / 1000 / self.PACE_S)):
            seconds, micros = await self._redis_admin.time()
            if seconds * 1000 + micros // 1000 > kept.at + self.WINDOW_MS:
                return
            await ingest.send(b"\n")
            self.sent += b"\n"
            await asyncio.sleep(self.PACE_S)  # (a producer's pause, paced: no race behind it)
        raise AssertionError("Redis's clock did not pass the window")


async def every_line_lost_mid_ingest(
    broker: BrokerProcess,
    client: httpx.AsyncClient,
    redis_admin: redis.Redis,
    topic: str,
    key: str,
    before_line_3: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """An event ("other"), then an ingest under ``key`` whose lines 1-2 a failover loses
    once stored (their appends undone), then (after ``before_line_3``) line 3 sent: it
    must be answered 503 ingest-lines-lost, the whole stream to be resent (none of it
    kept, none stored twice), line 3 not stored after the other event."""
    lines = body_of(3)
    other = await client.post(f"/topics/{topic}/events", json={"data": "other"})
    assert other.status_code == 201, other.text
    before_1 = await IngestAppends.read(redis_admin, topic, key)
    ingest = await open_ingest(broker, topic, key, "lean")
    await ingest.send(b"".join(lines[:2]))
    await await_until(
        lambda: stored_is(client, topic, ["other", *datas(2)]), timeout=5, what="2 stored"
    )
    await before_1.lose_since(redis_admin, 2)  # the failover
    if before_line_3 is not None:
        await before_line_3()
    await ingest.send(lines[2])
    try:
        answer = await ingest.answer(timeout=10)  # (the body still coming)
    except TimeoutError:
        raise AssertionError(f"it went on: {await stored_datas(client, topic)}") from None
    finally:
        ingest.cut()
    assert answered_as_its_resend_says(answer)["resend"] == "whole", answer.body
    assert await stored_datas(client, topic) == ["other"]  # (line 3 not stored)


async def lines_4_and_5_lost_mid_ingest(
    broker: BrokerProcess,
    client: httpx.AsyncClient,
    redis_admin: redis.Redis,
    route: str,
    topic: str,
    key: str | None,
    before_line_6: Callable[[RawIngest, IngestAppends], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """An ingest of 6 lines under ``key`` (or none) whose lines 4-5 a failover loses
    once stored (their appends undone), then (after ``before_line_6``, given the ingest
    and what the appends of 4-5 undid) line 6 sent: the problem it must be answered
    with at once (ingest-lines-lost, the connection closed, the body still coming; 503
    or 409 as its ``resend`` says), line 6 not stored after 3."""
    lines = body_of(6)
    ingest = await open_ingest(broker, topic, key, route)
    await ingest.send(b"".join(lines[:3]))
    await await_until(lambda: stored_is(client, topic, datas(3)), timeout=5, what="3 stored")
    before_4 = await IngestAppends.read(redis_admin, topic, key)
    await ingest.send(b"".join(lines[3:5]))
    await await_until(lambda: stored_is(client, topic, datas(5)), timeout=5, what="5 stored")
    await before_4.lose_since(redis_admin, 2)  # the failover
    if before_line_6 is not None:
        await before_line_6(ingest, before_4)
    await ingest.send(lines[5])
    try:
        answer = await ingest.answer(timeout=5)  # (the body still coming)
    except TimeoutError:
        raise AssertionError(f"it went on: {await stored_datas(client, topic)}") from None
    finally:
        ingest.cut()
    assert answer.headers["connection"] == "close"
    return answered_as_its_resend_says(answer)


def answered_as_its_resend_says(answer: RawResponse) -> dict[str, Any]:
    """An ingest-lines-lost answer's problem, its status as its ``resend`` member says:
    503 with ``Retry-After`` exactly when the whole stream is to be resent; else 409
    without it. A producer retries a 503 by resending the whole stream under its key
    (any HTTP client's retry, and the Python client's did): where lines kept are not
    recorded under the key, that stored them twice."""
    problem: dict[str, Any] = json.loads(answer.body)
    assert problem["type"] == "/problems#ingest-lines-lost", problem
    status, retry_after = answer.status, answer.headers.get("retry-after")
    if problem["resend"] == "whole":
        assert (status, retry_after) == (503, "1"), (status, answer.headers, problem)
    else:
        assert (status, retry_after) == (409, None), (status, answer.headers, problem)
    return problem


async def open_ingest(
    broker: BrokerProcess, topic: str, key: str | None, route: str, query: str = ""
) -> RawIngest:
    """An ingest on the lean route, or on the ASGI route: behind a request uvicorn's own
    protocol reads (as in test_ingest). ``key`` None: without an Idempotency-Key."""
    headers = {} if key is None else {"Idempotency-Key": key}
    if route == "lean":
        return await RawIngest.open(broker, topic, query, headers=headers)
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    head = {**NDJSON, "Transfer-Encoding": "chunked", **headers}
    target = f"{broker.url}/topics/{topic}/events{query}"
    writer.write(
        request_bytes("GET", f"{broker.url}/healthz") + request_bytes("POST", target, head)
    )
    health = RawResponse(reader, writer)
    await health.read_head()
    await health.read_sized_body()
    assert health.status == 200, health.body
    return RawIngest(reader, writer)


CLOSE_DEADLINE_S = 1


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_a_close_redis_does_not_answer_is_told_within_the_deadline(
    private_redis: RedisServer, redis_admin: redis.Redis, route: str
) -> None:
    """``?close=true``: the body ended, its lines stored, the topic closed, and Redis's
    replies held from then on (a store that stops answering). The close had no deadline
    of its own, the appends' being over: the producer waited on. Now it is answered 503
    within ``BROKER_PUBLISH_TIMEOUT_SECONDS``, told its lines were stored and the close
    not confirmed, to be done again by ``POST /topics/{t}/close``: done so, the topic
    ends once, after each line once."""
    topic, lines = new_topic(), body_of(2)
    with HoldingProxy(private_redis.port) as proxy:
        env = {"BROKER_PUBLISH_TIMEOUT_SECONDS": str(CLOSE_DEADLINE_S)}
        broker = BrokerProcess(redis_url=f"redis://127.0.0.1:{proxy.port}", env=env).start()
        try:
            async with httpx.AsyncClient(base_url=broker.url, timeout=30) as client:
                ingest = await open_ingest(broker, topic, None, route, "?close=true")
                await ingest.send(b"".join(lines))
                await await_until(lambda: stored_is(client, topic, datas(2)), timeout=5, what="2")
                proxy.hold()  # (Redis runs the close; its reply is held)
                try:  # (within 4 s: the connection's own reply timeout, 5 s, answered before)
                    answer = await ingest.end(timeout=4 * CLOSE_DEADLINE_S)
                except TimeoutError:
                    raise AssertionError("no answer: the close waited on Redis") from None
                finally:
                    ingest.cut()
                    proxy.release()
                assert answer.status == 503, answer.body
                problem = json.loads(answer.body)
                assert problem["type"] == "/problems#store-unavailable", problem
                assert "2 line(s) stored" in problem["detail"], problem
                assert f"POST /topics/{topic}/close" in problem["detail"], problem
                closed = await client.post(f"/topics/{topic}/close")
                assert closed.status_code in (200, 201), closed.text
                events = await history(client, topic)
                assert [e["data"] for e in events if e["event"] != "broker.end"] == datas(2)
                assert [e["id"] for e in events if e["event"] == "broker.end"] == [
                    closed.json()["id"]
                ]
        finally:
            broker.close()


async def stored_is(client: httpx.AsyncClient, topic: str, expected: list[Any]) -> bool:
    return await stored_datas(client, topic) == expected
