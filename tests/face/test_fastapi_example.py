"""examples/fastapi_app.py, run as its users would: under uvicorn, with real clients."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from brokerclient import Subscriber
from tests.support.polling import wait_until
from tests.support.procs import ManagedProcess, http_status, tail
from tests.support.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def example_url(redis_server: RedisServer, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env |= {"BROKER_REDIS_URL": redis_server.url, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port)]
    process = ManagedProcess("fastapi-example", args, tmp_path / "example.log", env=env, cwd=REPO)
    process.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_status(url + "/broker/healthz") == 200 or _exited(process),
                   timeout=20, what="the example to serve")  # fmt: skip
        assert process.running, tail(process.log_path)
        yield url
    finally:
        process.close()


def _exited(process: ManagedProcess) -> bool:
    return not process.running


def test_fastapi_app_mounts_the_broker_and_publishes_from_its_endpoint(example_url: str) -> None:
    order = uuid.uuid4().hex[:8]
    answer = httpx.post(f"{example_url}/orders/{order}/status", params={"status": "paid"})
    assert answer.status_code == 200, answer.text
    broker_url = example_url + "/broker"
    with Subscriber(f"orders.{order}", broker_url, from_earliest=True, give_up_after=10) as sub:
        first = next(iter(sub))
    assert (first.id, first.event, first.json()) == (answer.json()["event_id"], "status",
                                                     {"status": "paid"})  # fmt: skip
    # The mounted broker's own routes work under the path: its page and its publish.
    assert httpx.get(broker_url + "/").status_code == 200
    published = httpx.post(f"{broker_url}/topics/orders.{order}/events", json={"data": 2})
    assert published.status_code == 201
