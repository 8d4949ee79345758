"""Streaming ingests served lean (``api.lean_ingest``): the same answers as the ASGI route.

A plain ingest (HTTP/1.1, chunked or a Content-Length) on a connection the
broker's own protocol still holds is served lean; once a connection was handed
to uvicorn (here by a ``GET /healthz`` first), every later request on it takes
the ASGI route: so each case is sent both ways, through one real broker
process, and the answers compared byte for byte (all but the date, and the ids
of a success).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from api import lean_ingest
from api.app import create_app
from api.lean_ingest import ingest_request
from api.settings import Settings
from tests.http.conftest import LIMITS
from tests.http.helpers import listed_topics, new_topic
from tests.http.test_lean_publish import (
    ORIGIN,
    Answer,
    Connection,
    _pause,
    _resume,
    _shutting_down,
    history_bytes,
    publish_bytes,
)
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until
from tests.support.procs import rss_bytes
from tests.support.redis_server import RedisServer
from tests.support.tokens import JWT_SETTINGS, claims, hs_token

NDJSON = "application/x-ndjson"
ROUTES = ("lean", "asgi")
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def line(data: object) -> bytes:
    return json.dumps({"data": data}).encode() + b"\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


END = b"0\r\n\r\n"


def ingest_head(
    port: int, topic: str, query: str = "", headers: dict[str, str] | None = None
) -> bytes:
    """The head of a chunked ingest; its body follows as ``chunk``s and ``END``."""
    lines = [f"POST /topics/{topic}/events{query} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"Content-Type: {NDJSON}", "Transfer-Encoding: chunked"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"


class BehindHealthCheck(Connection):
    """A connection whose first request goes pipelined behind a health check: uvicorn's
    protocol, handed the health check, reads it too, and the app (ASGI) serves it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.prefix, self.unread = HEALTHZ, 1

    async def send(self, data: bytes) -> None:
        data, self.prefix = self.prefix + data, b""
        await super().send(data)

    async def answer(self, timeout: float = 8.0) -> Answer:
        await self.health_checked(timeout)
        return await super().answer(timeout)

    async def health_checked(self, timeout: float = 8.0) -> None:
        """The health check answered (so what is sent next comes after it)."""
        if self.unread:
            self.unread = 0
            assert (await super().answer(timeout)).status == 200


async def open_on(route: str, port: int) -> Connection:
    """A connection whose next request is served lean, or by the app (ASGI)."""
    if route == "asgi":
        return await BehindHealthCheck.open(port)
    return await Connection.open(port)


async def test_the_asgi_route_of_these_tests_is_served_by_uvicorn(
    in_process_server: tuple[int, list[Any]],
) -> None:
    """``open_on("asgi")`` reaches uvicorn's protocol and the app, not the lean path."""
    port, handed = in_process_server
    topic = new_topic()
    [answer] = await exchange_on("asgi", port, ingest_head(port, topic) + chunk(line(1)) + END)
    assert answer.status == 201
    targets = [target for protocol in handed for target in protocol.targets]
    assert targets == [b"/healthz", f"/topics/{topic}/events".encode()]


async def exchange_on(route: str, port: int, data: bytes, count: int = 1) -> list[Answer]:
    connection = await open_on(route, port)
    try:
        await connection.send(data)
        return await connection.answers(count)
    finally:
        await connection.close()


async def stored(broker: BrokerProcess, topic: str) -> list[Any]:
    async with httpx.AsyncClient(base_url=broker.url, timeout=8) as client:
        response = await client.get(
            f"/topics/{topic}/events", headers={"Accept": "application/json"}
        )
    if response.status_code == 404:
        return []
    assert response.status_code == 200, response.text
    return [event["data"] for event in response.json()["events"]]


async def stored_is(broker: BrokerProcess, topic: str, expected: list[Any]) -> bool:
    return await stored(broker, topic) == expected


async def is_closed(broker: BrokerProcess, topic: str) -> bool:
    async with httpx.AsyncClient(base_url=broker.url, timeout=8) as client:
        listed = await listed_topics(client, topic)
    return bool(listed) and bool(listed[0]["closed"])


def same(answers: dict[str, Answer]) -> Answer:
    """The lean answer, once it reads as the ASGI route's."""
    assert answers["lean"].comparable() == answers["asgi"].comparable(), answers
    return answers["lean"]


# -- which ingests go lean (no server) --------------------------------------------------------


@pytest.fixture(scope="module")
def app() -> object:
    return create_app(Settings())


def head(first_line: str, *headers: str) -> bytes:
    return "\r\n".join([first_line, "Host: 127.0.0.1", *headers, "", ""]).encode()


POST = "POST /topics/t/events HTTP/1.1"


@pytest.mark.parametrize(
    "raw",
    [
        head(POST, f"Content-Type: {NDJSON}", "Transfer-Encoding: chunked"),
        head(POST, f"Content-Type: {NDJSON}; charset=utf-8", "Transfer-Encoding: Chunked"),
        head(POST, f"Content-Type: {NDJSON}", "Content-Length: 20"),
        head(
            "POST /topics/t/events?close=true HTTP/1.1",
            f"Content-Type: {NDJSON}",
            "Content-Length: 20000000",  # not held whole: no body limit
            "Idempotency-Key: k",
            "Authorization: Bearer x",
        ),
    ],
)
def test_plain_ingests_are_served_lean(raw: bytes, app: object) -> None:
    assert ingest_request(raw, app) is not None


@pytest.mark.parametrize(
    "raw",
    [
        head(POST.replace("1.1", "1.0"), f"Content-Type: {NDJSON}", "Content-Length: 2"),
        head(POST, f"Content-Type: {NDJSON}", "Transfer-Encoding: chunked", "Expect: 100-continue"),
        head(POST, f"Content-Type: {NDJSON}", "Transfer-Encoding: gzip, chunked"),
        head(POST, f"Content-Type: {NDJSON}", "Transfer-Encoding: chunked", "Content-Length: 2"),
        head(POST, f"Content-Type: {NDJSON}", "Content-Length: 2", "Content-Length: 2"),
        head(POST, f"Content-Type: {NDJSON}"),  # no body framing
        head(POST, "Content-Type: application/json", "Transfer-Encoding: chunked"),
        head("POST /topics/t HTTP/1.1", f"Content-Type: {NDJSON}", "Content-Length: 2"),
    ],
)
def test_everything_else_goes_to_uvicorn(raw: bytes, app: object) -> None:
    assert ingest_request(raw, app) is None


# -- the lean path is taken ------------------------------------------------------------------


async def test_ingests_are_served_without_uvicorns_protocol(
    in_process_server: tuple[int, list[Any]],
) -> None:
    """Fails on the code before ``api.lean_ingest``: every ingest was handed over."""
    port, handed = in_process_server
    topic = new_topic()
    chunked = ingest_head(port, topic) + chunk(line(1) + line(2)) + chunk(line(3)) + END
    sized = publish_bytes(port, topic, line(4) + line(5), content_type=NDJSON)
    answers = await exchange_on("lean", port, chunked + sized + publish_bytes(port, topic), 3)
    assert [a.status for a in answers] == [201, 201, 201]
    assert handed == [], "an ingest was served by uvicorn's protocol, not the lean one"
    [history] = await exchange_on("lean", port, history_bytes(port, topic))
    assert [e["data"] for e in history.json()["events"]] == [1, 2, 3, 4, 5, {"n": 1}]


# -- the same answers, lean or by the app ----------------------------------------------


@pytest.mark.parametrize("framing", ["chunked", "sized"])
async def test_a_success_reads_the_same_and_the_connection_serves_on(
    http_broker: BrokerProcess, framing: str
) -> None:
    """Pipelined: an ingest, then a publish and a history page in the same write."""
    port, answers = http_broker.port, {}
    for route in ROUTES:
        topic = new_topic()
        body = line("a") + b"\n" + line("b")
        if framing == "chunked":
            ingest = ingest_head(port, topic) + chunk(body[:7]) + chunk(body[7:]) + END
        else:
            ingest = publish_bytes(port, topic, body, content_type=NDJSON)
        after = publish_bytes(port, topic, b"c", content_type="text/plain")
        first, publish, history = await exchange_on(
            route, port, ingest + after + history_bytes(port, topic), 3
        )
        assert (first.status, publish.status, history.status) == (201, 201, 200)
        assert [e["data"] for e in history.json()["events"]] == ["a", "b", "c"]
        answers[route] = first
    assert len(same(answers).json()["ids"]) == 2


async def test_an_empty_body_reads_the_same(http_broker: BrokerProcess) -> None:
    port, answers = http_broker.port, {}
    for route in ROUTES:
        topic = new_topic()
        sized = publish_bytes(port, topic, b"", content_type=NDJSON)
        chunked = ingest_head(port, topic) + END
        first, second = await exchange_on(route, port, sized + chunked, 2)
        assert first.comparable() == second.comparable()
        answers[route] = first
    assert same(answers).status == 201 and answers["lean"].json() == {"ids": []}


async def test_a_body_split_byte_by_byte(http_broker: BrokerProcess) -> None:
    port, topic = http_broker.port, new_topic()
    data = ingest_head(port, topic, "?close=true")
    data += chunk(line(1)) + chunk(b'{"data":') + chunk(b" 2}\n") + END
    connection = await Connection.open(port)
    try:
        for byte in data + history_bytes(port, topic):
            await connection.send(bytes([byte]))
        answer, history = await connection.answers(2)
    finally:
        await connection.close()
    assert answer.status == 201 and set(answer.json()) == {"ids", "end_id"}
    assert [e["data"] for e in history.json()["events"]] == [1, 2, {}]


async def test_a_bad_line_reads_the_same_and_the_lines_before_stay(
    http_broker: BrokerProcess,
) -> None:
    """Answered at once, the rest of the body read and dropped, then the next request."""
    port, answers = http_broker.port, {}
    for route in ROUTES:
        topic = new_topic()
        connection = await open_on(route, port)
        try:
            await connection.send(ingest_head(port, topic, "?close=true"))
            await connection.send(chunk(line(1) + line(2) + b"{bad}\n" + line(4)))
            answers[route] = await connection.answer()  # before the body's end
            await connection.send(chunk(line("dropped")) + END + history_bytes(port, topic))
            history = await connection.answer()
        finally:
            await connection.close()
        assert [e["data"] for e in history.json()["events"]] == [1, 2]
        assert not await is_closed(http_broker, topic)
    answer = same(answers)
    assert answer.status == 400 and "line 3" in answer.json()["detail"]


async def test_too_long_a_line_reads_the_same(limits_broker: BrokerProcess) -> None:
    port, answers = limits_broker.port, {}
    big = int(LIMITS["BROKER_MAX_EVENT_BYTES"]) + 4096 + 10
    for route in ROUTES:
        topic = new_topic()
        body = line(1) + b'{"data": "' + b"x" * big
        data = ingest_head(port, topic) + chunk(body) + chunk(b'"}\n') + END
        [answers[route]] = await exchange_on(route, port, data)
        assert await stored(limits_broker, topic) == [1]
    assert same(answers).status == 413


@pytest.mark.parametrize("bad", [b"zz\r\n", b"2;a\nb\r\nab\r\n", b"2 \r\nab\r\n"])
async def test_a_broken_framing_is_answered_as_uvicorn_does(
    http_broker: BrokerProcess, bad: bytes
) -> None:
    """Both routes refuse it alike (a bare LF in a chunk line is how a request is
    smuggled past a proxy that reads it as a line's end)."""
    port, answers = http_broker.port, {}
    for route in ROUTES:
        topic = new_topic()
        connection = await open_on(route, port)
        try:
            await connection.send(ingest_head(port, topic) + chunk(line(1)))
            if isinstance(connection, BehindHealthCheck):  # (else uvicorn answers only a 400)
                await connection.health_checked()
            await connection.send(bad)
            answers[route] = await connection.answer()
            assert await connection.closed_by_server()
        finally:
            await connection.close()
        if route == "lean":  # (the ASGI route may drop a line it had not read yet)
            await await_until(
                lambda t=topic: stored_is(http_broker, t, [1]), timeout=5, what="line 1"
            )
    answer = same(answers)
    assert answer.status == 400 and answer.body == b"Invalid HTTP request received."


@pytest.fixture(scope="module")
def slow_body_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    env = {"BROKER_BODY_TIMEOUT_SECONDS": "1"}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


async def test_an_idle_body_reads_the_same(slow_body_broker: BrokerProcess) -> None:
    """408 after a second without a line; the lines before stored, the topic not closed,
    the connection closed. (On the ASGI route the guard's per-read deadline may answer
    first, in other words: so the detail is compared lean only.)"""
    port, answers = slow_body_broker.port, {}
    for route in ROUTES:
        topic = new_topic()
        connection = await open_on(route, port)
        try:
            await connection.send(ingest_head(port, topic, "?close=true") + chunk(line(1)))
            answers[route] = await connection.answer(timeout=5)
            assert await connection.closed_by_server()
        finally:
            await connection.close()
        assert await stored(slow_body_broker, topic) == [1]
        assert not await is_closed(slow_body_broker, topic)
    lean, by_app = answers["lean"], answers["asgi"]
    assert lean.status == by_app.status == 408
    assert lean.json()["type"] == by_app.json()["type"] == "/problems#request-timeout"
    assert lean.json()["detail"] == "no line for 1 s: ingest stopped"
    # Said, as the connection closes after it (RFC 9110 15.5.9; a client reusing it failed):
    assert lean.headers.get("connection") == by_app.headers.get("connection") == "close"


async def test_a_client_going_away_mid_body_keeps_what_came_whole(
    http_broker: BrokerProcess,
) -> None:
    port = http_broker.port
    for route in ROUTES:
        topic = new_topic()
        connection = await open_on(route, port)
        try:
            await connection.send(ingest_head(port, topic, "?close=true"))
            await connection.send(chunk(line(1) + line(2) + b'{"data": 3'))
            await await_until(
                lambda t=topic: stored_is(http_broker, t, [1, 2]),
                timeout=5,
                what="the whole lines stored",
            )
        finally:
            connection.writer.transport.abort()
        await connection.close()
        # A publish after: the ingest has stopped, and did not close the topic.
        [after] = await exchange_on("lean", port, publish_bytes(port, topic))
        assert after.status == 201
        assert await stored(http_broker, topic) == [1, 2, {"n": 1}]


async def test_close_then_ingest_is_409_the_same(http_broker: BrokerProcess) -> None:
    port, answers, closings = http_broker.port, {}, {}
    for route in ROUTES:
        topic = new_topic()
        closing = ingest_head(port, topic, "?close=true") + chunk(line(1)) + END
        refused = ingest_head(port, topic) + chunk(line(2)) + END
        closed, answer, history = await exchange_on(
            route, port, closing + refused + history_bytes(port, topic), 3
        )
        assert closed.status == 201 and set(closed.json()) == {"ids", "end_id"}
        assert [e["data"] for e in history.json()["events"]] == [1, {}]
        end_id = closed.json()["end_id"].encode()
        body = answer.body.replace(topic.encode(), b"T").replace(end_id, b"E")
        answers[route] = Answer(answer.status, answer.headers, body)
        closings[route] = closed
    assert same(answers).status == 409
    assert same(closings).status == 201


async def test_a_resent_ingest_reads_the_same_replayed(http_broker: BrokerProcess) -> None:
    port, answers = http_broker.port, {}
    for route in ROUTES:
        topic = new_topic()
        data = ingest_head(port, topic, headers={"Idempotency-Key": "k"}) + chunk(line(1)) + END
        first, again = await exchange_on(route, port, data * 2, 2)
        assert first.status == 201 and again.json() == first.json()
        answers[route] = again
    assert same(answers).headers["idempotent-replayed"] == "true"


# -- authorization and CORS: refused before the store, answered by the app ----------------------


@pytest.fixture(scope="module")
def auth_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    env = {
        **JWT_SETTINGS,
        "BROKER_CORS_ORIGINS": ORIGIN,
    }
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


@pytest.mark.parametrize("case", ["none", "invalid", "other topic", "allowed"])
async def test_auth_and_cors_read_the_same(auth_broker: BrokerProcess, case: str) -> None:
    port, answers = auth_broker.port, {}
    for route in ROUTES:
        topic = new_topic()
        token = {
            "none": None,
            "invalid": "not-a-token",
            "other topic": hs_token(claims(publish=["else-*"], subscribe=[topic])),
            "allowed": hs_token(claims(publish=[topic])),
        }[case]
        headers = {"Origin": ORIGIN} | ({"Authorization": f"Bearer {token}"} if token else {})
        data = ingest_head(port, topic, headers=headers) + chunk(line(1)) + END
        [answer] = await exchange_on(route, port, data)
        body = answer.body.replace(topic.encode(), b"T")
        answers[route] = Answer(answer.status, answer.headers, body)
        assert len(await _stored_with(auth_broker, topic, token)) == (case == "allowed")
    answer = same(answers)
    assert answer.status == {"none": 401, "invalid": 401, "other topic": 403}.get(case, 201)
    assert answer.headers["access-control-allow-origin"] == ORIGIN


async def _stored_with(broker: BrokerProcess, topic: str, token: str | None) -> list[Any]:
    reader = hs_token(claims(subscribe=[topic]))
    async with httpx.AsyncClient(base_url=broker.url, timeout=8) as client:
        response = await client.get(
            f"/topics/{topic}/events",
            headers={"Accept": "application/json", "Authorization": f"Bearer {reader}"},
        )
    return response.json()["events"] if response.status_code == 200 else []


# -- handed over: Expect, HTTP/1.0 ------------------------------------------------------------


async def test_expect_continue_and_http_1_0_are_served_by_the_app(
    http_broker: BrokerProcess,
) -> None:
    port, topic = http_broker.port, new_topic()
    expect = ingest_head(port, topic, headers={"Expect": "100-continue"})
    connection = await Connection.open(port)
    try:
        await connection.send(expect)
        interim = await connection.reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await connection.send(chunk(line(1)) + END)
        assert (await connection.answer()).status == 201
    finally:
        await connection.close()
    old = publish_bytes(port, topic, line(2), content_type=NDJSON).replace(b"HTTP/1.1", b"HTTP/1.0")
    [answer] = await exchange_on("lean", port, old)
    assert answer.status == 201
    assert await stored(http_broker, topic) == [1, 2]


# -- the store, memory, shutdown ---------------------------------------------------------------


@pytest.fixture
def broker_on_private_redis(private_redis: RedisServer) -> Iterator[BrokerProcess]:
    env = {"BROKER_PUBLISH_TIMEOUT_SECONDS": "0.5"}
    process = BrokerProcess(redis_url=private_redis.url, env=env).start()
    yield process
    process.close()


async def test_a_store_unavailable_mid_stream_reads_the_same(
    private_redis: RedisServer, broker_on_private_redis: BrokerProcess
) -> None:
    broker, answers = broker_on_private_redis, {}
    port = broker.port
    for route in ROUTES:
        topic = new_topic()
        connection = await open_on(route, port)
        try:
            await connection.send(ingest_head(port, topic) + chunk(line(1)))
            await await_until(lambda t=topic: stored_is(broker, t, [1]), timeout=5, what="line 1")
            _pause(private_redis)
            try:
                await connection.send(chunk(line(2)))
                answers[route] = await connection.answer(timeout=8)
            finally:
                _resume(private_redis)
            # The connection closes (a producer still sending learns at once, and sends
            # again), where the rest of the body was read and dropped.
            assert await connection.closed_by_server(), route
            assert await stored(broker, topic) in ([1], [1, 2])
        finally:
            await connection.close()
    answer = same(answers)
    assert answer.status == 503 and answer.headers["retry-after"].isdigit()
    assert answer.headers["connection"] == "close"


@pytest.fixture
def patient_broker(private_redis: RedisServer) -> Iterator[BrokerProcess]:
    env = {"BROKER_PUBLISH_TIMEOUT_SECONDS": "30", "BROKER_BODY_TIMEOUT_SECONDS": "30"}
    process = BrokerProcess(redis_url=private_redis.url, env=env).start()
    yield process
    process.close()


async def test_a_long_body_is_not_buffered_while_an_append_waits(
    private_redis: RedisServer, patient_broker: BrokerProcess
) -> None:
    """With the store stalled (an append in flight), the broker stops reading the
    socket: the producer's writes stall after a few MB (the kernel's buffers), and the
    process does not grow by what is offered. Fails if ``ReceivedBody`` never pauses."""
    broker, topic = patient_broker, new_topic()
    port, pid = broker.port, broker.process.pid if broker.process else 0
    offered, piece = 64 << 20, chunk(line("x" * 1000) * 1000)  # about 1 MB a chunk
    connection = await Connection.open(port)
    try:
        await connection.send(ingest_head(port, topic) + chunk(line("first")))
        await await_until(lambda: stored_is(broker, topic, ["first"]), timeout=5, what="1")
        rss_before = rss_bytes(pid)
        _pause(private_redis)
        try:
            sent = 0
            for _ in range(offered // len(piece)):
                connection.writer.write(piece)
                try:
                    await asyncio.wait_for(connection.writer.drain(), 1.0)
                except TimeoutError:
                    break  # the broker stopped reading
                sent += len(piece)
            grown = rss_bytes(pid) - rss_before
        finally:
            _resume(private_redis)
        assert sent < offered // 2, f"the broker read {sent >> 20} MB while its store was stalled"
        assert grown < 24 << 20, f"the broker grew by {grown >> 20} MB"
        await connection.send(END)
        answer = await connection.answer(timeout=60)
        assert answer.status == 201, answer.body
    finally:
        await connection.close()


async def test_an_ingest_under_way_at_shutdown_is_answered(private_redis: RedisServer) -> None:
    """uvicorn's graceful shutdown: the ingest goes on to its body's end, is answered
    with ``connection: close``, and the connection closes; the same on both routes."""
    answers = {}
    for route in ROUTES:
        broker = BrokerProcess(
            redis_url=private_redis.url, env={"BROKER_SHUTDOWN_GRACE_SECONDS": "20"}
        ).start()
        try:
            port, topic = broker.port, new_topic()
            connection = await open_on(route, port)
            await connection.send(ingest_head(port, topic) + chunk(line(1)))
            await await_until(
                lambda t=topic, b=broker: stored_is(b, t, [1]), timeout=5, what="line 1"
            )
            await _shutting_down(broker)
            await connection.send(chunk(line(2)) + END)
            answers[route] = await connection.answer()
            assert await connection.closed_by_server()
            assert broker.process is not None
            assert await asyncio.to_thread(broker.process.wait, 15) == 0
            await connection.close()
        finally:
            broker.close()
    answer = same(answers)
    assert answer.status == 201 and answer.headers["connection"] == "close"
    assert len(answer.json()["ids"]) == 2


@pytest.mark.parametrize("while_", ["validating", "ingesting"])
async def test_an_ingest_cancelled_before_its_answer_closes_its_connection(
    in_process_server: tuple[int, list[Any]], monkeypatch: pytest.MonkeyPatch, while_: str
) -> None:
    """A cancellation out of the ingest (one escaped it while it told a keyless producer
    which lines a failover lost: the review of the nineteenth session), or out of its
    validation (a key set fetched as the instance stops), skipped every answer, and
    left the connection open and unanswered: the producer waited for good. It is
    closed now, which the producer sees as a broken connection, and resends."""
    port, _ = in_process_server

    async def cancelled(*args: Any) -> Any:
        raise asyncio.CancelledError

    monkeypatch.setattr(
        lean_ingest, "authorize" if while_ == "validating" else "run_ingest", cancelled
    )
    connection = await Connection.open(port)
    try:
        await connection.send(ingest_head(port, new_topic()) + chunk(line(1)))
        assert await connection.closed_by_server(timeout=5.0)
    finally:
        await connection.close()
