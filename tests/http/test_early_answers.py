"""An answer given before a request's body ended, and the connection closed after it:
the client still sending must get the answer and then an end, never a reset.

A socket closed with bytes it has not read resets its connection (an RST, not a
FIN), and so does one that bytes reach once closed: a client still writing then sees
"connection reset", and its system may throw the answer away before it is read (a
middlebox, or a stack other than Linux's, does). So the broker closes such a
connection lingering (``api.lingering``): its answer written, it stops writing, and
reads and drops what the client still sends, for a bounded time and number of bytes.

The client here is a plain socket that writes the rest of its body once the answer
arrived, without reading it, then reads: as most HTTP clients do (they read the
answer once the body is sent). Its writes after the answer are well within the
broker's bounds (``LINGER_MAX_BYTES``).
"""

from __future__ import annotations

import asyncio
import select
import socket
from dataclasses import dataclass

import httpx
import pytest

from api.lingering import LINGER_MAX_BYTES
from tests.http.helpers import new_topic, request_bytes
from tests.http.test_ingest import chunk, line
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until

ANSWER_WAIT_S = 10
WRITES_AFTER_ANSWER = 48
"""Writes of ``FILLER`` the client makes once the answer arrived, unread."""
FILLER = chunk(b"".join(line(f"more {n}") for n in range(400)))  # (some 8 KB)
NDJSON = {"Content-Type": "application/x-ndjson", "Transfer-Encoding": "chunked"}


@dataclass
class Outcome:
    """What the client saw: the bytes it read, and how the connection ended."""

    received: bytes
    ending: str  # "end" (a FIN) or what broke it


def ingest_head(broker: BrokerProcess, topic: str, route: str) -> bytes:
    """An ingest's head, on the lean route or behind a request uvicorn's protocol reads
    (the by-app route, as tests/http/test_ingest_faults.open_ingest does)."""
    head = request_bytes("POST", f"{broker.url}/topics/{topic}/events", NDJSON)
    return head if route == "lean" else request_bytes("GET", f"{broker.url}/healthz") + head


def write_on_then_read(sock: socket.socket, last_line: bytes) -> Outcome:
    """Send the line that is answered early, then write on once the answer arrived
    (not reading it), end the body, and read to the end."""
    try:
        sock.sendall(chunk(last_line))
        readable, _, _ = select.select([sock], [], [], ANSWER_WAIT_S)
        assert readable, "no answer"
        for _ in range(WRITES_AFTER_ANSWER):
            sock.sendall(FILLER)
        sock.sendall(b"0\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
    except OSError as error:
        return Outcome(b"", f"writing: {error!r}")
    received = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except OSError as error:
            return Outcome(bytes(received), f"reading: {error!r}")
        if not data:
            return Outcome(bytes(received), "end")
        received += data


def test_the_client_writes_within_the_broker_bounds() -> None:
    assert WRITES_AFTER_ANSWER * len(FILLER) < LINGER_MAX_BYTES / 2


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_an_ingest_answered_and_closed_mid_body_ends_cleanly_for_a_client_writing_on(
    http_broker: BrokerProcess, aclient: httpx.AsyncClient, route: str
) -> None:
    """The topic deleted under an open ingest: its next line is answered 409 and the
    connection closed. The producer, writing on, gets the 409 then an end; it got a
    reset (its writes refused, or its read after the answer failing)."""
    topic = new_topic()
    sock = socket.create_connection(("127.0.0.1", http_broker.port), timeout=ANSWER_WAIT_S)
    try:
        sock.sendall(ingest_head(http_broker, topic, route) + chunk(line(1) + line(2)))
        await await_until(lambda: stored(aclient, topic, 2), timeout=5, what="2 stored")
        assert (await aclient.delete(f"/topics/{topic}")).status_code in (200, 204)
        outcome = await asyncio.to_thread(write_on_then_read, sock, line(3))
    finally:
        sock.close()
    assert outcome.ending == "end", outcome
    answer = outcome.received.split(b"HTTP/1.1 ")[-1]
    assert answer.startswith(b"409 "), outcome.received
    assert b"connection: close\r\n" in answer and b"/problems#topic-deleted" in answer


async def stored(client: httpx.AsyncClient, topic: str, count: int) -> bool:
    response = await client.get(
        f"/topics/{topic}/events", params={"limit": 10}, headers={"Accept": "application/json"}
    )
    return response.status_code == 200 and len(response.json()["events"]) == count
