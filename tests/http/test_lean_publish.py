"""Publishes served lean (``api.lean_publish``): the same answers as the ASGI route.

A plain publish (HTTP/1.1, a Content-Length, JSON or text) is served by the
connection's own protocol, on every request of a keep-alive connection; anything
else, every request it cannot validate before the store included, is handed to
uvicorn with all its bytes. A chunked body always goes to uvicorn, so the same
request sent chunked is the ASGI route's answer to compare with.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis as sync_redis

from api.app import create_app
from api.lean_publish import LEAN_BODY_BYTES, publish_request
from api.settings import Settings
from broker import constants as c
from tests.http.helpers import RawResponse, new_topic
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer
from tests.support.tokens import JWT_SETTINGS, claims, hs_token

BODY = b'{"data": {"n": 1}}'
EVENT_ID = re.compile(rb"[0-9a-z]+\.[0-9]+-[0-9]+")
JSON = "application/json"
ORIGIN = "http://app.test:8080"


# -- requests and answers over raw sockets ----------------------------------------------


def publish_bytes(
    port: int,
    topic: str,
    body: bytes = BODY,
    *,
    content_type: str = JSON,
    query: str = "",
    headers: dict[str, str] | None = None,
    chunked: bool = False,
) -> bytes:
    """A POST of the topic's events; ``chunked``: the same body sent chunked (uvicorn's)."""
    lines = [f"POST /topics/{topic}/events{query} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"Content-Type: {content_type}"] if content_type else []
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + payload


def history_bytes(port: int, topic: str) -> bytes:
    return (
        f"GET /topics/{topic}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Accept: application/json\r\n\r\n"
    ).encode()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    def comparable(self) -> tuple[int, dict[str, str], bytes]:
        """All but the date (and the ids, which differ by request: a 201's, an ingest's
        last stored line named in a problem)."""
        headers = {k: v for k, v in self.headers.items() if k != "date"}
        body = self.body if self.status >= 400 else b""
        body, ids = EVENT_ID.subn(b"<id>", body)
        if self.status < 400 or ids:
            headers.pop("content-length", None)
        return self.status, headers, body


class Connection:
    """One raw keep-alive connection: write bytes, read sized answers in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, timeout: float = 8.0) -> Answer:
        response = RawResponse(self.reader, self.writer)
        await response.read_head(timeout)
        await response.read_sized_body(timeout)
        return Answer(response.status, response.headers, bytes(response.body))

    async def answers(self, count: int) -> list[Answer]:
        return [await self.answer() for _ in range(count)]

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True once the server closed its side (nothing more to read)."""
        return await asyncio.wait_for(self.reader.read(1), timeout) == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def exchange(port: int, data: bytes, count: int = 1) -> list[Answer]:
    connection = await Connection.open(port)
    try:
        await connection.send(data)
        return await connection.answers(count)
    finally:
        await connection.close()


async def history_ids(broker: BrokerProcess, topic: str) -> list[str]:
    async with httpx.AsyncClient(base_url=broker.url, timeout=8) as client:
        response = await client.get(f"/topics/{topic}/events", headers={"Accept": JSON})
    assert response.status_code == 200, response.text
    return [event["id"] for event in response.json()["events"]]


# -- which publishes go lean (no server) -------------------------------------------------


@pytest.fixture(scope="module")
def app() -> object:
    instance = create_app(Settings())
    instance.state.settings = Settings(max_body_bytes=100)
    return instance


def head(first_line: str, *headers: str, body: bytes = b"") -> bytes:
    return "\r\n".join([first_line, "Host: 127.0.0.1", *headers, "", ""]).encode() + body


@pytest.mark.parametrize(
    "raw",
    [
        head(
            "POST /topics/t/events HTTP/1.1", "Content-Type: application/json", "Content-Length: 2"
        ),
        head("POST /topics/t/events HTTP/1.1", "Content-Type: text/plain", "Content-Length: 5"),
        head(
            "POST /topics/t/events?close=true HTTP/1.1",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Length: 5",
            "Idempotency-Key: k",
            "Authorization: Bearer x",
        ),
        head(
            "POST /topics/bad%20topic/events HTTP/1.1",
            "Content-Type: text/plain",
            "Content-Length: 1",
        ),
    ],
)
def test_plain_publishes_are_served_lean(raw: bytes, app: object) -> None:
    assert publish_request(raw, app) is not None


@pytest.mark.parametrize(
    "raw",
    [
        head(
            "POST /topics/t/events HTTP/1.0", "Content-Type: application/json", "Content-Length: 2"
        ),
        head("POST /topics/t/events HTTP/1.1", "Content-Type: application/json"),  # no length
        head(
            "POST /topics/t/events HTTP/1.1",
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
        ),
        head(
            "POST /topics/t/events HTTP/1.1",
            "Content-Type: application/x-ndjson",
            "Content-Length: 2",
        ),
        head(
            "POST /topics/t/events HTTP/1.1", "Content-Type: application/xml", "Content-Length: 2"
        ),
        head("POST /topics/t/events HTTP/1.1", "Content-Length: 2"),  # no content type
        head(
            "POST /topics/t/events HTTP/1.1",
            "Content-Type: application/json",
            "Content-Length: 101",  # over the body limit: 413 from the app, before the body
        ),
        head(
            "POST /topics/t/events HTTP/1.1",
            "Content-Type: application/json",
            "Content-Length: 2",
            "Expect: 100-continue",
        ),
        head("POST /topics/t HTTP/1.1", "Content-Type: application/json", "Content-Length: 2"),
        head("POST /topics/a%2Fb/events HTTP/1.1", "Content-Type: text/plain", "Content-Length: 1"),
        head("GET /topics/t/events HTTP/1.1"),
        head(
            "PUT /topics/t/events HTTP/1.1", "Content-Type: application/json", "Content-Length: 2"
        ),
    ],
)
def test_everything_else_goes_to_uvicorn(raw: bytes, app: object) -> None:
    assert publish_request(raw, app) is None


def test_a_body_over_the_lean_bound_goes_to_uvicorn() -> None:
    app = create_app(Settings())
    app.state.settings = Settings()  # (bodies up to 1 MiB)
    for size, lean in ((LEAN_BODY_BYTES, True), (LEAN_BODY_BYTES + 1, False)):
        raw = head(
            "POST /topics/t/events HTTP/1.1", "Content-Type: text/plain", f"Content-Length: {size}"
        )
        assert (publish_request(raw, app) is not None) is lean


# -- the lean path is taken (an in-process server, so that its protocol can be observed) ----


async def test_publishes_are_served_without_uvicorns_protocol(
    in_process_server: tuple[int, list[Any]],
) -> None:
    port, handed = in_process_server
    topic = new_topic()
    one = publish_bytes(port, topic)
    text = publish_bytes(port, topic, b"hello", content_type="text/plain; charset=utf-8")
    answers = await exchange(port, one + text + one, count=3)
    assert [a.status for a in answers] == [201, 201, 201]
    assert handed == [], "a plain publish was served by uvicorn's protocol, not the lean one"
    [history] = await exchange(port, history_bytes(port, topic))
    assert len(history.json()["events"]) == 3
    assert len(handed) == 1  # the history page: uvicorn's


async def test_a_connection_handed_to_uvicorn_comes_back_once_answered(
    in_process_server: tuple[int, list[Any]],
) -> None:
    """A keep-alive client that sent one request uvicorn serves (a history page, a
    topic's close) has its next publishes served lean again, not by uvicorn for good."""
    port, handed = in_process_server
    topic = new_topic()
    connection = await Connection.open(port)
    try:
        statuses = []
        for request in (
            history_bytes(port, topic),
            publish_bytes(port, topic),
            publish_bytes(port, topic),
            history_bytes(port, topic),
            history_bytes(port, topic) + publish_bytes(port, topic),  # pipelined: uvicorn's
            publish_bytes(port, topic),
        ):
            await connection.send(request)
            statuses += [a.status for a in await connection.answers(request.count(b"HTTP/1.1"))]
    finally:
        await connection.close()
    assert statuses == [200, 201, 201, 200, 200, 201, 201]
    served_by_uvicorn = [target for protocol in handed for target in protocol.targets]
    events = f"/topics/{topic}/events".encode()
    assert served_by_uvicorn == [events] * 4, "uvicorn kept serving the connection"
    [history] = await exchange(port, history_bytes(port, topic))
    assert len(history.json()["events"]) == 4


# -- through a real broker process ------------------------------------------------------------


async def test_keep_alive_publish_history_publish(http_broker: BrokerProcess) -> None:
    port, topic = http_broker.port, new_topic()
    connection = await Connection.open(port)
    try:
        await connection.send(publish_bytes(port, topic))
        first = await connection.answer()
        await connection.send(publish_bytes(port, topic, b"two", content_type="text/plain"))
        second = await connection.answer()
        await connection.send(history_bytes(port, topic))
        history = await connection.answer()
        await connection.send(publish_bytes(port, topic))
        third = await connection.answer()
    finally:
        await connection.close()
    assert (first.status, second.status, history.status, third.status) == (201, 201, 200, 201)
    ids = [first.json()["id"], second.json()["id"]]
    assert [e["id"] for e in history.json()["events"]] == ids
    assert await history_ids(http_broker, topic) == [*ids, third.json()["id"]]


async def test_each_request_on_a_connection_is_read_afresh(http_broker: BrokerProcess) -> None:
    """Each request's head is read on its own, whatever came before on its connection:
    after an upgrade request (its parser stopped there), a publish the app refused
    (handed to uvicorn, taken back) and a keyed publish, nothing of a head before is in
    the next (the keyless publish of the same body after a keyed one is stored, not
    replayed). (A head read wrong here may still be answered right: a request the lean
    path cannot read goes to uvicorn, which reads its bytes afresh.)"""
    port, topic = http_broker.port, new_topic()
    h2c = (
        f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
    ).encode()
    keyed = publish_bytes(port, topic, headers={"Idempotency-Key": "k"})
    requests = [h2c, publish_bytes(port, topic, b'{"data": '), keyed, publish_bytes(port, topic)]
    requests += [h2c, keyed]
    connection = await Connection.open(port)
    try:
        answers = []
        for request in requests:  # (one at a time: each head read when the one before is over)
            await connection.send(request)
            answers.append(await connection.answer())
    finally:
        await connection.close()
    assert [a.status for a in answers] == [200, 400, 201, 201, 200, 200]
    stored, keyless, replayed = answers[2].json(), answers[3].json(), answers[5].json()
    assert replayed == stored and keyless["id"] != stored["id"]
    assert await history_ids(http_broker, topic) == [stored["id"], keyless["id"]]


async def test_pipelined_requests_in_one_write(http_broker: BrokerProcess) -> None:
    port, topic = http_broker.port, new_topic()
    requests = [publish_bytes(port, topic, b'{"data": %d}' % n) for n in range(3)]
    requests += [
        history_bytes(port, topic),
        publish_bytes(port, topic, b"last", content_type="text/plain"),
    ]
    answers = await exchange(port, b"".join(requests), count=len(requests))
    assert [a.status for a in answers] == [201, 201, 201, 200, 201]
    ids = [a.json()["id"] for a in answers[:3]]
    assert [e["id"] for e in answers[3].json()["events"]] == ids
    assert [e["data"] for e in answers[3].json()["events"]] == [0, 1, 2]
    assert await history_ids(http_broker, topic) == [*ids, answers[4].json()["id"]]


async def test_a_publish_sent_ahead_with_a_body_over_the_read_ahead_bound(
    http_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """A publish sent behind another, its body (180 KB) part here when the first is
    answered, part still to come: what was sent ahead is over the 64 KiB bound, but
    the request now read needs the rest, so the socket is read on (it was not: the
    publish waited for its body's deadline, then 408)."""
    port, topic = http_broker.port, new_topic()
    big = b"[" + b",".join([b'{"data": "' + b"x" * 45_000 + b'"}'] * 4) + b"]"  # a batch
    second = publish_bytes(port, topic, big)
    connection = await Connection.open(port)
    admin = sync_redis.Redis.from_url(redis_server.url)
    try:
        admin.execute_command("CLIENT", "PAUSE", 500, "WRITE")  # the first publish waits
        await connection.send(publish_bytes(port, topic))
        await connection.send(second[:100_000])  # read while it waits: over the bound
        assert (await connection.answer()).status == 201  # the first, answered
        await connection.send(second[100_000:])
        assert (await connection.answer()).status == 201
    finally:
        admin.close()
        await connection.close()
    assert len(await history_ids(http_broker, topic)) == 5


async def test_a_publish_split_byte_by_byte(http_broker: BrokerProcess) -> None:
    port, topic = http_broker.port, new_topic()
    data = publish_bytes(port, topic) + publish_bytes(port, topic, b'{"data": 2}')
    connection = await Connection.open(port)
    try:
        for byte in data:
            await connection.send(bytes([byte]))
        answers = await connection.answers(2)
    finally:
        await connection.close()
    assert [a.status for a in answers] == [201, 201]
    assert await history_ids(http_broker, topic) == [a.json()["id"] for a in answers]


async def test_a_request_asking_to_close_is_answered_then_closed(
    http_broker: BrokerProcess,
) -> None:
    port, topic = http_broker.port, new_topic()
    connection = await Connection.open(port)
    try:
        await connection.send(publish_bytes(port, topic, headers={"Connection": "close"}))
        answer = await connection.answer()
        assert answer.status == 201 and answer.headers["connection"] == "close"
        assert await connection.closed_by_server()
    finally:
        await connection.close()


async def test_a_success_reads_the_same_lean_or_by_the_app(http_broker: BrokerProcess) -> None:
    port, topic = http_broker.port, new_topic()
    key = {"Idempotency-Key": "same-answer"}
    lean, lean_again = await exchange(port, publish_bytes(port, topic, headers=key) * 2, count=2)
    other = new_topic()
    by_app, by_app_again = await exchange(
        port, publish_bytes(port, other, headers=key, chunked=True) * 2, count=2
    )
    assert lean.comparable() == by_app.comparable()
    assert lean_again.comparable() == by_app_again.comparable()
    assert lean_again.status == 200 and lean_again.headers["idempotent-replayed"] == "true"
    assert lean_again.json() == lean.json()
    assert len(await history_ids(http_broker, topic)) == 1


async def test_of_two_idempotency_keys_each_route_takes_the_first(
    http_broker: BrokerProcess,
) -> None:
    """Lean or by the app (a chunked body), the same key is used: the first."""
    port = http_broker.port
    for chunked in (False, True):
        topic = new_topic()
        twice = publish_bytes(port, topic, chunked=chunked).replace(
            b"\r\n", b"\r\nIdempotency-Key: first\r\nIdempotency-Key: second\r\n", 1
        )
        stored, again = await exchange(
            port, twice + publish_bytes(port, topic, headers={"Idempotency-Key": "first"}), 2
        )
        assert (stored.status, again.status) == (201, 200), chunked
        assert again.headers["idempotent-replayed"] == "true"
        assert len(await history_ids(http_broker, topic)) == 1


@pytest.mark.parametrize(
    ("body", "content_type", "query", "headers", "status"),
    [
        (b'{"data": ', JSON, "", {}, 400),  # malformed JSON
        (b'{"nodata": 1}', JSON, "", {}, 400),
        (b'{"data": 1, "event": "broker.x"}', JSON, "", {}, 400),
        (b'{"data": 1, "retry": -1}', JSON, "", {}, 400),
        (b"\xff\xfe", "text/plain", "", {}, 400),  # not UTF-8
        (b"x", "text/plain; charset=latin-1", "", {}, 415),
        (b"<x/>", "application/xml", "", {}, 415),
        (b"x", "", "", {}, 415),
        (b"x", "text/plain", "?close=maybe", {}, 400),
        (b"x", "text/plain", "", {"Idempotency-Key": "k" * 201}, 400),
        (b'{"data": "' + b"x" * 2000 + b'"}', JSON, "", {}, 413),  # an event over 1024
        (b"[" + b",".join([b'{"data": 1}'] * 6) + b"]", JSON, "", {}, 413),  # a batch over 5
        (b'{"data": "' + b"x" * 9000 + b'"}', JSON, "", {}, 413),  # a body over 8192
    ],
)
async def test_each_error_reads_the_same_lean_or_by_the_app(
    limits_broker: BrokerProcess,
    body: bytes,
    content_type: str,
    query: str,
    headers: dict[str, str],
    status: int,
) -> None:
    """And the connection serves the next publish after it (unless the app closed it)."""
    port, topic = limits_broker.port, new_topic()
    answers = []
    for chunked in (False, True):
        bad = publish_bytes(
            port,
            topic,
            body,
            content_type=content_type,
            query=query,
            headers=headers,
            chunked=chunked,
        )
        answer, after = await exchange(port, bad + publish_bytes(port, topic), count=2)
        assert after.status == 201
        answers.append(answer)
    lean, by_app = answers
    assert lean.status == status
    assert lean.comparable() == by_app.comparable()
    assert lean.headers["content-type"] == "application/problem+json"


async def test_a_bad_topic_reads_the_same_lean_or_by_the_app(http_broker: BrokerProcess) -> None:
    port = http_broker.port
    lean, by_app = [
        (await exchange(port, publish_bytes(port, "bad%20topic", chunked=chunked)))[0]
        for chunked in (False, True)
    ]
    assert lean.status == 400 and lean.comparable() == by_app.comparable()


async def test_close_then_publish_is_409_lean_or_by_the_app(http_broker: BrokerProcess) -> None:
    """The store's own refusal is answered on the connection, which serves on."""
    port = http_broker.port
    answers = []
    for chunked in (False, True):
        topic = new_topic()
        closing = publish_bytes(port, topic, query="?close=true", chunked=chunked)
        refused = publish_bytes(port, topic, chunked=chunked)
        closed, answer, history = await exchange(
            port, closing + refused + history_bytes(port, topic), 3
        )
        assert closed.status == 201 and set(closed.json()) == {"id", "end_id"}
        assert history.status == 200  # the connection still serves
        end_id = closed.json()["end_id"].encode()
        body = answer.body.replace(topic.encode(), b"T").replace(end_id, b"E")
        answers.append(Answer(answer.status, answer.headers, body))
    lean, by_app = answers
    assert lean.status == 409
    assert lean.comparable() == by_app.comparable()


# -- authorization and CORS ------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    env = {
        **JWT_SETTINGS,
        "BROKER_CORS_ORIGINS": ORIGIN,
        "BROKER_ACCESS_LOG": "true",
    }
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


def _tokens(topic: str) -> list[tuple[dict[str, str], int]]:
    allowed = hs_token(claims(publish=[topic]))
    other = hs_token(claims(publish=["else-*"], subscribe=[topic]))
    return [
        ({}, 401),
        ({"Authorization": "Bearer not-a-token"}, 401),
        ({"Authorization": f"Bearer {other}"}, 403),
        ({"Authorization": f"Bearer {allowed}"}, 201),
    ]


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("origin", [ORIGIN, "https://not-listed.test"])
async def test_auth_and_cors_read_the_same_lean_or_by_the_app(
    auth_broker: BrokerProcess, case: int, origin: str
) -> None:
    port = auth_broker.port
    answers, topic = [], new_topic()
    for chunked in (False, True):
        headers, status = _tokens(topic)[case]
        data = publish_bytes(port, topic, headers={**headers, "Origin": origin}, chunked=chunked)
        [answer] = await exchange(port, data)
        assert answer.status == status, answer.body
        answers.append(answer)
    lean, by_app = answers
    assert lean.comparable() == by_app.comparable()
    assert lean.headers["vary"] == "Origin"
    assert (lean.headers.get("access-control-allow-origin") == ORIGIN) == (origin == ORIGIN)


async def test_a_long_publish_without_a_token_is_refused_before_its_body(
    auth_broker: BrokerProcess,
) -> None:
    """A lean publish was authorized once its body was whole: a client without a token
    sending 1 MiB slowly was held, body and all, until its deadline (300 of them held
    300 MiB). A body over LEAN_BODY_BYTES is the app's, which answers on the head."""
    port, topic = auth_broker.port, new_topic()
    size = LEAN_BODY_BYTES * 4
    data = publish_bytes(port, topic, b"x" * size, content_type="text/plain")
    connection = await Connection.open(port)
    try:
        await connection.send(data[: len(data) - size + 1000])  # the head, and 1000 bytes
        answer = await connection.answer()
    finally:
        await connection.close()
    assert answer.status == 401, answer.body


async def test_the_access_log_has_lean_publishes(auth_broker: BrokerProcess) -> None:
    port, topic = auth_broker.port, new_topic()
    token = hs_token(claims(publish=[topic]))
    query = "?close=false"
    data = publish_bytes(port, topic, query=query, headers={"Authorization": f"Bearer {token}"})
    assert [a.status for a in await exchange(port, data)] == [201]
    line = f'"POST /topics/{topic}/events{query} HTTP/1.1" 201'
    await await_until(lambda: line in auth_broker.log(), timeout=5, what="the access log line")


async def test_the_access_log_names_the_client_a_trusted_proxy_forwards(
    auth_broker: BrokerProcess,
) -> None:
    """Behind a proxy (uvicorn's proxy_headers, from 127.0.0.1): the client is the one
    X-Forwarded-For names, as uvicorn's own lines give it, not the proxy's socket."""
    port, topic = auth_broker.port, new_topic()
    token = hs_token(claims(publish=[topic]))
    headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": "203.0.113.9"}
    assert [
        a.status for a in await exchange(port, publish_bytes(port, topic, headers=headers))
    ] == [201]
    line = f'203.0.113.9:0 - "POST /topics/{topic}/events HTTP/1.1" 201'
    await await_until(lambda: line in auth_broker.log(), timeout=5, what="the access log line")


# -- deadlines, the store, shutdown ------------------------------------------------------


@pytest.fixture
def slow_client_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    env = {"BROKER_BODY_TIMEOUT_SECONDS": "1", "BROKER_HEAD_TIMEOUT_SECONDS": "1"}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


@pytest.mark.parametrize("after_a_publish", [False, True])
async def test_a_stalled_body_is_cut(
    slow_client_broker: BrokerProcess, after_a_publish: bool
) -> None:
    port, topic = slow_client_broker.port, new_topic()
    connection = await Connection.open(port)
    try:
        if after_a_publish:
            await connection.send(publish_bytes(port, topic))
            assert (await connection.answer()).status == 201
        await connection.send(publish_bytes(port, topic, b'{"data": 1}' + b" " * 50)[:-40])
        answer = await connection.answer(timeout=5)
        assert answer.status == 408
        assert answer.headers["content-type"] == "application/problem+json"
        assert await connection.closed_by_server()
    finally:
        await connection.close()


async def test_a_trickling_body_is_cut_at_its_deadline(slow_client_broker: BrokerProcess) -> None:
    """A byte every 0.4 s: each read within the 1 s body timeout, the whole not."""
    port, topic = slow_client_broker.port, new_topic()
    body = b'{"data": "' + b"x" * 40 + b'"}'
    data = publish_bytes(port, topic, body)
    connection = await Connection.open(port)
    try:
        await connection.send(data[: -len(body)])

        async def trickle() -> None:
            for byte in body[:12]:
                await asyncio.sleep(0.4)  # the pace of a slow client, not a wait for a result
                await connection.send(bytes([byte]))

        sender = asyncio.ensure_future(trickle())
        try:
            answer = await connection.answer(timeout=5)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
        assert answer.status == 408
    finally:
        await connection.close()


async def test_an_idle_keep_alive_connection_is_closed_in_time(
    slow_client_broker: BrokerProcess,
) -> None:
    port, topic = slow_client_broker.port, new_topic()
    connection = await Connection.open(port)
    try:
        await connection.send(publish_bytes(port, topic))
        assert (await connection.answer()).status == 201
        assert await connection.closed_by_server(timeout=8)
    finally:
        await connection.close()


@pytest.fixture
def broker_on_private_redis(private_redis: RedisServer) -> Iterator[BrokerProcess]:
    env = {"BROKER_PUBLISH_TIMEOUT_SECONDS": "0.5", "BROKER_SHUTDOWN_GRACE_SECONDS": "20"}
    process = BrokerProcess(redis_url=private_redis.url, env=env).start()
    yield process
    process.close()


def _pause(redis: RedisServer) -> None:
    assert redis.process is not None
    os.kill(redis.process.pid, signal.SIGSTOP)


def _resume(redis: RedisServer) -> None:
    assert redis.process is not None
    os.kill(redis.process.pid, signal.SIGCONT)


async def test_a_store_that_does_not_confirm_in_time_is_503_and_stored_once(
    private_redis: RedisServer, broker_on_private_redis: BrokerProcess
) -> None:
    """The append was sent: answered 503 on the spot, never handed over (which would
    append it a second time)."""
    broker, topic = broker_on_private_redis, new_topic()
    port = broker.port
    assert [a.status for a in await exchange(port, publish_bytes(port, new_topic()))] == [201]
    connection = await Connection.open(port)
    _pause(private_redis)
    try:
        await connection.send(publish_bytes(port, topic, b'{"data": "once"}'))
        answer = await connection.answer(timeout=8)
        assert answer.status == 503, answer.body
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.headers["retry-after"].isdigit()
        assert await connection.closed_by_server()
    finally:
        _resume(private_redis)
        await connection.close()
    [marker] = await exchange(port, publish_bytes(port, topic, b'{"data": "marker"}'))
    assert marker.status == 201
    async with httpx.AsyncClient(base_url=broker.url, timeout=8) as client:
        response = await client.get(f"/topics/{topic}/events", headers={"Accept": JSON})
    assert [e["data"] for e in response.json()["events"]] == ["once", "marker"]


async def _shutting_down(broker: BrokerProcess) -> None:
    assert broker.process is not None
    broker.process.send_signal(signal.SIGTERM)
    await await_until(
        lambda: "Shutting down" in broker.log(), timeout=10, what="the broker shutting down"
    )


async def test_a_publish_in_flight_at_shutdown_is_answered(
    private_redis: RedisServer, redis_server: RedisServer
) -> None:
    broker = BrokerProcess(redis_url=private_redis.url, env={"BROKER_SHUTDOWN_GRACE_SECONDS": "20"})
    broker.start()
    try:
        port, topic = broker.port, new_topic()
        connection = await Connection.open(port)
        await connection.send(publish_bytes(port, topic))
        assert (await connection.answer()).status == 201  # a keep-alive connection
        idle = await Connection.open(port)
        await idle.send(publish_bytes(port, topic))
        assert (await idle.answer()).status == 201
        _pause(private_redis)
        try:
            await connection.send(publish_bytes(port, topic, b'{"data": "in flight"}'))
            await _shutting_down(broker)
            assert await idle.closed_by_server(), "an idle keep-alive connection stayed open"
        finally:
            _resume(private_redis)
        answer = await connection.answer()
        assert answer.status == 201 and answer.headers["connection"] == "close"
        assert await connection.closed_by_server()
        assert broker.process is not None
        assert await asyncio.to_thread(broker.process.wait, 15) == 0
        await idle.close()
        await connection.close()
    finally:
        broker.close()


def _bytes_unread_by_server(server_port: int, client_port: int) -> int | None:
    """The receive queue of the broker's side of one loopback connection (/proc/net/tcp),
    None while the kernel does not show it."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = (int(fields[n].split(":")[1], 16) for n in (1, 2, 4))
        if (local, remote) == (server_port, client_port):
            return queues
    return None


async def test_a_stream_being_opened_at_shutdown_is_told_to_come_back(
    private_redis: RedisServer,
) -> None:
    """A stream request whose subscription waits for Redis when the instance shuts down
    is answered with a 200 that says "retry" (the EventSource comes back through the
    load balancer), not closed unanswered: a load balancer answers that 502 and the
    browser's EventSource gives up for good (seen in the HAProxy failover test)."""
    broker = BrokerProcess(redis_url=private_redis.url, env={"BROKER_SHUTDOWN_GRACE_SECONDS": "20"})
    broker.start()
    connection = None
    try:
        port = broker.port
        connection = await Connection.open(port)
        client_port = connection.writer.get_extra_info("sockname")[1]
        _pause(private_redis)
        try:
            head = f"GET /topics/{new_topic()}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            await connection.send((head + "Accept: text/event-stream\r\n\r\n").encode())
            await await_until(  # read by the broker: its subscription now waits for Redis
                lambda: _bytes_unread_by_server(port, client_port) == 0,
                timeout=5,
                what="the head read by the broker",
            )
            await _shutting_down(broker)
            answer = await connection.answer(timeout=10)
        finally:
            _resume(private_redis)
        assert answer.status == 200, answer
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert b"retry:" in answer.body
        assert await connection.closed_by_server()
        assert broker.process is not None
        assert await asyncio.to_thread(broker.process.wait, 15) == 0
    finally:
        if connection is not None:
            await connection.close()
        broker.close()


async def test_what_is_pipelined_behind_a_stalled_publish_is_read_only_up_to_a_bound(
    private_redis: RedisServer,
) -> None:
    """While a publish waits for the store the connection is still read (no pause and
    resume per publish), but only up to ``PIPELINED_BYTES``: the rest stays in the
    socket, so a client cannot fill the broker's memory; then every request is served
    in order, each stored once."""
    env = {"BROKER_PUBLISH_TIMEOUT_SECONDS": "20"}
    broker = BrokerProcess(redis_url=private_redis.url, env=env)
    broker.start()
    connection = None
    try:
        port, topic = broker.port, new_topic()
        connection = await Connection.open(port)
        client_port = connection.writer.get_extra_info("sockname")[1]
        bodies = [b'{"data": "%d %s"}' % (n, b"x" * 4000) for n in range(80)]  # 320 KB
        requests = [publish_bytes(port, topic, body) for body in bodies]
        _pause(private_redis)
        try:
            connection.writer.write(b"".join(requests))  # not drained: the broker stops reading
            unread = await await_until(
                lambda: (_bytes_unread_by_server(port, client_port) or 0) > 100_000,
                timeout=5,
                what="the broker to stop reading past its bound",
            )
            assert unread
        finally:
            _resume(private_redis)
        answers = await connection.answers(len(requests))
        assert [a.status for a in answers] == [201] * len(requests)
        assert await history_ids(broker, topic) == [a.json()["id"] for a in answers]
    finally:
        if connection is not None:
            await connection.close()
        broker.close()


async def test_requests_still_arriving_at_shutdown_are_answered_not_dropped(
    redis_server: RedisServer,
) -> None:
    """Connections the broker had accepted, whose heads it had begun to read, when it
    was told to shut down (a load balancer's requests in flight): each is awaited and
    answered, a stream with the 200 that says "come back" (closed unanswered, the
    balancer answers 502 and a browser's EventSource gives up for good), a publish
    stored and answered; then each connection closes."""
    broker = BrokerProcess(redis_url=redis_server.url, env={"BROKER_SHUTDOWN_GRACE_SECONDS": "20"})
    broker.start()
    stream = publisher = None
    try:
        port, topic = broker.port, new_topic()
        stream, publisher = await Connection.open(port), await Connection.open(port)
        stream_head = (
            f"GET /topics/{topic}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()
        publish = publish_bytes(port, topic, b'{"data": "in flight"}')
        for connection, request in ((stream, stream_head), (publisher, publish)):
            await connection.send(request[:20])  # the first bytes, read by the broker
            client_port = connection.writer.get_extra_info("sockname")[1]
            await await_until(
                lambda: _bytes_unread_by_server(port, client_port) == 0,  # noqa: B023
                timeout=5,
                what="the first bytes read by the broker",
            )
        await _shutting_down(broker)
        await stream.send(stream_head[20:])
        await publisher.send(publish[20:])
        come_back, stored = await stream.answer(timeout=10), await publisher.answer(timeout=10)
        assert come_back.status == 200, come_back
        assert come_back.headers["content-type"].startswith("text/event-stream")
        assert b"retry:" in come_back.body
        assert stored.status == 201, stored
        assert await stream.closed_by_server() and await publisher.closed_by_server()
        assert broker.process is not None
        assert await asyncio.to_thread(broker.process.wait, 15) == 0
        assert await asyncio.to_thread(_log_length, redis_server, topic) == 1  # stored once
    finally:
        for connection in (stream, publisher):
            if connection is not None:
                await connection.close()
        broker.close()


def _log_length(redis_server: RedisServer, topic: str) -> int:
    client = sync_redis.Redis.from_url(redis_server.url)
    try:
        return int(client.xlen(c.log_key(topic)))
    finally:
        client.close()
