"""The sessions scenario's subscriber, against a broker on a real Redis: its producer
starts once the stream is live (a "come back later" 200 is no subscription), and a
stream cut before its first token resumes from the cursor the broker sent, as
EventSource resumes. Either way every token arrives, once, in order."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from api import routes
from api.settings import Settings
from bench.lifecycle_jobs import Producer, SessionTally, _run_slot
from bench.sse import SseEvent, _EventParser
from broker.errors import StoreUnavailable
from brokerclient.direct import DirectPublisher
from tests.support.in_process import serving
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer

TOKENS = 10
HELD_FOR_TOKENS = 3  # a held subscribe goes on once the producer sent this many
RETRY_MS = 50

Step = Callable[[Any], Awaitable[None]]


@pytest.fixture
async def broker_port(redis_server: RedisServer) -> AsyncIterator[int]:
    """``broker serve``'s edge in this process, on the real Redis (so that the test can
    step into its subscribes), with a short retry hint."""
    settings = Settings(redis_url=redis_server.url, retry_ms=RETRY_MS)
    async with serving(settings) as port:
        yield port


class Generation:
    """One session of the bench (one slot, one round, direct mode), with steps the test
    takes before the broker's n-th subscribe and when the producer begins."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, port: int, redis_url: str) -> None:
        self.port = port
        self.redis_url = redis_url
        self.tally = SessionTally()
        self.began = False
        self.before_subscribe: dict[int, Step] = {}
        self.on_begin: Callable[[], None] = lambda: None
        self._subscribes = 0
        subscribe, generate = routes.subscribe, Producer.generate

        async def stepped_subscribe(request: Any, starts: Any, sink: Any = None) -> Any:
            self._subscribes += 1
            step = self.before_subscribe.get(self._subscribes)
            if step is not None:
                await step(sink)
            return await subscribe(request, starts, sink)

        async def watched_generate(producer: Producer, topic: str, tokens: int, at: float) -> None:
            self.began = True
            self.on_begin()
            await generate(producer, topic, tokens, at)

        monkeypatch.setattr(routes, "subscribe", stepped_subscribe)
        monkeypatch.setattr(Producer, "generate", watched_generate)

    async def hold_until_tokens_sent(self, _sink: Any) -> None:
        """If the producer has begun, let it send a few tokens first: a stream from now
        opened then starts after them."""
        if self.began:
            await await_until(
                lambda: self.tally.published >= HELD_FOR_TOKENS,
                timeout=10,
                what="the producer's first tokens",
            )

    async def run(self) -> None:
        spec = {
            "host": "127.0.0.1", "port": self.port, "mode": "direct", "close": True,
            "rate": 100.0, "envelope": True, "seed": "test", "tokens": TOKENS, "rounds": 1,
            "prefix": f"bench-test.{uuid.uuid4().hex[:8]}", "drop_fraction": 0.0,
            "grace_s": 10.0, "live_cursor": True,
        }  # fmt: skip
        direct = DirectPublisher(self.redis_url)
        try:
            await asyncio.wait_for(_run_slot(spec, 0, time.monotonic(), self.tally, direct), 30)
        finally:
            await direct.aclose()


async def _store_unavailable(_sink: Any) -> None:
    raise StoreUnavailable("the pool had no connection free in time (the test's)")


async def test_the_producer_waits_for_a_subscriber_told_to_come_back_later(
    monkeypatch: pytest.MonkeyPatch, broker_port: int, redis_server: RedisServer
) -> None:
    """The broker answers a subscribe whose store did not answer in time with a 200
    that ends at once (an EventSource reconnects after it). Taken for a subscription,
    the producer began, and the subscriber's second try, from a later now, missed the
    first tokens with no gap (bench run of 2026-11-29: 60 of 100 tokens)."""
    generation = Generation(monkeypatch, broker_port, redis_server.url)
    generation.before_subscribe = {
        1: _store_unavailable,
        2: generation.hold_until_tokens_sent,
    }
    await generation.run()

    (session,) = generation.tally.sessions
    assert session.received == list(range(TOKENS))
    assert session.ended and not session.gaps
    assert session.came_back_later == 1 and generation.tally.subscribe_failed == 0


async def test_a_stream_cut_before_its_first_token_resumes_from_its_cursor(
    monkeypatch: pytest.MonkeyPatch, broker_port: int, redis_server: RedisServer
) -> None:
    """A stream from now sends its cursor (an id with no data) once live; EventSource
    keeps it as its last event id. Cut before the first token, the subscriber comes
    back with it and gets every token, not those after a new now."""
    generation = Generation(monkeypatch, broker_port, redis_server.url)
    first_stream: list[Any] = []

    async def keep_sink(sink: Any) -> None:
        first_stream.append(sink)

    def cut_first_stream() -> None:
        first_stream[0]._transport.abort()  # as a network drop, before any token

    generation.before_subscribe = {1: keep_sink, 2: generation.hold_until_tokens_sent}
    generation.on_begin = cut_first_stream
    await generation.run()

    (session,) = generation.tally.sessions
    assert session.received == list(range(TOKENS))
    assert session.ended and not session.gaps
    assert session.connects == 2
    assert session.connections[1].last_event_id == session.connections[0].ids_without_event[0]


def test_the_parser_keeps_the_id_of_an_event_without_data_as_eventsource_does() -> None:
    events: list[SseEvent] = []
    ids: list[str] = []
    parser = _EventParser(events.append, ids.append)
    parser.feed(b"retry: 2000\n\nid: a\n\n: beat\n\nevent: x\n\nid: b\ndata: 1\n\n")
    assert ids == ["a"]  # the id line alone; the comment after it moves nothing
    assert events == [SseEvent("b", None, "1")]  # a type with no data is no event
    assert parser.last_id == "b" and parser.retry_ms == 2000
