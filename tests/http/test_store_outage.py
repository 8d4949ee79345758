"""The store going away: readiness, 503 with Retry-After, and recovery without loss."""

from __future__ import annotations

import asyncio
import signal

import httpx

from tests.http.helpers import (
    SseStream,
    assert_problem,
    new_topic,
    publish_many,
    subscribe,
)
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer

CLIENT_TIMEOUT = 8.0
BURST = 30


async def _receive_after(
    client: httpx.AsyncClient, stream: SseStream, topic: str, cursor: str, expected: list[str]
) -> list[str]:
    """The expected ids through the open stream, or after it ended, through a reconnect."""
    received: list[str] = []
    while len(received) < len(expected) and not (stream.ended.is_set() and stream.queue.empty()):
        try:
            event = await stream.next(timeout=10)
        except AssertionError:
            break
        received.append(event.id)
        cursor = event.id
    if len(received) < len(expected):
        async with subscribe(client, topic, last_event_id=cursor) as again:
            received += [e.id for e in await again.take(len(expected) - len(received), 10)]
    return received


async def test_redis_down_then_back_with_its_data(
    private_redis: RedisServer, broker_on_private_redis: BrokerProcess
) -> None:
    topic = new_topic()
    async with httpx.AsyncClient(
        base_url=broker_on_private_redis.url, timeout=CLIENT_TIMEOUT
    ) as client:
        assert (await client.get("/readyz/store")).status_code == 200
        async with subscribe(client, topic) as stream:
            before = await publish_many(client, topic, ["before"])
            assert (await stream.next()).id == before[0]

            private_redis.stop()

            async def store_down() -> bool:
                return (await client.get("/readyz/store")).status_code == 503

            await await_until(store_down, timeout=CLIENT_TIMEOUT, what="readyz/store stayed 200")
            assert (await client.get("/healthz")).status_code == 200
            # Still ready: it holds new streams until Redis is back. A load balancer
            # that pulled it would answer 503 itself, and end EventSources for good.
            assert (await client.get("/readyz")).status_code == 200
            key = {"Idempotency-Key": "while-down"}
            refused = await client.post(f"/topics/{topic}/events", json={"data": "x"}, headers=key)
            assert_problem(refused, 503)
            assert refused.headers.get("retry-after", "").isdigit(), refused.headers

            private_redis.start()  # the same directory: its AOF brings the data back

            async def store_up() -> bool:
                return (await client.get("/readyz/store")).status_code == 200

            async def published() -> httpx.Response | None:
                answer = await client.post(
                    f"/topics/{topic}/events", json={"data": "x"}, headers=key
                )
                return answer if answer.status_code in (200, 201) else None

            answer = await await_until(
                published, timeout=15, interval=0.2, what="publishing never worked again"
            )
            after = [answer.json()["id"]]
            await await_until(store_up, timeout=5, what="readyz/store never came back")
            key = {"Idempotency-Key": "after-2"}
            answer = await await_until(published, timeout=5, what="the second publish failed")
            after.append(answer.json()["id"])
            received = await _receive_after(client, stream, topic, before[0], after)
        assert received == after
        history = await client.get(
            f"/topics/{topic}/events", headers={"Accept": "application/json"}
        )
        assert [e["id"] for e in history.json()["events"]] == before + after


async def test_a_write_not_confirmed_in_time_is_503_and_safe_to_retry(
    private_redis: RedisServer, broker_on_private_redis: BrokerProcess
) -> None:
    """Redis frozen (SIGSTOP): the publish times out; the same key then stores it once."""
    topic = new_topic()
    assert private_redis.process is not None
    async with httpx.AsyncClient(
        base_url=broker_on_private_redis.url, timeout=CLIENT_TIMEOUT
    ) as client:
        await publish_many(client, topic, ["seed"])
        key = {"Idempotency-Key": "frozen-store"}
        private_redis.process.send_signal(signal.SIGSTOP)
        try:
            refused = await client.post(
                f"/topics/{topic}/events", json={"data": "once"}, headers=key
            )
        finally:
            private_redis.process.send_signal(signal.SIGCONT)
        assert_problem(refused, 503)
        assert refused.headers.get("retry-after", "").isdigit(), refused.headers

        async def retried() -> httpx.Response | None:
            answer = await client.post(
                f"/topics/{topic}/events", json={"data": "once"}, headers=key
            )
            return answer if answer.status_code in (200, 201) else None

        await await_until(retried, timeout=15, interval=0.2, what="the retry never succeeded")
        history = await client.get(
            f"/topics/{topic}/events", headers={"Accept": "application/json"}
        )
        assert [e["data"] for e in history.json()["events"]] == ["seed", "once"]


async def test_once_redis_is_back_every_publish_succeeds(
    private_redis: RedisServer, broker_on_private_redis: BrokerProcess
) -> None:
    """Connections opened before the outage must not fail publishes after it."""
    topic = new_topic()
    async with httpx.AsyncClient(
        base_url=broker_on_private_redis.url, timeout=CLIENT_TIMEOUT
    ) as client:

        async def burst(label: str) -> list[httpx.Response]:
            return list(
                await asyncio.gather(
                    *(
                        client.post(f"/topics/{topic}/events", json={"data": f"{label}-{n}"})
                        for n in range(BURST)
                    )
                )
            )

        for outage in range(3):  # a stale connection is hit often, not always: try thrice
            assert [r.status_code for r in await burst(f"before-{outage}")] == [201] * BURST
            private_redis.restart(keep_data=True)

            async def recovered() -> bool:
                answer = await client.post(f"/topics/{topic}/events", json={"data": "probe"})
                ready = await client.get("/readyz/store")
                return answer.status_code == 201 and ready.status_code == 200

            await await_until(recovered, timeout=15, interval=0.2, what="never recovered")
            answers = await burst(f"after-{outage}")
            assert [r.status_code for r in answers] == [201] * BURST, (
                f"outage {outage}: " + "; ".join(r.text for r in answers if r.status_code != 201)
            )


async def test_readyz_store_says_503_within_a_probes_second_when_redis_froze(
    private_redis: RedisServer, broker_on_private_redis: BrokerProcess
) -> None:
    """A probe's own timeout is often one second (Kubernetes'): a Redis gone silent was
    called down only after the reply timeout, 5 s, and the probe saw a timeout."""
    assert private_redis.process is not None
    async with httpx.AsyncClient(base_url=broker_on_private_redis.url, timeout=3) as client:
        assert (await client.get("/readyz/store")).status_code == 200
        private_redis.process.send_signal(signal.SIGSTOP)
        try:
            frozen = await client.get("/readyz/store")
        finally:
            private_redis.process.send_signal(signal.SIGCONT)
        assert frozen.status_code == 503, frozen.text
        await await_until(lambda: _ready(client), timeout=10, interval=0.1, what="not ready again")


async def _ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/readyz/store")).status_code == 200


async def test_a_publish_waits_as_long_as_its_timeout_allows_past_five_seconds(
    private_redis: RedisServer,
) -> None:
    """BROKER_PUBLISH_TIMEOUT_SECONDS above 5 had no effect: the appends' connection
    was taken for dead after the 5 s reply timeout, and the publish answered 503 while
    Redis, merely slow, stored it (latency audit)."""
    broker = BrokerProcess(
        redis_url=private_redis.url, env={"BROKER_PUBLISH_TIMEOUT_SECONDS": "12"}
    ).start()
    assert private_redis.process is not None
    try:
        async with httpx.AsyncClient(base_url=broker.url, timeout=20) as client:
            topic = new_topic()
            await publish_many(client, topic, ["seed"])
            private_redis.process.send_signal(signal.SIGSTOP)
            thaw = asyncio.get_running_loop().call_later(
                6.5, private_redis.process.send_signal, signal.SIGCONT
            )
            try:
                slow = await client.post(f"/topics/{topic}/events", json={"data": "slow"})
            finally:
                thaw.cancel()
                private_redis.process.send_signal(signal.SIGCONT)
            assert slow.status_code == 201, slow.text
            history = await client.get(
                f"/topics/{topic}/events", headers={"Accept": "application/json"}
            )
            assert [e["data"] for e in history.json()["events"]] == ["seed", "slow"]
    finally:
        broker.close()


def _store_errors(metrics: str, operation: str) -> float:
    line = f'broker_store_errors_total{{operation="{operation}"}} '
    found = [float(row[len(line) :]) for row in metrics.splitlines() if row.startswith(line)]
    return found[0] if found else 0.0


async def test_an_outage_with_no_stream_open_is_said_in_the_log_once_and_its_end_too(
    private_redis: RedisServer, broker_on_private_redis: BrokerProcess
) -> None:
    """With no stream open (no live reader to complain), 503s to every publish, read and
    delete wrote nothing to the log, and Redis answering again was never said; only
    publishes counted in ``broker_store_errors_total``."""
    broker, topic = broker_on_private_redis, new_topic()
    async with httpx.AsyncClient(base_url=broker.url, timeout=CLIENT_TIMEOUT) as client:
        assert (await client.post(f"/topics/{topic}/events", json={"data": 0})).status_code == 201
        private_redis.stop()
        for n in range(BURST):
            assert_problem(await client.post(f"/topics/{topic}/events", json={"data": n}), 503)
        history = await client.get(
            f"/topics/{topic}/events", headers={"Accept": "application/json"}
        )
        assert_problem(history, 503)
        assert_problem(await client.get(f"/topics/{topic}"), 503)
        assert_problem(await client.delete(f"/topics/{topic}"), 503)
        metrics = (await client.get("/metrics")).text
        for operation in ("history", "topic_info", "delete"):
            assert _store_errors(metrics, operation) >= 1, (operation, metrics)
        log = broker.log()
        assert log.count("store: a publish failed") == 1, log
        assert "answers again" not in log
        assert log.count("store: ") < 5, "one line per failed request: " + log
        private_redis.start()

        async def published() -> bool:
            answer = await client.post(f"/topics/{topic}/events", json={"data": "back"})
            return answer.status_code == 201

        await await_until(published, timeout=15, interval=0.2, what="publishing came back")
    assert "store: answers again, after" in broker.log()
    assert "operations" in broker.log().split("answers again")[-1].splitlines()[0]
