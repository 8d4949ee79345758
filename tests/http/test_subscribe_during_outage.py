"""A subscription that arrives while Redis is down must not end an EventSource for good.

Browsers' EventSource (and the npm client) give up on any non-200 answer, but
reconnect after a 200 stream ends. So the broker answers 200 with a retry hint
and ends the stream; once Redis is back, the reconnect resumes as usual.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer


@pytest.fixture
def broker_on_private_redis(private_redis: RedisServer) -> Iterator[BrokerProcess]:
    process = BrokerProcess(redis_url=private_redis.url).start()
    yield process
    process.close()


def test_subscribing_while_redis_is_down_ends_with_a_retry_hint(
    broker_on_private_redis: BrokerProcess, private_redis: RedisServer, topic: str
) -> None:
    url = f"{broker_on_private_redis.url}/topics/{topic}/events"
    first = httpx.post(url, json={"data": 1}, timeout=10).json()["id"]
    private_redis.stop()
    answer = httpx.get(url, headers={"Last-Event-ID": first}, timeout=15)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.text.startswith("retry: ")

    private_redis.start()
    second = httpx.post(url, json={"data": 2}, timeout=10).json()["id"]
    assert first_id_of_stream(url, first) == second  # resumed: the one event it missed


def first_id_of_stream(url: str, last_event_id: str, within_s: float = 10.0) -> str:
    """The id of the first event a resumed stream sends; fails when the stream ends (a
    retry hint again: the store not back) or sends none in time."""
    deadline = time.monotonic() + within_s
    with httpx.stream("GET", url, headers={"Last-Event-ID": last_event_id}, timeout=5) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("id: "):
                return line.removeprefix("id: ")
            assert time.monotonic() < deadline, f"no event within {within_s}s"
    raise AssertionError("the resumed stream ended before its first event")


async def test_a_draining_instance_sends_new_subscribers_elsewhere() -> None:
    """During a drain a subscription gets a 200 stream that ends at once, not a 503.

    The window is short (uvicorn stops accepting at SIGTERM; only a keep-alive
    connection can still bring a request), so this drives the app in-process.
    """
    from api.app import create_app

    app = create_app()
    async with app.router.lifespan_context(app):
        app.state.streams.draining = True
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
            answer = await client.get("/topics/t/events", headers={"Accept": "text/event-stream"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.text.startswith("retry: ")
