"""Who serves a connection (``api.connections``): lean streams, everything else uvicorn.

A connection's first request, when it is a plain stream request, is served by a
``StreamConnection``; anything else, and any later request on a keep-alive
connection, by uvicorn and the ASGI app. Clients must not be able to tell.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.lean_stream import StreamConnection, stream_request
from api.settings import Settings
from broker import Subscription
from tests.http.helpers import (
    RawResponse,
    metric_value,
    new_topic,
    publish_many,
    raw_request,
    request_bytes,
)
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until
from tests.support.sse import ORIGIN_CURSOR


@pytest.fixture(scope="module")
def app() -> object:
    instance = create_app(Settings(max_topics_per_subscription=3))
    instance.state.settings = Settings(max_topics_per_subscription=3)
    return instance


def head(first_line: str, *headers: str) -> bytes:
    return "\r\n".join([first_line, "Host: 127.0.0.1", *headers, "", ""]).encode("latin-1")


@pytest.mark.parametrize(
    "raw",
    [
        head("GET /topics/t/events HTTP/1.1"),
        head("GET /topics/t/events HTTP/1.1", "Accept: text/event-stream"),
        head("GET /topics/t/events?from=earliest HTTP/1.1", "Accept: */*"),
        head("GET /topics/t/events HTTP/1.1", "Last-Event-ID: abcdefgh.1-0"),
        head("GET /topics/t%2Dx/events HTTP/1.1"),
        head("GET /events?topic=a&topic=b HTTP/1.1"),
        head("GET /topics/t/events HTTP/1.0"),  # its body unframed (see below)
    ],
)
def test_plain_stream_requests_are_served_lean(raw: bytes, app: object) -> None:
    assert stream_request(raw, app) is not None


@pytest.mark.parametrize(
    "raw",
    [
        head("POST /topics/t/events HTTP/1.1", "Content-Length: 0"),
        head("GET /topics/t/events HTTP/1.1", "Content-Length: 0"),
        head("GET /topics/t/events HTTP/1.1", "Transfer-Encoding: chunked"),
        head("GET /topics/t/events HTTP/1.1", "Connection: Upgrade", "Upgrade: websocket"),
        head("GET /topics/t/events HTTP/1.1", "Accept: application/json"),  # history
        head("GET /topics/t HTTP/1.1"),
        head("GET /healthz HTTP/1.1"),
        head("GET /topics/a%2Fb/events HTTP/1.1"),  # a bad topic: the app answers 400
        head("GET /topics/t/events HTTP/1.1", "Last-Event-ID: not an id"),
        head("GET /topics/t/events?from=yesterday HTTP/1.1"),
        head("GET /events HTTP/1.1"),
        head("GET /events?topic=a&topic=b&topic=c&topic=d HTTP/1.1"),  # over the limit
        b"GET /topics/t/events HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # not complete
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
def test_everything_else_goes_to_uvicorn(raw: bytes, app: object) -> None:
    assert stream_request(raw, app) is None


async def _stream_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> RawResponse:
    response = RawResponse(reader, writer)
    await response.read_head()
    await response.read_until(b"\n\n")  # the retry hint
    return response


async def test_a_stream_reads_the_same_served_lean_or_by_the_app(
    http_broker: BrokerProcess,
) -> None:
    """First request on a connection (lean) and one pipelined behind a request uvicorn
    serves (so uvicorn and the ASGI app serve it too): same status, headers and bytes
    (but for ``Connection: close``: only the lean path ends its connection with the
    stream)."""
    url, topic = http_broker.url, new_topic()
    path = f"{url}/topics/{topic}/events"
    lean = await raw_request(path)
    reader, writer = await asyncio.open_connection("127.0.0.1", http_broker.port)
    writer.write(request_bytes("GET", f"{url}/healthz") + request_bytes("GET", path))
    healthz = RawResponse(reader, writer)
    await healthz.read_head()
    await healthz.read_sized_body()
    by_app = await _stream_on(reader, writer)
    try:
        await lean.read_until(b"\n\n")
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            [event_id] = await publish_many(client, topic, [{"n": 1}])
        for stream in (lean, by_app):
            await stream.read_until(event_id.encode() + b"\ndata: ")
            await stream.read_until(b"\n\n", timeout=5)
        assert lean.status == by_app.status == 200
        # The lean path says its connection ends with the stream; the app's stays open.
        assert lean.headers["connection"] == "close" and "connection" not in by_app.headers
        apart = {"date", "connection"}
        assert {k: v for k, v in lean.headers.items() if k not in apart} == {
            k: v for k, v in by_app.headers.items() if k not in apart
        }
        # (each stream's origin carries the store's time when it found no log)
        timeless = [ORIGIN_CURSOR.sub(b"id: 0.T-0\n\n", bytes(s.body)) for s in (lean, by_app)]
        assert timeless[0] == timeless[1]
    finally:
        await lean.close()
        await by_app.close()


async def test_an_http_1_0_stream_is_not_chunked_and_ends_with_its_connection(
    http_broker: BrokerProcess,
) -> None:
    """An HTTP/1.0 client knows no chunked coding (RFC 9112 forbids sending it one; uvicorn
    did): its stream's bytes come as they are, and its end is the connection's."""
    url, topic = http_broker.url, new_topic()
    reader, writer = await asyncio.open_connection("127.0.0.1", http_broker.port)
    try:
        path = f"/topics/{topic}/events?from=earliest".encode()
        writer.write(b"GET " + path + b" HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            [event_id] = await publish_many(client, topic, [{"n": 1}])
            closed = await client.post(f"/topics/{topic}/close")
            assert closed.status_code in (200, 201), closed.text
        body = await asyncio.wait_for(reader.read(), 10)  # to the connection's end
    finally:
        writer.close()
    lines = head.decode("latin-1").lower().split("\r\n")
    assert lines[0].startswith("http/1.1 200") and "connection: close" in lines
    assert not any(line.startswith("transfer-encoding") for line in lines)
    assert body.startswith(b"retry: ")  # no chunk size before it
    assert b"id: " + event_id.encode() + b'\ndata: {"n":1}\n\n' in body
    assert body.endswith(b"event: broker.end\ndata: {}\n\n")  # and no last chunk


async def test_a_head_in_many_pieces_is_served(http_broker: BrokerProcess) -> None:
    topic = new_topic()
    reader, writer = await asyncio.open_connection("127.0.0.1", http_broker.port)
    for byte in request_bytes("GET", f"{http_broker.url}/topics/{topic}/events"):
        writer.write(bytes([byte]))
        await writer.drain()
    stream = await _stream_on(reader, writer)
    try:
        async with httpx.AsyncClient(base_url=http_broker.url, timeout=10) as client:
            [event_id] = await publish_many(client, topic, ["pieces"])
        await stream.read_until(event_id.encode())
    finally:
        await stream.close()


async def test_a_bad_stream_request_gets_the_apps_problem(http_broker: BrokerProcess) -> None:
    response = await raw_request(
        f"{http_broker.url}/topics/t/events", headers={"Last-Event-ID": "not an id"}
    )
    try:
        assert response.status == 400
        assert response.headers["content-type"] == "application/problem+json"
    finally:
        await response.close()


async def test_a_client_gone_while_subscribing_leaves_nothing_open(
    http_broker: BrokerProcess,
) -> None:
    """Connections that close right after their request free their subscription: the
    edge's count of streams, and the live reader's own topics and registrations."""
    async with httpx.AsyncClient(base_url=http_broker.url, timeout=10) as client:
        before = await _open_counts(client)
        for _ in range(50):
            _, writer = await asyncio.open_connection("127.0.0.1", http_broker.port)
            writer.write(request_bytes("GET", f"{http_broker.url}/topics/{new_topic()}/events"))
            writer.close()

        async def freed() -> bool:
            return await _open_counts(client) == before

        await await_until(freed, timeout=10, what="every subscription freed")


OPEN_COUNTS = ("broker_connected_subscribers", "broker_live_topics", "broker_live_registrations")


async def _open_counts(client: httpx.AsyncClient) -> list[float]:
    text = (await client.get("/metrics")).text
    values = [metric_value(text, name) for name in OPEN_COUNTS]
    assert None not in values, f"a metric of {OPEN_COUNTS} is missing"
    return values  # type: ignore[return-value]


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ],
    ids=["bare-line-feeds", "a-tls-hello"],
)
async def test_what_is_not_http_is_answered_at_once(
    http_broker: BrokerProcess, garbage: bytes
) -> None:
    """As uvicorn would: a 400, not a connection left waiting for a head that never ends."""
    response = await raw_request(http_broker.url, raw_head=garbage)
    try:
        assert response.status == 400
    finally:
        await response.close()


async def test_a_client_gone_during_a_shared_replay_leaves_the_others_streaming(
    http_broker: BrokerProcess,
) -> None:
    """Two streams replaying the same range share one read; the first client cuts its
    connection (RST) as soon as its stream starts. The other still gets the event."""
    for _ in range(10):  # the race was lost about 3 times in 4
        topic = new_topic()
        async with httpx.AsyncClient(base_url=http_broker.url, timeout=10) as client:
            [event_id] = await publish_many(client, topic, ["shared"])
        path = f"{http_broker.url}/topics/{topic}/events?from=earliest"
        leaving, staying = await asyncio.gather(raw_request(path), raw_request(path))
        sock = leaving.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await leaving.close()
        try:
            await staying.read_until(event_id.encode(), timeout=5)
        finally:
            await staying.close()


def _alive(kind: type) -> int:
    return sum(isinstance(thing, kind) for thing in gc.get_objects())


async def test_an_ended_stream_is_freed_as_it_ends(
    in_process_server: tuple[int, list[Any]],
) -> None:
    """A lean stream and its subscription referred to each other: an ended stream waited
    for the cycle collector, which the broker's GC tuning runs seldom (1,031 streams of
    a 30 s churn were held after it, with their buffers). Each is freed as it ends."""
    port, _ = in_process_server
    url = f"http://127.0.0.1:{port}"
    gc.collect()
    gc.disable()
    try:
        before = _alive(StreamConnection), _alive(Subscription)
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_bytes("GET", f"{url}/topics/{new_topic()}/events"))
            stream = RawResponse(reader, writer)
            await stream.read_head()
            await stream.read_until(b"\n\n")  # the retry hint: subscribed
            writer.close()
        await await_until(
            lambda: (_alive(StreamConnection), _alive(Subscription)) == before,
            timeout=10,
            what="every ended stream freed, the cycle collector off",
        )
    finally:
        gc.enable()
