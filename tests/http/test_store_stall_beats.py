"""A stream whose subscription waits on a stalled store still gets its heartbeats.

The clients take two heartbeat intervals and a second of silence for a dead stream
(``/client.js``, the Python subscriber). A store that stalls (Redis frozen: SIGSTOP)
holds a read up to 5 s for a free connection and 5 s for its reply; a stream whose
consumer waited on such a read (a replay's page, the later origin of a topic with a
TTL) was sent nothing meanwhile, and its client dropped a stream the broker rode
the stall out with.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import httpx
import pytest

from tests.http.conftest import HEARTBEAT
from tests.http.helpers import SseStream, new_topic, subscribe
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer

BEAT = "broker.beat"
SILENCE_LIMIT_S = 2 * float(HEARTBEAT["BROKER_HEARTBEAT_SECONDS"]) + 1
"""How long the clients let a stream stay silent before they take it for dead."""
STALL_S = 6.0
"""Longer than a store read's reply timeout (5 s): the stalled read fails, or answers
late, while the stream must stay alive."""
TTL_S = 12
"""A topic's TTL: a client at the origin of a topic with no log is sent a later origin
every quarter of it (``broker.origins``), a store read, so one falls in the stall; and
longer than the stall, so that the origin it holds is not too old to trust after it."""


@pytest.fixture
def ttl_broker(private_redis: RedisServer) -> Iterator[BrokerProcess]:
    env = {**HEARTBEAT, "BROKER_TOPIC_TTL_SECONDS": str(TTL_S)}
    process = BrokerProcess(redis_url=private_redis.url, env=env).start()
    yield process
    process.close()


async def _publish_once(client: httpx.AsyncClient, topic: str, data: str) -> str:
    """Published under a key, asked again until stored (the store just came back)."""
    key = {"Idempotency-Key": f"after-stall-{data}"}

    async def published() -> str | None:
        answer = await client.post(f"/topics/{topic}/events", json={"data": data}, headers=key)
        return str(answer.json()["id"]) if answer.status_code in (200, 201) else None

    return await await_until(published, timeout=15, interval=0.2, what=f"{data} never stored")


async def _beats_through_stall(stream: SseStream, redis_server: RedisServer) -> int:
    """Redis frozen for ``STALL_S``: the beats the stream got meanwhile, each within the
    clients' silence bound of the one before (else the stream was taken for dead)."""
    assert redis_server.process is not None
    loop = asyncio.get_running_loop()
    beats = 0
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        until = loop.time() + STALL_S
        while loop.time() < until:  # (bounded: each read waits at most the bound)
            event = await stream.next(timeout=SILENCE_LIMIT_S)
            assert event.event == BEAT, event
            beats += 1
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    return beats


async def test_a_stream_reading_the_store_while_it_stalls_beats_then_delivers_once(
    private_redis: RedisServer, ttl_broker: BrokerProcess
) -> None:
    """Live at the origin of a topic with a TTL, the stream's consumer asks the store for
    a later origin during the stall: it is beaten meanwhile, then delivers what comes
    next exactly once."""
    topic = new_topic()
    async with httpx.AsyncClient(base_url=ttl_broker.url, timeout=10) as client:
        async with subscribe(client, topic, params={"heartbeat": "event"}) as stream:
            assert (await stream.next(timeout=SILENCE_LIMIT_S)).event == BEAT  # the first
            assert await _beats_through_stall(stream, private_redis) >= 1
            ids = [await _publish_once(client, topic, data) for data in ("a", "b", "c")]
            received: list[str] = []
            for _ in range(100):  # (bounded: beats come between the events)
                event = await stream.next(timeout=10)
                if event.event != BEAT:
                    received.append(event.id)
                if len(received) == len(ids):
                    break
            assert received == ids
            # Nothing more: not one of them twice.
            for _ in range(2):
                assert (await stream.next(timeout=SILENCE_LIMIT_S)).event == BEAT
