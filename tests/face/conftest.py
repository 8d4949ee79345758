"""Fixtures of the face's tests: a real broker process, and where screenshots are kept."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def face_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """A broker on the session's Redis with a 1 s heartbeat, shared by the module."""
    process = BrokerProcess(redis_url=redis_server.url, env={"BROKER_HEARTBEAT_SECONDS": "1"})
    process.start()
    yield process
    process.close()


@pytest.fixture
def own_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """A broker of this test's own, which it may stop and start again (same port, same
    Redis)."""
    process = BrokerProcess(redis_url=redis_server.url, env={"BROKER_HEARTBEAT_SECONDS": "1"})
    process.start()
    yield process
    process.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Screenshots and browser logs, kept after the run (FACE_ARTIFACTS overrides the place)."""
    place = os.environ.get("FACE_ARTIFACTS") or tempfile.mkdtemp(prefix="broker-face-artifacts-")
    path = Path(place)
    path.mkdir(parents=True, exist_ok=True)
    return path
