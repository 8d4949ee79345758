"""Fixtures of the integration tests; those of the whole suite are in ``tests/conftest.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker import Broker, BrokerLimits
from broker.redis_store import RedisStreamStore


@pytest.fixture
async def broker(store: RedisStreamStore) -> AsyncIterator[Broker]:
    """A started broker on each store (embedded and a real redis-server), with a 0.5 s
    heartbeat."""
    instance = Broker(store, limits=BrokerLimits(heartbeat_seconds=0.5))
    await instance.start()
    yield instance
    await instance.heartbeats.close()
    await instance.hub.close()  # the store fixture closes the store
