"""Clients that stop reading: what each one may cost the broker's memory.

A live subscriber past ``BROKER_SUBSCRIBER_BUFFER_BYTES`` is dropped (see
test_subscribe); one that stops reading in the middle of a replay holds what it was
last handed for as long as it stays connected, so that must be about its buffer,
on both routes, not a page of the log whatever the buffer.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.http.helpers import new_topic
from tests.support.broker_process import BrokerProcess
from tests.support.procs import rss_bytes
from tests.support.redis_server import RedisServer

BUFFER = 64 * 1024
EVENT_DATA = 60_000
HISTORY_EVENTS = 160  # about 9.6 MB: far more than the kernel's buffers take
CLIENTS_PER_ROUTE = 40


@pytest.fixture
def small_buffer_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    env = {"BROKER_SUBSCRIBER_BUFFER_BYTES": str(BUFFER), "BROKER_MAX_CONNECTIONS": "1000"}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


def _publish_history(url: str, topic: str) -> None:
    batch = [{"data": "x" * EVENT_DATA}] * 16
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(HISTORY_EVENTS // len(batch)):
            response = client.post(f"/topics/{topic}/events", json=batch)
            assert response.status_code == 201, response.text


def _stalled_replay(port: int, topic: str, version: bytes) -> socket.socket:
    """A replay from the start that never reads (a small receive buffer, never read).
    HTTP/1.0 is served by uvicorn's route, HTTP/1.1 on the connection."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    client.connect(("127.0.0.1", port))
    path = f"/topics/{topic}/events?from=earliest".encode()
    client.sendall(b"GET " + path + b" HTTP/" + version + b"\r\nHost: 127.0.0.1\r\n\r\n")
    return client


def test_replays_that_stop_being_read_hold_about_their_buffer(
    small_buffer_broker: BrokerProcess,
) -> None:
    """80 clients stop reading mid-replay of a 9.6 MB history with a 64 KiB buffer: the
    broker grows by a few MB, where each held a 1 MiB page two or three times over
    (some 250 MB in all)."""
    broker, topic = small_buffer_broker, new_topic()
    assert broker.process is not None
    pid = broker.process.pid
    _publish_history(broker.url, topic)
    before = rss_bytes(pid)
    clients = [
        _stalled_replay(broker.port, topic, version)
        for version in (b"1.1", b"1.0")
        for _ in range(CLIENTS_PER_ROUTE)
    ]
    try:
        # The broker's memory at its highest over 3 s: by then every replay has
        # filled what the kernel takes and stalls (the old code had grown within 1 s).
        grown, deadline = 0, time.monotonic() + 3.0
        while time.monotonic() < deadline:
            grown = max(grown, rss_bytes(pid) - before)
            time.sleep(0.1)
        stats = httpx.get(f"{broker.url}/stats", params={"topic": topic}, timeout=10).json()
    finally:
        for client in clients:
            client.close()
    assert grown < 40 << 20, f"the broker grew by {grown >> 20} MB for 80 stalled replays"
    (served,) = [entry for entry in stats["topics"] if entry["topic"] == topic]
    assert served["subscribers"] == 2 * CLIENTS_PER_ROUTE  # all of them streamed, none refused
