"""Shared fixtures: real redis-server processes and real broker processes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as redis

from broker import Broker, BrokerLimits
from broker.redis_open import open_store
from broker.redis_store import RedisStreamStore
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server (AOF on) for the session; tests keep apart by topic names."""
    server = RedisServer(appendonly=True).start()
    yield server
    server.close()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, for tests that stop or wipe it."""
    server = RedisServer(appendonly=True).start()
    yield server
    server.close()


@pytest.fixture
async def redis_admin(private_redis: RedisServer) -> AsyncIterator[redis.Redis]:
    """A client of the test's own redis-server, for what the test changes there (its
    configuration, its users)."""
    client = redis.Redis.from_url(private_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
async def private_broker(private_redis: RedisServer) -> AsyncIterator[Broker]:
    """A broker on this test's own redis-server, with a 0.5 s heartbeat."""
    instance = Broker(open_store(private_redis.url), limits=BrokerLimits(heartbeat_seconds=0.5))
    await instance.start()
    yield instance
    await instance.close()


@pytest.fixture
def topic() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["embedded", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RedisStreamStore]:
    """The storage seam's contract runs against every store: embedded and real Redis."""
    if request.param == "embedded":
        instance = open_store(None, retention_maxlen=10_000)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        instance = open_store(server.url, retention_maxlen=10_000)
    yield instance
    await instance.close()


@pytest.fixture
def broker_on_redis(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """A real broker process (uvicorn) on the session's Redis."""
    process = BrokerProcess(redis_url=redis_server.url, env={"BROKER_HEARTBEAT_SECONDS": "1"})
    process.start()
    yield process
    process.close()


@pytest.fixture(params=["embedded", "redis"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """A store URL for tests that build their own broker: None is the embedded store."""
    if request.param == "embedded":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url
