"""Running it: ``broker serve`` on the embedded store, on Redis URLs, flags over variables,
and the ASGI factory under plain uvicorn."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.http.helpers import metric_value, new_topic, wait_until
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer, free_port


def _publish_and_read(base_url: str) -> None:
    topic = new_topic()
    with httpx.Client(base_url=base_url, timeout=10) as client:
        answer = client.post(f"/topics/{topic}/events", json={"data": "works"})
        assert answer.status_code == 201, answer.text
        page = client.get(f"/topics/{topic}/events", headers={"Accept": "application/json"})
        assert [e["data"] for e in page.json()["events"]] == ["works"]
        assert client.get("/readyz").status_code == 200


def test_the_embedded_store_says_so_in_its_first_log_line() -> None:
    process = BrokerProcess(redis_url=None).start()
    try:
        _publish_and_read(process.url)
        first = next(line for line in process.log().splitlines() if line.strip()).lower()
        assert "embedded" in first, first
        assert "not durable" in first, first
        assert "single instance" in first, first
    finally:
        process.close()


def test_a_flag_beats_its_variable(redis_server: RedisServer) -> None:
    """BROKER_PORT and BROKER_REDIS_URL point nowhere; --port and --redis-url win."""
    process = BrokerProcess(
        redis_url=redis_server.url,
        env={"BROKER_PORT": str(free_port()), "BROKER_REDIS_URL": "redis://127.0.0.1:1/0"},
    ).start()
    try:
        _publish_and_read(process.url)  # on --port, with --redis-url's store
    finally:
        process.close()


@pytest.fixture
def unix_redis() -> Iterator[RedisServer]:
    socket_path = Path("/tmp") / f"redis-{new_topic()}.sock"  # short: sun_path is 108 bytes
    server = RedisServer(extra_args=["--unixsocket", str(socket_path), "--unixsocketperm", "700"])
    server.start()
    try:
        yield server
    finally:
        server.close()
        socket_path.unlink(missing_ok=True)


def test_a_unix_socket_redis_url(unix_redis: RedisServer) -> None:
    socket_path = unix_redis.extra_args[1]
    process = BrokerProcess(redis_url=f"unix://{socket_path}").start()
    try:
        _publish_and_read(process.url)
    finally:
        process.close()


def test_the_asgi_factory_under_plain_uvicorn(redis_server: RedisServer) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_REDIS_URL"] = redis_server.url
    uvicorn = Path(sys.executable).with_name("uvicorn")
    process = subprocess.Popen(
        [str(uvicorn), "--factory", "api.app:create_app", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[2],
    )
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, "uvicorn exited"
        try:
            return httpx.get(base_url + "/healthz", timeout=0.5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, timeout=20, message="uvicorn never became healthy")
        _publish_and_read(base_url)
        ready = httpx.get(base_url + "/readyz").json()
        assert "redis" in str(ready).lower(), ready  # the variable chose the store
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_several_workers_serve_one_deployment(redis_server: RedisServer) -> None:
    """``--workers 2``: every connection sees the same topics; /metrics sums the workers."""
    process = BrokerProcess(redis_url=redis_server.url, workers=2).start()
    topic = new_topic()
    try:
        ids = []
        for n in range(6):  # fresh connections, so both workers take some
            with httpx.Client(base_url=process.url, timeout=10) as client:
                answer = client.post(f"/topics/{topic}/events", json={"data": n})
                assert answer.status_code == 201, answer.text
                ids.append(answer.json()["id"])
        with httpx.Client(base_url=process.url, timeout=10) as client:
            page = client.get(f"/topics/{topic}/events", headers={"Accept": "application/json"})
            assert [e["id"] for e in page.json()["events"]] == ids
            metrics = client.get("/metrics")
            assert metrics.status_code == 200
            assert metric_value(metrics.text, "broker_published_events_total") == 6
    finally:
        process.close()
