"""A request head still arriving when a drain begins: awaited briefly, then the
connection closes, and a client still writing that head must see an end, not a reset.

The head is not answered (nothing of it was read as a request: nothing stored, nothing
to resend but the request itself), but a reset may cost its client what was answered
before on the connection and not read yet (``api.lingering``), so it closes lingering,
as a request answered during a drain does (tests/http/test_early_answers.py).
"""

from __future__ import annotations

import asyncio
import select
import socket

import pytest

from tests.http.helpers import new_topic, request_bytes
from tests.http.test_early_answers import (
    ANSWER_WAIT_S,
    WRITES_AFTER_ANSWER,
    drain_begun,
    sized_publish,
    write_on_then_read,
)
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer

PUBLISH = {"Content-Type": "application/json"}


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
        assert broker.process is not None
        assert await asyncio.to_thread(broker.process.wait, ANSWER_WAIT_S) == 0, broker.log()
    finally:
        broker.close()
    assert outcome.ending == "end", outcome
    assert outcome.received == b"", outcome
