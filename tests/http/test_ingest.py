"""Streaming ingest: ``POST /topics/{t}/events`` with ``Content-Type: application/x-ndjson``.

The body is sent by hand (chunked, over a raw socket) where timing matters: a
line must reach a subscriber while the body is still open, and a body cut
mid-way must leave what was stored, stored once.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator, Mapping

import httpx
import pytest

from tests.http.conftest import LIMITS
from tests.http.helpers import (
    RawResponse,
    assert_problem,
    listed_topics,
    new_topic,
    request_bytes,
    subscribe,
)
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer

NDJSON = {"Content-Type": "application/x-ndjson"}
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def slow_body_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    env = {"BROKER_HEARTBEAT_SECONDS": "1", "BROKER_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT_S)}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


@pytest.fixture
async def aclient(http_broker: BrokerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=http_broker.url, timeout=30) as session:
        yield session


def line(data: object, **fields: object) -> bytes:
    return json.dumps({"data": data, **fields}).encode() + b"\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class RawIngest:
    """One ingest whose chunked body is written by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(
        cls, broker: BrokerProcess, topic: str, query: str = "", headers: Mapping[str, str] = {}
    ) -> RawIngest:
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
        head = {**NDJSON, "Transfer-Encoding": "chunked", **headers}
        writer.write(request_bytes("POST", f"{broker.url}/topics/{topic}/events{query}", head))
        await writer.drain()
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(chunk(data))
        await self.writer.drain()

    async def end(self, timeout: float = 10) -> RawResponse:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()
        return await self.answer(timeout)

    async def answer(self, timeout: float = 10) -> RawResponse:
        response = RawResponse(self.reader, self.writer)
        await response.read_head(timeout)
        await response.read_sized_body(timeout)
        return response

    def cut(self) -> None:
        """The connection breaks off (a reset, not a clean end of the body)."""
        self.writer.transport.abort()


async def history(client: httpx.AsyncClient, topic: str) -> list[dict[str, object]]:
    response = await client.get(
        f"/topics/{topic}/events", params={"limit": 1000}, headers={"Accept": "application/json"}
    )
    assert response.status_code == 200, response.text
    events: list[dict[str, object]] = response.json()["events"]
    return events


async def test_each_line_is_delivered_before_the_body_ends(
    http_broker: BrokerProcess, aclient: httpx.AsyncClient
) -> None:
    topic = new_topic()
    async with subscribe(aclient, topic) as stream:
        ingest = await RawIngest.open(http_broker, topic)
        try:
            for n in range(1, 4):
                await ingest.send(line(f"token {n}", event="token"))
                event = await stream.next(5)  # the body is still open
                assert (event.event, event.data) == ("token", f'"token {n}"')
            # A line may come in pieces, and the last one needs no line feed.
            await ingest.send(b'{"data": "spl')
            await ingest.send(b'it"}\n{"data": "no line feed"}')
            response = await ingest.end()
        finally:
            ingest.writer.close()
        assert response.status == 201, bytes(response.body)
        ids = json.loads(response.body)["ids"]
        assert len(ids) == 5
        rest = [await stream.next() for _ in range(2)]
        assert [e.data for e in rest] == ['"split"', '"no line feed"']
        assert rest[-1].id == ids[-1]


async def test_order_is_kept_over_many_lines_and_a_long_ingest_answers_a_count(
    aclient: httpx.AsyncClient,
) -> None:
    topic, total = new_topic(), 2000  # past BROKER_MAX_BATCH (1000)

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, total, 50):
            yield b"".join(line(n) for n in range(start, start + 50))
            await asyncio.sleep(0)

    async with subscribe(aclient, topic) as stream:
        response = await aclient.post(f"/topics/{topic}/events", content=body(), headers=NDJSON)
        assert response.status_code == 201, response.text
        answer = response.json()
        assert set(answer) == {"count", "first_id", "last_id"} and answer["count"] == total
        received = [await stream.next() for _ in range(total)]
    assert [int(e.data) for e in received] == list(range(total))
    assert received[0].id == answer["first_id"] and received[-1].id == answer["last_id"]
    assert len({e.id for e in received}) == total


async def test_a_short_ingest_answers_its_ids_and_blank_lines_are_skipped(
    aclient: httpx.AsyncClient,
) -> None:
    topic = new_topic()
    body = line(1) + b"\n   \n" + line(2, event="e", retry=100)
    response = await aclient.post(f"/topics/{topic}/events", content=body, headers=NDJSON)
    assert response.status_code == 201, response.text
    assert [e["id"] for e in await history(aclient, topic)] == response.json()["ids"]


async def test_past_max_batch_lines_the_answer_is_a_count(limits_broker: BrokerProcess) -> None:
    """BROKER_MAX_BATCH bounds the ids in the answer, not an ingest's length; nor does
    BROKER_MAX_BODY_BYTES (the body is never held whole)."""
    max_batch, max_body = int(LIMITS["BROKER_MAX_BATCH"]), int(LIMITS["BROKER_MAX_BODY_BYTES"])
    topic = new_topic()
    async with httpx.AsyncClient(base_url=limits_broker.url, timeout=30) as client:
        at_limit = b"".join(line(n) for n in range(max_batch))
        response = await client.post(f"/topics/{topic}/events", content=at_limit, headers=NDJSON)
        assert response.status_code == 201 and len(response.json()["ids"]) == max_batch
        many = b"".join(line("x" * 100) for _ in range(2 * max_body // 100))
        assert len(many) > max_body
        response = await client.post(f"/topics/{topic}/events", content=many, headers=NDJSON)
        assert response.status_code == 201, response.text
        answer = response.json()
        stored = await history(client, topic)
        assert answer == {
            "count": len(stored) - max_batch,
            "first_id": stored[max_batch]["id"],
            "last_id": stored[-1]["id"],
        }
        # One line is still one event: over BROKER_MAX_EVENT_BYTES it is a 413.
        big = line("x" * int(LIMITS["BROKER_MAX_EVENT_BYTES"]))
        assert_problem(
            await client.post(f"/topics/{topic}/events", content=big, headers=NDJSON), 413
        )


async def test_a_line_too_long_to_hold_is_413_naming_it(limits_broker: BrokerProcess) -> None:
    """A line that outgrows what may be held before its end is refused as it arrives,
    named like any bad line (blank lines count); the lines before it stay stored."""
    topic = new_topic()
    too_long = b'{"data": "' + b"x" * (int(LIMITS["BROKER_MAX_EVENT_BYTES"]) + 5000)
    async with httpx.AsyncClient(base_url=limits_broker.url, timeout=30) as client:
        body = line(1) + line(2) + b"\n" + too_long
        response = await client.post(f"/topics/{topic}/events", content=body, headers=NDJSON)
        problem = assert_problem(response, 413)
        assert "line 4" in problem["detail"], problem
        assert [e["data"] for e in await history(client, topic)] == [1, 2]


async def test_a_whole_line_too_long_is_413_however_it_arrives(
    limits_broker: BrokerProcess,
) -> None:
    """A line over the limit that arrives whole in one read (its data within
    BROKER_MAX_EVENT_BYTES, padded with spaces) is refused as one cut across reads
    is: it was stored."""
    topic = new_topic()
    padded = b'{"data": 2' + b" " * (int(LIMITS["BROKER_MAX_EVENT_BYTES"]) + 5000) + b"}\n"
    async with httpx.AsyncClient(base_url=limits_broker.url, timeout=30) as client:
        body = line(1) + padded + line(3)
        response = await client.post(f"/topics/{topic}/events", content=body, headers=NDJSON)
        problem = assert_problem(response, 413)
        assert "line 2" in problem["detail"], problem
        assert [e["data"] for e in await history(client, topic)] == [1]


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        (b"{not json}\n", "line 3"),
        (b'{"event": "no data"}\n', "line 3"),
        (b'{"data": 1, "event": "broker.end"}\n', "line 3"),
        (b"\n" + line(3) + b"[1, 2]\n", "line 5"),  # blank lines count
        (b"\x0c\n", "line 3"),  # a form feed is no JSON whitespace: not a blank line
        (b" \x0b\r\n", "line 3"),  # nor is a vertical tab
        (b'{"data": ' + b"[" * 1000 + b"1" + b"]" * 1000 + b"}\n", "line 3"),  # (was a 500)
    ],
)
async def test_a_bad_line_stops_the_ingest_and_names_it_keeping_the_lines_before(
    aclient: httpx.AsyncClient, bad: bytes, what: str
) -> None:
    topic = new_topic()
    body = line(1) + line(2) + bad + line("never")
    response = await aclient.post(
        f"/topics/{topic}/events?close=true", content=body, headers=NDJSON
    )
    problem = assert_problem(response, 400)
    assert what in problem["detail"], problem
    stored = [e["data"] for e in await history(aclient, topic)]
    assert stored[:2] == [1, 2] and "never" not in stored
    assert all(e != {} for e in stored)  # not closed: the body did not end normally
    assert (await aclient.post(f"/topics/{topic}/events", json={"data": 9})).status_code == 201


async def test_a_broken_ingest_resent_whole_with_its_key_stores_each_line_once(
    http_broker: BrokerProcess, aclient: httpx.AsyncClient
) -> None:
    topic, key = new_topic(), {"Idempotency-Key": "generation-1"}
    lines = [line(f"t{n}") for n in range(20)]
    async with subscribe(aclient, topic) as stream:
        ingest = await RawIngest.open(http_broker, topic, "?close=true", key)
        await ingest.send(b"".join(lines[:8]) + lines[8][:5])  # line 9 cut in the middle
        first = [await stream.next() for _ in range(8)]
        ingest.cut()
        # Broken off: stored what came whole, and NOT closed.
        assert [e["data"] for e in await history(aclient, topic)] == [f"t{n}" for n in range(8)]
        # (the topic's own info: a listing's page may be empty and have a next)
        assert (await aclient.get(f"/topics/{topic}")).json()["closed"] is False
        # The producer sends it all again, with the same key.
        again = await aclient.post(
            f"/topics/{topic}/events?close=true",
            content=b"".join(lines),
            headers={**NDJSON, **key},
        )
        assert again.status_code == 201, again.text
        answer = again.json()
        assert answer["ids"][:8] == [e.id for e in first]
        assert len(answer["ids"]) == 20
        rest = [await stream.next() for _ in range(13)]
    assert [e.data for e in rest[:12]] == [f'"t{n}"' for n in range(8, 20)]
    assert rest[-1].event == "broker.end" and rest[-1].id == answer["end_id"]
    stored = await history(aclient, topic)
    assert [e["data"] for e in stored] == [f"t{n}" for n in range(20)] + [{}]
    assert [e["id"] for e in stored[:20]] == answer["ids"]


async def test_a_publishers_key_is_not_an_ingests_line(aclient: httpx.AsyncClient) -> None:
    """A publish keyed "job:1" and line 1 of the ingest keyed "job" are two things: the
    line was skipped as a repeat of the publish, and both answered 500 (the records
    of the two kinds shared one hash and were read as each other's)."""
    topic = new_topic()
    posted = await aclient.post(
        f"/topics/{topic}/events", json={"data": "posted"}, headers={"Idempotency-Key": "job:1"}
    )
    assert posted.status_code == 201, posted.text
    ingested = await aclient.post(
        f"/topics/{topic}/events",
        content=line("a") + line("b"),
        headers={**NDJSON, "Idempotency-Key": "job"},
    )
    assert ingested.status_code == 201, ingested.text
    # And the other way round: a publish keyed as an earlier ingest's line.
    again = await aclient.post(
        f"/topics/{topic}/events", json={"data": "posted2"}, headers={"Idempotency-Key": "job:2"}
    )
    assert again.status_code == 201, again.text
    stored = await history(aclient, topic)
    assert [e["data"] for e in stored] == ["posted", "a", "b", "posted2"]
    assert ingested.json()["ids"] == [e["id"] for e in stored[1:3]]
    # Each still answers its own repeats.
    for url_headers, body in (
        ({"Idempotency-Key": "job:1"}, {"json": {"data": "posted"}}),
        ({**NDJSON, "Idempotency-Key": "job"}, {"content": line("a") + line("b")}),
    ):
        repeat = await aclient.post(f"/topics/{topic}/events", headers=url_headers, **body)  # type: ignore[arg-type]
        assert repeat.status_code == 200, repeat.text
    assert len(await history(aclient, topic)) == 4


async def test_a_resent_ingest_with_nothing_new_is_replayed(aclient: httpx.AsyncClient) -> None:
    topic, headers = new_topic(), {**NDJSON, "Idempotency-Key": "k"}
    body = line(1) + line(2)
    first = await aclient.post(f"/topics/{topic}/events", content=body, headers=headers)
    again = await aclient.post(f"/topics/{topic}/events", content=body, headers=headers)
    assert first.status_code == 201 and again.status_code == 200, (first.text, again.text)
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert len(await history(aclient, topic)) == 2


async def test_a_resent_ingest_that_had_closed_its_topic_is_answered_again(
    aclient: httpx.AsyncClient,
) -> None:
    """The producer's connection broke after the body ended (the topic closed) but
    before the answer came: the resend is answered as the first was, not 409."""
    topic, headers = new_topic(), {**NDJSON, "Idempotency-Key": "k"}
    url, body = f"/topics/{topic}/events?close=true", line(1) + line(2)
    first = await aclient.post(url, content=body, headers=headers)
    again = await aclient.post(url, content=body, headers=headers)
    assert first.status_code == 201, first.text
    assert again.status_code == 200, again.text
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert len(await history(aclient, topic)) == 3


@pytest.mark.parametrize(
    ("body", "key"),
    [(b"", {}), (b"\n \r\n", {}), (b"\n", {"Idempotency-Key": "k"})],
    ids=["empty", "blank-lines", "keyed-blank-line"],
)
async def test_an_ingest_of_no_line_that_closes_a_closed_topic_is_answered_200(
    aclient: httpx.AsyncClient, body: bytes, key: dict[str, str]
) -> None:
    """An ingest with no line (empty, or blank lines only) and ``?close=true`` is a
    close: on a topic closed already it closes nothing, and is answered 200 with the
    same end, as a close twice is (CONTRACT: closing twice answers 200). It said 201
    Created (its retry too, the topic closed by its first attempt), as if it had closed
    the topic itself."""
    topic = new_topic()
    assert (await aclient.post(f"/topics/{topic}/events", json={"data": 1})).status_code == 201
    url, headers = f"/topics/{topic}/events?close=true", {**NDJSON, **key}
    first = await aclient.post(url, content=body, headers=headers)
    again = await aclient.post(url, content=body, headers=headers)
    closed = await aclient.post(f"/topics/{topic}/close")
    assert first.status_code == 201, first.text
    assert closed.status_code == 200, closed.text
    assert again.status_code == 200, again.text
    assert again.json() == first.json() == {"ids": [], "end_id": closed.json()["id"]}
    assert len(await history(aclient, topic)) == 2


async def test_an_idle_gap_longer_than_the_body_timeout_stops_the_ingest(
    slow_body_broker: BrokerProcess,
) -> None:
    topic = new_topic()
    ingest = await RawIngest.open(slow_body_broker, topic, "?close=true")
    try:
        # Lines paced just under the timeout: the whole takes longer than it, and passes.
        for n in range(3):
            await ingest.send(line(n))
            await asyncio.sleep(BODY_TIMEOUT_S * 0.6)
        # Then silence: stopped, with the guard's answer, and the connection closed.
        response = await ingest.answer(timeout=BODY_TIMEOUT_S + 5)
        assert response.status == 408, bytes(response.body)
        assert json.loads(response.body)["type"] == "/problems#request-timeout"
        assert await asyncio.wait_for(ingest.reader.read(), 5) == b""
    finally:
        ingest.writer.close()
    async with httpx.AsyncClient(base_url=slow_body_broker.url, timeout=10) as client:
        assert [e["data"] for e in await history(client, topic)] == [0, 1, 2]
        listed = await listed_topics(client, topic)
        assert [t["closed"] for t in listed] == [False]


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_an_ingest_under_way_at_shutdown_is_answered_at_once(
    redis_server: RedisServer, route: str
) -> None:
    """The instance drains while a producer's stream is still coming: it was left
    unanswered until the grace ended (20 s here), then its connection closed, and a
    producer without an Idempotency-Key could not tell which lines were stored. It is
    answered at once: 503, Connection: close, how many lines were stored."""
    broker = BrokerProcess(
        redis_url=redis_server.url, env={"BROKER_SHUTDOWN_GRACE_SECONDS": "20"}
    ).start()
    try:
        topic = new_topic()
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
        target = f"{broker.url}/topics/{topic}/events"
        head = request_bytes("POST", target, {**NDJSON, "Transfer-Encoding": "chunked"})
        if route == "by-app":  # behind a request uvicorn's protocol reads: the ASGI route
            writer.write(request_bytes("GET", f"{broker.url}/healthz") + head)
            health = RawResponse(reader, writer)
            await health.read_head()
            await health.read_sized_body()
        else:
            writer.write(head)
        ingest = RawIngest(reader, writer)
        await ingest.send(line(1) + line(2))
        async with httpx.AsyncClient(base_url=broker.url, timeout=10) as client:
            for _ in range(100):
                if len(await history(client, topic)) == 2:
                    break
                await asyncio.sleep(0.05)
        assert broker.process is not None
        broker.process.send_signal(signal.SIGTERM)
        answer = await ingest.answer(timeout=10)
        assert answer.status == 503, answer.body
        assert answer.headers["connection"] == "close"
        problem = json.loads(answer.body)
        assert problem["title"] == "Instance shutting down", problem
        assert "2 line(s) stored" in problem["detail"], problem
        assert await asyncio.to_thread(broker.process.wait, 15) == 0
        writer.close()
    finally:
        broker.close()
