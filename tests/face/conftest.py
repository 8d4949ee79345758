"""Fixtures of the face's tests: a real broker process, a browser, where screenshots go."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.balancers import LoadBalancer, nginx_before
from tests.support.broker_process import BrokerProcess
from tests.support.chromium import Chromium
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


@pytest.fixture
def nginx(own_broker: BrokerProcess, tmp_path: Path) -> Iterator[LoadBalancer]:
    """nginx before this test's own broker: a 502 while that broker is down."""
    yield from nginx_before(own_broker, tmp_path)


@pytest.fixture(scope="module")
def module_chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    """Headless Chromium for the module's tests, each on a page of its own (``browser``)."""
    workdir = tmp_path_factory.mktemp("chromium")
    with Chromium(workdir, window=(1400, 900), enable=("Page", "Network", "Runtime")) as chromium:
        yield chromium


@pytest.fixture
def browser(module_chromium: Chromium, tmp_path: Path) -> Chromium:
    """A page of this test's own, in a browser context of its own (cookies, storage,
    cache, connections: as a new browser's), recording its requests and console."""
    module_chromium.fresh_page(tmp_path)
    return module_chromium


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Screenshots and browser logs, kept after the run (FACE_ARTIFACTS overrides the place)."""
    place = os.environ.get("FACE_ARTIFACTS") or tempfile.mkdtemp(prefix="broker-face-artifacts-")
    path = Path(place)
    path.mkdir(parents=True, exist_ok=True)
    return path
