"""Hostile and broken clients: slow or endless request heads, huge heads, stalled bodies.

Every case is checked on both ways a connection is read: by ``api.connections``
itself (a connection's first request, and each one after an answer), and by
uvicorn's protocol (a request that came in the same write as one uvicorn serves).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests.http.conftest import HEARTBEAT
from tests.http.helpers import (
    PROBLEM_JSON,
    RawResponse,
    SseStream,
    new_topic,
    publish_json,
    raw_request,
    request_bytes,
)
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer

HEAD_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
# The deadline plus the guard's resolution plus scheduling slack on a busy machine.
CLOSED_WITHIN = 5.0
HOSTILE = {
    **HEARTBEAT,
    "BROKER_HEAD_TIMEOUT_SECONDS": str(HEAD_TIMEOUT),
    "BROKER_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
}
BIG_HEADER = {"X-Padding": "a" * 65536}
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
HALF_HEAD = b"GET /topics/slow/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event"


@pytest.fixture
async def opened() -> AsyncIterator[list[Connection]]:
    """The test's raw connections, closed at its end whatever happened."""
    connections: list[Connection] = []
    yield connections
    await close_all(connections)


@pytest.fixture(scope="module")
def hostile_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """A broker with 1 s head and body timeouts."""
    process = BrokerProcess(redis_url=redis_server.url, env=HOSTILE).start()
    yield process
    process.close()


async def connect(broker: BrokerProcess, opened: list[Connection], send: bytes = b"") -> Connection:
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    opened.append((reader, writer))
    if send:
        writer.write(send)
        await writer.drain()
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Whatever the server sent before closing; fail if it has not closed within ``timeout``."""
    received = b""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"still open after {timeout}s; received {received[:200]!r}")
        try:
            data = await asyncio.wait_for(reader.read(65536), remaining)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data


async def close_all(connections: list[Connection]) -> None:
    for _, writer in connections:
        writer.close()
    for _, writer in connections:
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def next_with_data(stream: SseStream) -> str:
    """The next event's data, past heartbeats (httpx-sse reports a heartbeat that follows
    an event as an event with that id and no data; EventSource dispatches nothing)."""
    for _ in range(20):
        event = await stream.next()
        if event.data:
            return event.data
    raise AssertionError("only heartbeats")


def topic_length(base_url: str, topic: str) -> int | None:
    response = httpx.get(f"{base_url}/topics/{topic}", timeout=5)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    return int(response.json()["length"])


async def read_problem(response: RawResponse, status: int) -> None:
    try:
        assert response.status == status, response.headers
        assert response.headers["content-type"].split(";")[0] == PROBLEM_JSON
        body = await response.read_sized_body()
        assert f'"status":{status}'.encode() in body.replace(b" ", b""), body
    finally:
        await response.close()


# -- request heads that never end ------------------------------------------------------


async def test_a_slowloris_is_closed_while_real_clients_are_served(
    hostile_broker: BrokerProcess, opened: list[Connection]
) -> None:
    """100 connections that send half a head and 100 that send nothing are all closed
    by the server; meanwhile a real client subscribes and publishes, and its stream,
    established, outlives the head timeout."""
    half = [await connect(hostile_broker, opened, HALF_HEAD) for _ in range(100)]
    silent = [await connect(hostile_broker, opened) for _ in range(100)]
    topic = new_topic()
    async with httpx.AsyncClient(base_url=hostile_broker.url, timeout=10) as client:
        async with SseStream(client, f"/topics/{topic}/events") as stream:
            await publish_json(client, topic, {"data": "during"})
            assert (await stream.next()).data == '"during"'
            results = await asyncio.gather(
                *(closed_by_server(reader, CLOSED_WITHIN) for reader, _ in half + silent)
            )
            assert all(received == b"" for received in results), "answered, not just closed"
            await publish_json(client, topic, {"data": "after"})
            assert await next_with_data(stream) == '"after"'


async def test_a_keep_alive_connection_that_idles_after_a_response_is_closed(
    hostile_broker: BrokerProcess, opened: list[Connection]
) -> None:
    reader, writer = await connect(hostile_broker, opened)
    writer.write(request_bytes("GET", f"{hostile_broker.url}/healthz"))
    response = RawResponse(reader, writer)
    await response.read_head()
    assert response.status == 200
    await response.read_sized_body()
    started = time.monotonic()
    await closed_by_server(reader, CLOSED_WITHIN)
    # uvicorn's own keep-alive timeout (5 s) would close it too, but later.
    assert time.monotonic() - started < HEAD_TIMEOUT + 2
    await response.close()


@pytest.mark.parametrize("reader_of_it", ["lean", "uvicorn"])
async def test_a_keep_alive_request_head_that_trickles_in_is_closed(
    hostile_broker: BrokerProcess, opened: list[Connection], reader_of_it: str
) -> None:
    """After a first request, the next head comes a byte at a time and never ends. The
    lean path reads it if it begins once the first is answered; uvicorn's protocol, if
    it came in the same write as a first request that uvicorn serves."""
    topic = new_topic()
    trickle = b"GET /healthz HTTP/1.1\r\nX-Slow: "
    if reader_of_it == "lean":
        first = request_bytes(
            "POST",
            f"{hostile_broker.url}/topics/{topic}/events",
            {"Content-Type": "text/plain", "Content-Length": "1"},
            b"x",
        )
    else:
        first = request_bytes("GET", f"{hostile_broker.url}/healthz") + trickle
    reader, writer = await connect(hostile_broker, opened, first)
    response = RawResponse(reader, writer)
    await response.read_head()
    assert response.status == (201 if reader_of_it == "lean" else 200)
    await response.read_sized_body()
    if reader_of_it == "lean":
        writer.write(trickle)
    closed = asyncio.ensure_future(closed_by_server(reader, CLOSED_WITHIN))
    for _ in range(int(CLOSED_WITHIN / 0.2) + 5):  # bounded: the server closes first
        if closed.done():
            break
        with contextlib.suppress(OSError):
            writer.write(b"a")
            await writer.drain()
        await asyncio.wait({closed}, timeout=0.2)
    assert await closed == b""
    await response.close()


# -- request heads that are too large ------------------------------------------------------


async def test_a_64_kib_header_on_a_stream_request_is_431(hostile_broker: BrokerProcess) -> None:
    url = f"{hostile_broker.url}/topics/{new_topic()}/events"
    under = await raw_request(url, headers={"X-Padding": "a" * 15_000})
    try:  # just under the limit: served
        assert under.status == 200
        assert under.headers["content-type"].startswith("text/event-stream")
    finally:
        await under.close()
    await read_problem(await raw_request(url, headers=BIG_HEADER), 431)


async def test_a_64_kib_header_on_a_publish_is_431_and_stores_nothing(
    hostile_broker: BrokerProcess,
) -> None:
    topic = new_topic()
    headers = {**BIG_HEADER, "Content-Type": "text/plain", "Content-Length": "1"}
    response = await raw_request(
        f"{hostile_broker.url}/topics/{topic}/events", "POST", headers, b"x"
    )
    await read_problem(response, 431)
    assert topic_length(hostile_broker.url, topic) is None


@pytest.mark.parametrize("reader_of_it", ["lean", "uvicorn"])
async def test_a_64_kib_header_on_a_later_keep_alive_request_is_431(
    hostile_broker: BrokerProcess, opened: list[Connection], reader_of_it: str
) -> None:
    """The second request of a connection: read by the lean path once the first is
    answered, by uvicorn's protocol if it began in the same write as a first that
    uvicorn serves (its head counted from the next read on): the same limit."""
    topic = new_topic()
    url = f"{hostile_broker.url}/topics/{topic}/events"
    small = {"Content-Type": "text/plain", "Content-Length": "1"}
    big = request_bytes("POST", url, {**BIG_HEADER, **small}, b"y")
    if reader_of_it == "lean":
        first_request, rest = request_bytes("POST", url, small, b"x"), big
    else:
        first_request = request_bytes("GET", f"{hostile_broker.url}/healthz") + big[:100]
        rest = big[100:]
    reader, writer = await connect(hostile_broker, opened, first_request)
    first = RawResponse(reader, writer)
    await first.read_head()
    assert first.status == (201 if reader_of_it == "lean" else 200)
    await first.read_sized_body()
    writer.write(rest)
    second = RawResponse(reader, writer)
    await second.read_head()
    await read_problem(second, 431)
    assert topic_length(hostile_broker.url, topic) == (1 if reader_of_it == "lean" else None)


# -- bodies that stall -------------------------------------------------------------------


def _stalled_publish(url: str, topic: str, chunked: bool) -> bytes:
    if chunked:
        framing = {"Transfer-Encoding": "chunked"}
        body = b'5\r\n{"dat'
    else:
        framing = {"Content-Length": "100"}
        body = b'{"data": "never finished'
    headers = {"Content-Type": "application/json", **framing}
    return request_bytes("POST", f"{url}/topics/{topic}/events", headers, body)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_publish_body_that_stalls_is_closed_and_stores_nothing(
    hostile_broker: BrokerProcess, opened: list[Connection], chunked: bool
) -> None:
    topic = new_topic()
    reader, writer = await connect(
        hostile_broker, opened, _stalled_publish(hostile_broker.url, topic, chunked)
    )
    received = await closed_by_server(reader, CLOSED_WITHIN)
    assert received == b"" or received.startswith(b"HTTP/1.1 408 "), received[:200]
    writer.close()
    assert topic_length(hostile_broker.url, topic) is None


async def test_a_body_that_pauses_within_the_timeout_is_accepted_one_that_stalls_is_not(
    hostile_broker: BrokerProcess, opened: list[Connection]
) -> None:
    topic = new_topic()
    body = b'{"data": "slow but whole"}'
    head = request_bytes(
        "POST",
        f"{hostile_broker.url}/topics/{topic}/events",
        {"Content-Type": "application/json", "Content-Length": str(len(body))},
    )
    reader, writer = await connect(hostile_broker, opened, head + body[:5])
    await asyncio.sleep(BODY_TIMEOUT / 4)  # a pause well within the deadline, not a race
    writer.write(body[5:])
    response = RawResponse(reader, writer)
    await response.read_head()
    assert response.status == 201
    await response.read_sized_body()
    writer.write(head + body[:5])  # the same on the same connection (uvicorn's), stalled
    received = await closed_by_server(reader, CLOSED_WITHIN)
    assert received == b"" or received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert topic_length(hostile_broker.url, topic) == 1


async def _trickle(writer: asyncio.StreamWriter, pieces: list[bytes], pause: float) -> None:
    for piece in pieces:
        await asyncio.sleep(pause)  # the pace of a slow producer, not a wait for a result
        writer.write(piece)
        await writer.drain()


async def _trickled_publish(
    broker: BrokerProcess, opened: list[Connection], topic: str, content_type: str
) -> bytes:
    """A body sent a sixth at a time, half a body timeout apart; what came back."""
    body = b'{"data": "a line"}\n' * 6
    head = request_bytes(
        "POST",
        f"{broker.url}/topics/{topic}/events",
        {"Content-Type": content_type, "Content-Length": str(len(body))},
    )
    reader, writer = await connect(broker, opened, head)
    pieces = [body[n : n + len(body) // 6] for n in range(0, len(body), len(body) // 6)]
    sender = asyncio.ensure_future(_trickle(writer, pieces, BODY_TIMEOUT / 2))
    received = await closed_by_server(reader, CLOSED_WITHIN + 3 * BODY_TIMEOUT)
    with contextlib.suppress(ConnectionError):
        await sender
    return received


async def test_a_trickling_body_is_cut_after_the_timeout_unless_a_streaming_ingest(
    hostile_broker: BrokerProcess, opened: list[Connection]
) -> None:
    """Bodies three timeouts long in all: a JSON body is cut once the body timeout has
    passed; a streaming ingest (NDJSON) may idle that long between lines, so it arrives
    whole: every line stored, and answered 201."""
    json_topic, ndjson_topic = new_topic(), new_topic()
    json_answer, ndjson_answer = await asyncio.gather(
        _trickled_publish(hostile_broker, opened, json_topic, "application/json"),
        _trickled_publish(hostile_broker, opened, ndjson_topic, "application/x-ndjson"),
    )
    assert json_answer == b"" or json_answer.startswith(b"HTTP/1.1 408 "), json_answer[:200]
    assert topic_length(hostile_broker.url, json_topic) is None
    assert ndjson_answer.startswith(b"HTTP/1.1 201 "), ndjson_answer[:200]
    assert topic_length(hostile_broker.url, ndjson_topic) == 6


async def test_a_client_that_never_reads_its_answers_is_not_served_on(
    hostile_broker: BrokerProcess,
) -> None:
    """Publishes sent ahead on one connection whose client never reads: once their
    answers wait unread past what the kernel holds (4 MB here), the broker takes no
    more of its requests (they were served on, their answers piling up in its memory,
    and what was sent ahead was copied whole at each request)."""
    topic, count = new_topic(), 40_000  # ~10 MB of answers
    writer = await _unread_connection(hostile_broker.port)
    try:
        writer.write(_publish_of(hostile_broker.port, topic) * count)
        async with httpx.AsyncClient(base_url=hostile_broker.url, timeout=10) as client:
            stored = await _stored_once_it_stops_growing(client, topic, count)
    finally:
        writer.transport.abort()
    assert 0 < stored < count, stored


def _publish_of(port: int, topic: str) -> bytes:
    body = b'{"data": 1}'
    return (
        f"POST /topics/{topic}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _unread_connection(port: int) -> asyncio.StreamWriter:
    """A connection whose client reads nothing (a 4 KB receive buffer, never read)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    _, writer = await asyncio.open_connection(sock=sock)
    return writer


async def _stored_once_it_stops_growing(
    client: httpx.AsyncClient, topic: str, everything: int
) -> int:
    """The topic's length once unchanged for a second (or once it holds everything)."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = await client.get(f"/topics/{topic}")
        length = response.json()["length"] if response.status_code == 200 else 0
        if length == everything:
            return length
        if length != last:
            last, since = length, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            return length
        await asyncio.sleep(0.1)
    raise AssertionError(f"still growing after 60 s: {last}")


async def test_a_connection_uvicorn_serves_with_too_many_requests_sent_ahead_is_closed(
    hostile_broker: BrokerProcess,
) -> None:
    """uvicorn parses and queues every request sent ahead: a client sending thousands
    on one connection grew the worker's memory by hundreds of MB. Past
    ``MAX_PIPELINED_REQUESTS`` the connection is closed."""
    health = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{hostile_broker.port}\r\n\r\n".encode()
    warned = hostile_broker.log().count("requests ahead")
    reader, writer = await asyncio.open_connection("127.0.0.1", hostile_broker.port)
    answers = b""
    try:
        writer.write(health * 2000)
        with contextlib.suppress(ConnectionError):  # (closed with requests unread: a reset)
            async with asyncio.timeout(CLOSED_WITHIN):  # (fails if it is not closed)
                while chunk := await reader.read(65536):
                    answers += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert answers.count(b"HTTP/1.1 200") < 2000  # closed, not served on
    assert b"HTTP/1.1 400" in answers  # (uvicorn's answer to a request it cannot take)
    # Said once (each request parsed after the limit was logged again: thousands of lines).
    assert hostile_broker.log().count("requests ahead") == warned + 1


async def test_publishes_sent_behind_an_unread_answer_of_uvicorns_wait_for_it(
    hostile_broker: BrokerProcess,
) -> None:
    """History pages (uvicorn's) of 6 MB in all, left unread, then publishes on the same
    connection: the transport had told uvicorn's protocol it was full, and the
    connection, given back, served them all, their answers piling up in memory.
    They wait until the client reads. (Six pages: a page holds 1 MiB of data at most.)"""
    big, behind = new_topic(), new_topic()
    port = hostile_broker.port
    async with httpx.AsyncClient(base_url=hostile_broker.url, timeout=30) as client:
        for _ in range(20):  # 100 events of 60 KB
            batch = [{"data": "x" * 60_000}] * 5
            assert (await client.post(f"/topics/{big}/events", json=batch)).status_code == 201
    history = (
        f"GET /topics/{big}/events?limit=100 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Accept: application/json\r\n\r\n"
    ).encode()
    writer = await _unread_connection(port)
    try:
        writer.write(history * 6)
        await asyncio.sleep(0.5)  # answered (written, unread): the connection idles, given back
        writer.write(_publish_of(port, behind) * 3000)
        async with httpx.AsyncClient(base_url=hostile_broker.url, timeout=10) as client:
            stored = await _stored_once_it_stops_growing(client, behind, 3000)
    finally:
        writer.transport.abort()
    assert stored < 3000, stored


AFTER_A_PUBLISH = {
    "garbage": b"XYZGARBAGE\r\n\r\n",
    "a-long-garbage": b"\x01" * 20_000,  # (past the head limit: it was a 431 instead)
    "a-broken-body": (
        b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    ),
}


@pytest.mark.parametrize("after", AFTER_A_PUBLISH)
@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_bytes_no_parser_can_read_after_a_publish_do_not_hide_its_answer(
    http_broker: BrokerProcess, route: str, after: str
) -> None:
    """A publish, then bytes that are no request, in one write: the publish is stored,
    and answered 201, then the 400 and the close. On the ASGI route (a request behind
    another on the connection) uvicorn's 400 came at once and the connection closed
    under the 201: a stored publish read as refused, and a retry without an
    Idempotency-Key stored it twice (desync audit)."""
    topic = new_topic()
    body = b'{"data":"a"}'
    publish = request_bytes(
        "POST",
        f"{http_broker.url}/topics/{topic}/events",
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
    )
    first = request_bytes("GET", f"{http_broker.url}/healthz") if route == "by-app" else b""
    reader, writer = await asyncio.open_connection("127.0.0.1", http_broker.port)
    try:
        writer.write(first + publish + AFTER_A_PUBLISH[after])
        await writer.drain()
        answers = await asyncio.wait_for(reader.read(-1), timeout=10)  # (to the close)
    finally:
        writer.close()
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answers)]
    assert statuses == ([200] if first else []) + [201, 400], answers
    async with httpx.AsyncClient(base_url=http_broker.url, timeout=10) as client:
        page = await client.get(f"/topics/{topic}/events", headers={"Accept": "application/json"})
    assert [e["data"] for e in page.json()["events"]] == ["a"]


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/healthz"), ("POST", "/topics/{topic}/events")]
)
async def test_a_body_after_an_upgrade_request_is_never_read_as_a_request(
    http_broker: BrokerProcess, method: str, path: str
) -> None:
    """``Connection: Upgrade`` with a body: the parser stops at the head, and the body,
    left on the kept-alive connection, was read as the next request (a publish
    smuggled past a proxy that took it for a body; desync audit). Answered, closed."""
    topic, hidden = new_topic(), new_topic()
    smuggled = request_bytes(
        "POST",
        f"{http_broker.url}/topics/{hidden}/events",
        {"Content-Type": "application/json", "Content-Length": "13"},
        b'{"data":"x"}\n',
    )
    head = {"Connection": "Upgrade", "Upgrade": "foo", "Content-Length": str(len(smuggled))}
    target = http_broker.url + path.format(topic=topic)
    reader, writer = await asyncio.open_connection("127.0.0.1", http_broker.port)
    try:
        writer.write(request_bytes(method, target, head | {"Content-Type": "application/json"}))
        await writer.drain()
        await asyncio.sleep(0.3)  # (the body in a later read, as the audit sent it)
        with contextlib.suppress(ConnectionError):
            writer.write(smuggled)
            await writer.drain()
        answers = await asyncio.wait_for(reader.read(-1), timeout=10)  # (to the close)
    finally:
        writer.close()
    assert len(re.findall(rb"HTTP/1\.1 \d{3} ", answers)) == 1, answers
    async with httpx.AsyncClient(base_url=http_broker.url, timeout=10) as client:
        info = await client.get(f"/topics/{hidden}")
    assert info.status_code == 404, info.text


async def test_a_bodyless_upgrade_request_keeps_its_connection(http_broker: BrokerProcess) -> None:
    """``curl --http2`` over plain HTTP asks to upgrade (h2c) with no body: nothing is
    left unread, so its connection is kept alive, as before (review)."""
    head = {
        "Connection": "Upgrade, HTTP2-Settings",
        "Upgrade": "h2c",
        "HTTP2-Settings": "AAMAAABkAAQAoAAAAAIAAAAA",
    }
    reader, writer = await asyncio.open_connection("127.0.0.1", http_broker.port)
    try:
        for _ in range(2):
            writer.write(request_bytes("GET", f"{http_broker.url}/healthz", head))
            response = RawResponse(reader, writer)
            await response.read_head()
            assert response.status == 200
            assert response.headers.get("connection") != "close", response.headers
            await response.read_sized_body()
    finally:
        writer.close()
