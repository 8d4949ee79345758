"""Requests answered while a drain begins (SIGTERM): each is answered, and its
connection closes lingering (``api.lingering``), so that a client still writing (a
request sent ahead, pipelined; a head still arriving) reads what was answered, then an
end, not a reset: a reset may cost it what was answered and not read yet (a system or a
middlebox that drops unread data), and a retry then stores an event twice.

A request head still arriving when a drain begins is not answered (nothing of it was
read as a request: nothing stored, nothing to resend but the request itself), but it
closes lingering all the same. Early answers outside a drain: test_early_answers.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import select
import socket
import time
from collections.abc import Callable
from importlib import resources

import httpx
import pytest
import redis.asyncio as redis
from redis import Redis as SyncRedis

from broker import constants as c
from tests.http.helpers import new_topic, request_bytes
from tests.http.test_early_answers import (
    ANSWER_WAIT_S,
    PUBLISH,
    WRITES_AFTER_ANSWER,
    drain_begun,
    exits_cleanly,
    ingest_head,
    read_to_end,
    sized_publish,
    stored,
    write_on_then_read,
)
from tests.http.test_ingest import chunk, line
from tests.http.test_ingest_faults import an_append_waits_in_redis
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer
from tests.support.slow_redis_proxy import SlowRedisProxy


def read_answer(sock: socket.socket) -> bytes:
    """One answer with a Content-Length body, read whole (bounded by the socket's timeout)."""
    received = b""
    while b"\r\n\r\n" not in received:
        data = sock.recv(65536)
        assert data, received
        received += data
    head, _, body = received.partition(b"\r\n\r\n")
    [size] = [
        line.split(b":")[1] for line in head.lower().split(b"\r\n") if b"content-length:" in line
    ]
    while len(body) < int(size):
        data = sock.recv(65536)
        assert data, received
        body += data
    return head


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_a_head_begun_when_a_drain_begins_ends_cleanly_for_its_client_writing_on(
    redis_server: RedisServer, route: str
) -> None:
    """A kept-alive connection: its first request answered (a lean publish, or a health
    check the app answers), its next head begun when a drain begins. The head does not
    end within the drain's wait (a second); the client writes on, then reads: it reads
    an end, nothing answered. On the lean route it got a reset: closed at once once the
    wait passed, the client's next bytes reset the connection (and a client that had not
    read its first answer yet could lose it)."""
    broker = BrokerProcess(redis_url=redis_server.url).start()
    try:
        url = f"{broker.url}/topics/{new_topic()}/events"
        first = (
            sized_publish(url, b'{"data": 1}')
            if route == "lean"
            else request_bytes("GET", f"{broker.url}/healthz")
        )
        next_head = request_bytes("POST", url, {**PUBLISH, "Content-Length": "100000"})
        begun, rest = next_head[:-10], next_head[-10:]
        sock = socket.create_connection(("127.0.0.1", broker.port), timeout=ANSWER_WAIT_S)
        try:
            sock.sendall(first + begun)  # (the head begun before its answer: read with it)
            answer = await asyncio.to_thread(read_answer, sock)
            assert answer.startswith(b"HTTP/1.1 20"), answer
            await asyncio.to_thread(drain_begun, broker)
            # The broker ends its side once the wait passed (or at once: uvicorn's own).
            readable, _, _ = await asyncio.to_thread(select.select, [sock], [], [], ANSWER_WAIT_S)
            assert readable, "the connection did not end"
            outcome = await asyncio.to_thread(write_on_then_read, sock, rest, WRITES_AFTER_ANSWER)
        finally:
            sock.close()
        await exits_cleanly(broker)
    finally:
        broker.close()
    assert outcome.ending == "end", outcome
    assert outcome.received == b"", outcome


async def test_a_drain_answers_a_publish_sent_ahead_of_others_and_closes_lingering(
    redis_server: RedisServer,
) -> None:
    """A drain begins while a publish's body is coming; its client has sent a second,
    larger publish ahead (pipelined) and is still sending it. The first is answered
    201 with ``Connection: close``, and the connection closes lingering: the client
    writing on reads the 201 then an end. It was closed at once, with the second's
    bytes unread: the client got a reset (its writes refused), and a system or a
    middlebox that drops what was not read yet lost the 201 (a retry stored it twice)."""
    broker = BrokerProcess(redis_url=redis_server.url).start()
    try:
        first = b'{"data": "first"}'
        second = b'{"data": "' + b"x" * 200_000 + b'"}'
        url = f"{broker.url}/topics/{new_topic()}/events"
        sock = socket.create_connection(("127.0.0.1", broker.port), timeout=ANSWER_WAIT_S)
        try:
            sock.sendall(sized_publish(url, first)[:-5])
            await asyncio.to_thread(drain_begun, broker)
            sent_ahead = first[-5:] + sized_publish(url, second)
            outcome = await asyncio.to_thread(write_on_then_read, sock, sent_ahead, 8)
        finally:
            sock.close()
        await exits_cleanly(broker)
    finally:
        broker.close()
    assert outcome.ending == "end", outcome
    assert outcome.received.startswith(b"HTTP/1.1 201 "), outcome.received
    assert b"connection: close\r\n" in outcome.received, outcome.received


async def test_a_drain_answers_an_ingest_sent_ahead_of_others_and_closes_lingering(
    private_redis: RedisServer, redis_admin: redis.Redis
) -> None:
    """An ingest's body has ended, its last lines' append in flight (Redis's writes
    paused), and its client has sent a publish ahead (pipelined) when a drain begins.
    The ingest is answered 201 with ``Connection: close``, and the connection closes
    lingering: the client still sending reads the 201 then an end. It was closed at
    once, the publish's bytes unread: the client got a reset (its writes refused), and
    a system or a middlebox that drops what was not read yet lost the 201."""
    broker = BrokerProcess(redis_url=private_redis.url).start()
    try:
        topic = new_topic()
        url = f"{broker.url}/topics/{topic}/events"
        sock = socket.create_connection(("127.0.0.1", broker.port), timeout=ANSWER_WAIT_S)
        try:
            async with httpx.AsyncClient(base_url=broker.url, timeout=ANSWER_WAIT_S) as client:
                sock.sendall(ingest_head(broker, topic, "lean") + chunk(line(1)))
                await await_until(lambda: stored(client, topic, 1), timeout=5, what="1 stored")
            await redis_admin.execute_command("CLIENT", "PAUSE", 10000, "WRITE")
            try:
                ahead = {**PUBLISH, "Content-Length": "100000"}
                sock.sendall(chunk(line(2)) + b"0\r\n\r\n" + request_bytes("POST", url, ahead))
                await await_until(
                    lambda: an_append_waits_in_redis(redis_admin), timeout=5, what="append held"
                )
                await asyncio.to_thread(drain_begun, broker)
            finally:
                await redis_admin.execute_command("CLIENT", "UNPAUSE")
            outcome = await asyncio.to_thread(write_on_then_read, sock, b"", 8)
        finally:
            sock.close()
        await exits_cleanly(broker)
    finally:
        broker.close()
    assert outcome.ending == "end", outcome
    answer = outcome.received.split(b"HTTP/1.1 ")[-1]
    assert answer.startswith(b"201 "), outcome.received
    assert b"connection: close\r\n" in answer, outcome.received


async def test_bytes_that_are_no_request_after_a_drain_began_end_cleanly(
    redis_server: RedisServer,
) -> None:
    """A connection accepted, its request not sent yet, when a drain begins: its head is
    awaited (a second). Bytes that are no request come, and the client goes on sending;
    uvicorn's protocol, handed them, answers 400 and closes lingering: the client reads
    the 400 then an end. It got a reset: the drain's shutdown of that protocol closed
    the connection at once under the lingering close."""
    broker = BrokerProcess(redis_url=redis_server.url).start()
    try:
        sock = socket.create_connection(("127.0.0.1", broker.port), timeout=ANSWER_WAIT_S)
        try:
            # (accepted in turn: once a later connection was answered, this one was taken)
            async with httpx.AsyncClient(base_url=broker.url, timeout=ANSWER_WAIT_S) as client:
                assert (await client.get("/healthz")).status_code == 200
            await asyncio.to_thread(drain_begun, broker)
            no_request = b"\x01 no request\r\n"
            outcome = await asyncio.to_thread(
                write_on_then_read, sock, no_request, WRITES_AFTER_ANSWER
            )
        finally:
            sock.close()
        await exits_cleanly(broker)
    finally:
        broker.close()
    assert outcome.ending == "end", outcome
    assert outcome.received.startswith(b"HTTP/1.1 400 "), outcome.received


async def test_a_drain_answers_a_read_sent_ahead_of_others_and_closes_lingering(
    private_redis: RedisServer,
) -> None:
    """A request with no body on the app's route (a page of a topic's history) waits on
    the store when a drain begins; its client has begun the next request (pipelined)
    and is still sending it. The read is answered with ``Connection: close``, and the
    connection closes lingering: the client writing on reads the answer then an end.
    It was closed at once (only a request declaring a body closed lingering): the
    client got a reset."""
    range_sha = hashlib.sha1(
        resources.files("broker").joinpath("lua", "range.lua").read_text().encode()
    ).hexdigest()
    with SlowRedisProxy(private_redis.port) as proxy:
        broker = BrokerProcess(redis_url=proxy.url).start()
        try:
            topic = new_topic()
            url = f"{broker.url}/topics/{topic}/events"
            async with httpx.AsyncClient(base_url=broker.url, timeout=ANSWER_WAIT_S) as client:
                published = await client.post(url, json={"data": "first"})
                assert published.status_code == 201, published.text
            sock = socket.create_connection(("127.0.0.1", broker.port), timeout=ANSWER_WAIT_S)
            try:
                proxy.slow_down(range_sha.encode(), ANSWER_WAIT_S)
                try:
                    read = request_bytes("GET", url, {"Accept": "application/json"})
                    sock.sendall(read + request_bytes("POST", url, PUBLISH)[:-2])
                    await await_until(lambda: proxy.held > 0, timeout=5, what="a read held")
                    await asyncio.to_thread(drain_begun, broker)
                finally:
                    proxy.let_through()
                outcome = await asyncio.to_thread(write_on_then_read, sock, b"", 8)
            finally:
                sock.close()
            await exits_cleanly(broker)
        finally:
            broker.close()
    assert outcome.ending == "end", outcome
    assert outcome.received.startswith(b"HTTP/1.1 200 "), outcome.received
    assert b"connection: close\r\n" in outcome.received, outcome.received


PIPELINED_MAX = 50_000
"""Publishes the client sends ahead at most before the broker holds the next back."""
BATCH = 200
"""Publishes sent at once (some 30 KB): what waits unread once the broker holds back
stays well within what a lingering close reads and drops (``LINGER_MAX_BYTES``)."""
STUCK_S = 2.0
"""How long nothing more is stored, publishes sent ahead, before the broker is taken to
hold the next request back."""


def pipeline_until_held_back(sock: socket.socket, request: bytes, stored: Callable[[], int]) -> int:
    """Send ``request`` in batches without reading an answer, each batch once the one
    before was stored (``stored``: how many are), until the broker stores no more (the
    answers fill the client's and the broker's buffers, and it holds the next request
    back, unread): bounded in count and time. The requests sent."""
    sent = 0
    while sent < PIPELINED_MAX:
        sock.sendall(request * BATCH)
        sent += BATCH
        count, since = stored(), time.monotonic()
        while count < sent:
            time.sleep(0.02)  # (polling; STUCK_S bounds it)
            now = stored()
            if now == count and time.monotonic() - since > STUCK_S:
                return sent
            if now != count:
                count, since = now, time.monotonic()
    raise AssertionError(f"the broker read on: {sent} requests sent ahead, all stored")


async def test_a_drain_ends_a_connection_whose_client_reads_no_answers_cleanly(
    redis_server: RedisServer,
) -> None:
    """A client pipelines publishes without reading their answers: once those fill the
    buffers, the broker holds its next request back and no longer reads the socket, the
    requests sent ahead unread there. A drain then closed the idle kept-alive connection
    plainly: with bytes unread, the kernel reset it, throwing away the answers it had not
    sent yet, and the client read some of the 201s, then a reset (a retry of the rest
    stores them twice). It closes lingering: the client reads every answer written (one
    per event stored), then an end."""
    broker = BrokerProcess(redis_url=redis_server.url).start()
    admin = SyncRedis.from_url(redis_server.url)
    try:
        topic = new_topic()
        publish = sized_publish(f"{broker.url}/topics/{topic}/events", b'{"data": 1}')

        def stored() -> int:
            return int(admin.xlen(c.log_key(topic)))

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # (small buffers on the client's side: filled sooner)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            sock.settimeout(ANSWER_WAIT_S)
            sock.connect(("127.0.0.1", broker.port))
            sent = await asyncio.to_thread(pipeline_until_held_back, sock, publish, stored)
            await asyncio.to_thread(drain_begun, broker)
            outcome = await asyncio.to_thread(read_to_end, sock)
        finally:
            sock.close()
        await exits_cleanly(broker)
        written = stored()
    finally:
        admin.close()
        broker.close()
    answers = outcome.received.count(b"HTTP/1.1 ")
    assert outcome.ending == "end", (outcome.ending, answers, written, sent)
    assert answers == outcome.received.count(b"HTTP/1.1 201 ") == written, (answers, written)
    assert 0 < written < sent  # (some held back, unread)
