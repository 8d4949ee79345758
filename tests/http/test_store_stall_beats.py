"""A stream whose subscription waits on a stalled store still gets its heartbeats.

The clients take two heartbeat intervals and a second of silence for a dead stream
(``/client.js``, the Python subscriber). A store that stalls (Redis frozen: SIGSTOP)
holds a read up to 5 s for a free connection and 5 s for its reply; a stream whose
consumer waited on such a read (a replay's page, the later origin of a topic with a
TTL) was sent nothing meanwhile, and its client dropped a stream the broker rode
the stall out with. Its consumer then waits holding no frame, so the heartbeat clock
beats it straight to its socket (``CatchUp._from_store``), as it does a catch-up
that failed and waits its backoff before trying again.

Each wait is held by one test, which fails without its beats: a later origin's read
(a live stream), a replay's next page and then its cursor judged again (a frozen
Redis), the backoff between a catch-up's tries (a Redis down: tries fail at once).
One Redis and one broker for the module: each test stalls or stops the Redis for a
few seconds, and leaves it running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections import deque
from collections.abc import Iterator

import httpx
import pytest

from tests.http.helpers import RawResponse, SseStream, new_topic, small_window_stream, subscribe
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer
from tests.support.sse import parse_sse, whole_blocks

BEAT = "broker.beat"
HEARTBEAT_S = 0.4
"""Short: a backoff (2 s at most, ``RECONNECT_BACKOFF_MAX``) is then longer than the
clients' silence bound, so a backoff the clock did not beat is seen."""
SILENCE_LIMIT_S = 2 * HEARTBEAT_S + 1
"""How long the clients let a stream stay silent before they take it for dead."""
STALL_S = 6.0
"""Longer than a store read's reply timeout (5 s): the stalled read fails, or answers
late, while the stream must stay alive."""
REPLAY_STALL_S = 8.0
"""A replay's stall: its page's read fails after 5 s, and the cursor judged again after
the backoff waits out the rest (3 s: longer than the clients' silence bound too)."""
OUTAGE_S = 6.0
"""Redis down this long: reads fail at once, and the backoff between a catch-up's
tries grows from 50 ms to its 2 s (reached 3.15 s in)."""
TTL_S = 12
"""The TTL of the topics named ``ttl-*``: a client at the origin of a topic with no
log is sent a later origin every quarter of it (``broker.origins``), a store read, so
one falls in the stall; and longer than the stall, so that the origin it holds is not
too old to trust after it."""
BUFFER_BYTES = 131_072
"""A replay's pages are half of it: 64 KiB, some 16 of the backlog's events."""
BACKLOG_EVENTS = 600
EVENT_BYTES = 4000
"""2.4 MB of backlog: far more than the buffers between broker and a client that
reads nothing take (some 600 KB), so a replay is still under way when it reads again."""


@pytest.fixture(scope="module")
def stalling_redis() -> Iterator[RedisServer]:
    """This module's own redis-server (AOF on: stopped, it comes back with its data)."""
    server = RedisServer(appendonly=True).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def stall_broker(stalling_redis: RedisServer) -> Iterator[BrokerProcess]:
    env = {
        "BROKER_HEARTBEAT_SECONDS": str(HEARTBEAT_S),
        "BROKER_TOPIC_POLICIES": json.dumps([{"pattern": "ttl-*", "ttl_seconds": TTL_S}]),
        "BROKER_SUBSCRIBER_BUFFER_BYTES": str(BUFFER_BYTES),
    }
    process = BrokerProcess(redis_url=stalling_redis.url, env=env).start()
    yield process
    process.close()


async def _publish_once(client: httpx.AsyncClient, topic: str, data: str) -> str:
    """Published under a key, asked again until stored (the store just came back)."""
    key = {"Idempotency-Key": f"after-stall-{data}"}

    async def published() -> str | None:
        answer = await client.post(f"/topics/{topic}/events", json={"data": data}, headers=key)
        return str(answer.json()["id"]) if answer.status_code in (200, 201) else None

    return await await_until(published, timeout=15, interval=0.2, what=f"{data} never stored")


@contextlib.contextmanager
def _frozen(redis_server: RedisServer) -> Iterator[None]:
    """Redis frozen (SIGSTOP): it takes connections and answers nothing; thawed after,
    whatever happened meanwhile."""
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        redis_server.process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def _down(redis_server: RedisServer) -> Iterator[None]:
    """Redis stopped: every command fails at once (refused); started again after, with
    its data (the same port and directory: its AOF)."""
    redis_server.stop()
    try:
        yield
    finally:
        redis_server.start()


async def _beats_through_stall(stream: SseStream, redis_server: RedisServer) -> int:
    """Redis frozen for ``STALL_S``: the beats the stream got meanwhile, each within the
    clients' silence bound of the one before (else the stream was taken for dead)."""
    loop = asyncio.get_running_loop()
    beats = 0
    with _frozen(redis_server):
        until = loop.time() + STALL_S
        while loop.time() < until:  # (bounded: each read waits at most the bound)
            event = await stream.next(timeout=SILENCE_LIMIT_S)
            assert event.event == BEAT, event
            beats += 1
    return beats


async def test_a_stream_reading_the_store_while_it_stalls_beats_then_delivers_once(
    stalling_redis: RedisServer, stall_broker: BrokerProcess
) -> None:
    """Live at the origin of a topic with a TTL, the stream's consumer asks the store for
    a later origin during the stall: it is beaten meanwhile, then delivers what comes
    next exactly once."""
    topic = new_topic("ttl")
    async with httpx.AsyncClient(base_url=stall_broker.url, timeout=10) as client:
        async with subscribe(client, topic, params={"heartbeat": "event"}) as stream:
            assert (await stream.next(timeout=SILENCE_LIMIT_S)).event == BEAT  # the first
            # Caught up (its cursor is sent then: an id with no data), so that what the
            # stall holds is a later origin's read, not the first catch-up's page.
            await await_until(
                lambda: stream.last_event_id, timeout=5, what="the stream never caught up"
            )
            assert await _beats_through_stall(stream, stalling_redis) >= 1
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


# -- a replay of a long backlog -------------------------------------------------------


class HeldReplay:
    """A replay from the earliest whose client reads only when asked
    (``small_window_stream``): the broker runs ahead of it by what the buffers between
    take, and no further (its consumer waits for the socket to drain)."""

    def __init__(self, response: RawResponse) -> None:
        self._response = response
        self._rest = b""
        self._events: deque[dict[str, str]] = deque()

    @classmethod
    async def open(cls, broker: BrokerProcess, topic: str) -> HeldReplay:
        path = f"/topics/{topic}/events?from=earliest&heartbeat=event"
        response = await small_window_stream(broker.url, path)
        assert response.status == 200, response.status
        return cls(response)

    async def next(self, timeout: float) -> dict[str, str]:
        """The next event (a beat too), or fail when none comes within ``timeout`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._events:  # (bounded: each chunk is read before the deadline)
            try:
                chunk = await self._response.read_chunk(max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise AssertionError(f"the stream was silent for {timeout} s") from None
            assert chunk is not None, "the stream ended"
            blocks, self._rest = whole_blocks(self._rest + chunk)
            self._events.extend(parse_sse(blocks))
        return self._events.popleft()

    async def events_until(self, count: int, received: list[str]) -> None:
        """Read until ``received`` holds ``count`` ids (beats in between skipped)."""
        for _ in range(count * 2 + 100):  # (bounded: a beat at most before each chunk)
            if len(received) >= count:
                return
            event = await self.next(timeout=10)
            if event.get("event") != BEAT:
                received.append(event["id"])
        raise AssertionError(f"{len(received)} events, not {count}")

    async def close(self) -> None:
        await self._response.close()


async def _publish_backlog(client: httpx.AsyncClient, topic: str) -> list[str]:
    ids: list[str] = []
    for start in range(0, BACKLOG_EVENTS, 200):
        batch = [{"data": f"{n}:" + "x" * EVENT_BYTES} for n in range(start, start + 200)]
        answer = await client.post(f"/topics/{topic}/events", json=batch)
        assert answer.status_code == 201, answer.text
        ids += answer.json()["ids"]
    return ids


async def _read_through(stream: HeldReplay, seconds: float, received: list[str]) -> int:
    """Read for ``seconds``, each event within the clients' silence bound of the one
    before (else the stream was taken for dead): the beats, and the ids in ``received``."""
    loop = asyncio.get_running_loop()
    beats = 0
    until = loop.time() + seconds
    while loop.time() < until:  # (bounded: each read waits at most the bound)
        event = await stream.next(timeout=SILENCE_LIMIT_S)
        if event.get("event") == BEAT:
            beats += 1
        else:
            received.append(event["id"])
    return beats


async def _replay_through(
    stall: contextlib.AbstractContextManager[None], seconds: float, broker: BrokerProcess
) -> None:
    """A replay of a long backlog, its client reading its first events; then the store
    stalls for ``seconds`` while the client reads on: it is beaten all through, then
    gets every event once, in order (and no gap: the log lost nothing)."""
    topic = new_topic()
    async with httpx.AsyncClient(base_url=broker.url, timeout=10) as client:
        ids = await _publish_backlog(client, topic)
    stream = await HeldReplay.open(broker, topic)
    try:
        received: list[str] = []
        await stream.events_until(10, received)  # the replay is under way
        with stall:
            beats = await _read_through(stream, seconds, received)
        # What was in flight came, and then the replay waited on the store, beaten.
        assert len(received) < len(ids), "the replay was over before the store stalled"
        assert beats >= 2
        await stream.events_until(len(ids), received)
        assert received == ids
        # Nothing more: not one of them twice.
        for _ in range(2):
            assert (await stream.next(timeout=SILENCE_LIMIT_S)).get("event") == BEAT
    finally:
        await stream.close()


async def test_a_replay_whose_next_page_stalls_beats_then_delivers_every_event_once(
    stalling_redis: RedisServer, stall_broker: BrokerProcess
) -> None:
    """The replay's next page is read from a frozen Redis: the read fails after its 5 s,
    the catch-up waits its backoff and judges the cursor again (a read that waits 3 s
    for the thaw); the stream is beaten all through, then resumes where it was."""
    await _replay_through(_frozen(stalling_redis), REPLAY_STALL_S, stall_broker)


async def test_a_replay_in_backoff_while_the_store_is_down_beats_then_delivers_every_event_once(
    stalling_redis: RedisServer, stall_broker: BrokerProcess
) -> None:
    """Redis down: each try of the catch-up fails at once, and the backoff between them
    grows to 2 s, longer than the clients' silence bound here; the clock beats the
    stream as it waits (it holds no frame: what it yielded before was written).

    Not frozen: there every try waits out its 5 s reply timeout, and the backoff after
    it is 50 ms, then 100 ms; it grows only when tries fail at once."""
    await _replay_through(_down(stalling_redis), OUTAGE_S, stall_broker)
