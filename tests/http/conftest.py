"""Broker processes for the HTTP suite, shared per module where the tests allow it.

Each module-scoped broker is a real ``broker serve`` (uvicorn) on the session's
redis-server; tests keep apart by topic names.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from api import connections
from api.settings import Settings
from tests.support.broker_process import BrokerProcess
from tests.support.in_process import serving
from tests.support.redis_server import RedisServer

HEARTBEAT = {"BROKER_HEARTBEAT_SECONDS": "1"}

# Small limits, so that going over each one is cheap.
LIMITS = {
    **HEARTBEAT,
    "BROKER_MAX_EVENT_BYTES": "1024",
    "BROKER_MAX_BODY_BYTES": "8192",
    "BROKER_MAX_BATCH": "5",
    "BROKER_MAX_TOPICS_PER_SUBSCRIPTION": "3",
    "BROKER_IDEMPOTENCY_SECONDS": "2",
    "BROKER_BODY_TIMEOUT_SECONDS": "1",  # (the window must be twice as long)
}
RETENTION_MAXLEN = 5
RETENTION = {**HEARTBEAT, "BROKER_RETENTION_MAXLEN": str(RETENTION_MAXLEN)}
SLOW_BUFFER_BYTES = 131_072
SLOW = {**HEARTBEAT, "BROKER_SUBSCRIBER_BUFFER_BYTES": str(SLOW_BUFFER_BYTES)}


def _broker(redis_server: RedisServer, env: dict[str, str]) -> Iterator[BrokerProcess]:
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


@pytest.fixture(scope="module")
def http_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """A broker with default limits and a 1 s heartbeat, shared by the module."""
    yield from _broker(redis_server, HEARTBEAT)


@pytest.fixture(scope="module")
def limits_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """A broker with small size, batch, topic-count and idempotency limits."""
    yield from _broker(redis_server, LIMITS)


@pytest.fixture(scope="module")
def retention_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """A broker that keeps only the newest few events of each topic."""
    yield from _broker(redis_server, RETENTION)


@pytest.fixture
def broker_on_private_redis(private_redis: RedisServer) -> Iterator[BrokerProcess]:
    """A broker of the test's own redis-server (which the test stops, pauses or wipes),
    with a 1 s heartbeat and a 1 s publish deadline (a store fault is told soon)."""
    yield from _broker(private_redis, {**HEARTBEAT, "BROKER_PUBLISH_TIMEOUT_SECONDS": "1"})


@pytest.fixture
def client(http_broker: BrokerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=http_broker.url, timeout=10) as session:
        yield session


@pytest.fixture
async def aclient(http_broker: BrokerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=http_broker.url, timeout=10) as session:
        yield session


@pytest.fixture
def limits_client(limits_broker: BrokerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limits_broker.url, timeout=10) as session:
        yield session


@pytest.fixture
async def in_process_server(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[int, list[Any]]]:
    """``broker serve``'s uvicorn set-up in this process (embedded store); and the list of
    the connections handed to uvicorn's protocol (each with the ``targets`` it parsed)."""
    handed: list[Any] = []

    class Observed(connections.GuardedHttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            handed.append(self)
            self.targets: list[bytes] = []
            super().connection_made(transport)

        def on_url(self, url: bytes) -> None:
            self.targets.append(url)
            super().on_url(url)

    monkeypatch.setattr(connections, "GuardedHttpToolsProtocol", Observed)
    async with serving(Settings()) as port:
        yield port, handed
