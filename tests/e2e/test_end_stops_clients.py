"""A closed topic stops real EventSource clients: Chromium's own and the npm package.

The stream delivers ``broker.end`` and ends; the client reconnects once, with the
end's id, and is answered 204, which per the spec stops it for good. The requests
are counted in a proxy in front of the broker (a reconnect may come on a new
connection, served lean, or on a kept-alive one, served by uvicorn: the proxy
sees both), and the count must stay at two while the client would have retried
many times over (BROKER_RETRY_MS is short).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.clients import ChromiumEventSourceClient, NodeEventSourceClient, SseClient
from tests.http.helpers import new_topic
from tests.support.broker_process import BrokerProcess
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e

RETRY_MS = 100
QUIET_S = 2.0
"""After the 204, this long (20 retry intervals) with no further request."""


class CountingProxy(TcpProxy):
    """A TCP proxy on loopback that counts request heads starting with ``needle``."""

    def __init__(self, upstream_port: int, needle: bytes) -> None:
        super().__init__(upstream_port)
        self._needle = needle
        self._tails: dict[socket.socket, bytes] = {}  # (a needle cut across two pieces)
        self.count = 0
        self.start()

    def _passes(self, data: bytes, target: socket.socket, upstream: bool) -> bool:
        if upstream:
            seen = self._tails.get(target, b"") + data
            with self._lock:
                self.count += seen.count(self._needle)
            self._tails[target] = seen[-(len(self._needle) - 1) :]
        return True


@pytest.fixture
def end_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    env = {"BROKER_RETRY_MS": str(RETRY_MS), "BROKER_HEARTBEAT_SECONDS": "1"}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


def _client(kind: str, origin: str, path: str, workdir: Path) -> SseClient:
    if kind == "chromium":
        return ChromiumEventSourceClient("chromium", origin, path, workdir)
    return NodeEventSourceClient("npm-eventsource", origin + path, workdir)


def _records(client: SseClient, kind: str) -> list[dict[str, object]]:
    client.poll()
    return [r for r in client.records if r["kind"] == kind]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["chromium", "npm"])
def test_a_closed_topic_stops_the_client_with_204(
    end_broker: BrokerProcess, tmp_path: Path, kind: str
) -> None:
    topic = new_topic()
    path = f"/topics/{topic}/events"
    proxy = CountingProxy(end_broker.port, f"GET {path}".encode())
    client = _client(kind, f"http://127.0.0.1:{proxy.port}", path, tmp_path)
    try:
        client.start()
        wait_until(lambda: _records(client, "open"), timeout=20, what="the client opens")
        with httpx.Client(base_url=end_broker.url, timeout=10) as http:
            assert http.post(f"{path}", json={"data": "hello"}).status_code == 201
            wait_until(lambda: _records(client, "event"), timeout=10, what="an event arrives")
            closing = http.post(f"/topics/{topic}/close")
            assert closing.status_code == 201
        # The end ends the stream, the client comes back once (with the end's id), and
        # the 204 closes it: an error with readyState CLOSED (2).
        wait_until(
            lambda: [r for r in _records(client, "error") if r["readyState"] == 2],
            timeout=10,
            what="the client closed for good",
        )
        stopped_at = time.monotonic()
        while time.monotonic() - stopped_at < QUIET_S:  # watching: nothing may come
            assert proxy.count <= 2, f"the client came back {proxy.count - 1} times"
            time.sleep(0.1)
        assert proxy.count == 2, proxy.count
        assert [r["data"] for r in _records(client, "event")] == ['"hello"']
        # CLOSED; or None: node exited by itself, nothing left to do once its source closed.
        assert client.ready_state() in (2, None if kind == "npm" else 2)
    finally:
        client.close()
        proxy.close()
