"""Resumable subscriptions over the core, on both stores: replay, live, gaps, fan-out.

Each is read both ways an edge consumes one: pulling ``chunks()`` (the ASGI
response) and pushed (``api.lean_stream``: direct writes, a pump only when needed).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from broker import (
    Broker,
    BrokerLimits,
    EventId,
    NewEvent,
    StartFrom,
    StoreUnavailable,
    SubscriberTooSlow,
    Subscription,
)
from broker import constants as c
from broker.ids import parse_cursor
from broker.model import LiveBatch
from broker.redis_open import open_store
from broker.redis_store import RedisStreamStore
from tests.support.polling import await_until
from tests.support.sse import (
    Event,
    PushConsumer,
    collect,
    is_origin_cursor,
    parse_events,
    past_a_heartbeat,
)

Consume = Callable[
    [Broker, dict[str, StartFrom]], Awaitable[tuple[Subscription, AsyncIterator[bytes]]]
]


@pytest.fixture(params=["pull", "push"])
def consume(request: pytest.FixtureRequest) -> Consume:
    """How the test opens and reads a subscription: pulling ``chunks()``, or pushed
    to a sink, as ``api.lean_stream`` does."""

    async def pulled(
        broker: Broker, starts: dict[str, StartFrom]
    ) -> tuple[Subscription, AsyncIterator[bytes]]:
        subscription = await broker.subscribe(starts)
        return subscription, subscription.chunks()

    async def pushed(
        broker: Broker, starts: dict[str, StartFrom]
    ) -> tuple[Subscription, AsyncIterator[bytes]]:
        consumer = PushConsumer()
        subscription = await broker.subscribe(starts, sink=consumer)
        return subscription, consumer.start(subscription)

    return pulled if request.param == "pull" else pushed


def numbers(events: list[Event]) -> list[int]:
    return [int(e.data) for e in events if e.event is None]


def has(n: int) -> object:
    return lambda events: n in numbers(events)


async def publish_numbers(broker: Broker, topic: str, numbers: range) -> list[EventId]:
    ids = []
    for n in numbers:
        ids += (await broker.publish(topic, [NewEvent(str(n))])).ids
    return ids


async def test_from_earliest_then_live(broker: Broker, topic: str, consume: Consume) -> None:
    await publish_numbers(broker, topic, range(3))
    subscription, chunks = await consume(broker, {topic: "earliest"})
    try:
        assert numbers(await collect(chunks, has(2))) == [0, 1, 2]
        await publish_numbers(broker, topic, range(3, 6))
        assert numbers(await collect(chunks, has(5))) == [3, 4, 5]
    finally:
        subscription.close()


async def test_no_cursor_starts_after_the_newest(
    broker: Broker, topic: str, consume: Consume
) -> None:
    await publish_numbers(broker, topic, range(3))
    subscription, chunks = await consume(broker, {topic: "now"})
    try:
        await publish_numbers(broker, topic, range(3, 5))
        assert numbers(await collect(chunks, has(4))) == [3, 4]
    finally:
        subscription.close()


async def test_a_topic_without_events_waits_for_its_first(
    broker: Broker, topic: str, consume: Consume
) -> None:
    """The first event creates the log (a new epoch) while the subscriber is live."""
    subscription, chunks = await consume(broker, {topic: "now"})
    try:
        reading = asyncio.create_task(collect(chunks, has(0)))
        await await_until(lambda: subscription.is_live, timeout=5, what="the subscription is live")
        await publish_numbers(broker, topic, range(1))
        assert numbers(await reading) == [0]
    finally:
        subscription.close()


async def test_resume_while_publishing_has_no_gap_and_no_duplicate(
    broker: Broker, topic: str, consume: Consume
) -> None:
    """The switch from replay to live, raced by a publisher."""
    ids = await publish_numbers(broker, topic, range(100))
    publisher = asyncio.create_task(publish_numbers(broker, topic, range(100, 400)))

    async def publishing() -> bool:
        return (await broker.store.state(topic)).length > 110

    await await_until(publishing, timeout=10, what="the publisher under way", worker=publisher)
    assert not publisher.done()  # the subscription below races it
    subscription, chunks = await consume(broker, {topic: ids[49]})
    try:
        received = numbers(await collect(chunks, has(399), timeout=30))
        assert received == list(range(50, 400))
    finally:
        subscription.close()
        await publisher


async def test_a_long_replay_reads_in_pages(broker: Broker, topic: str, consume: Consume) -> None:
    total = c.REPLAY_PAGE_SIZE * 2 + 37
    await broker.publish(topic, [NewEvent(str(n)) for n in range(total)])
    counts: list[int] = []
    original = broker.store.read_range

    async def spy(topic_: str, after: tuple[int, int], count: int, max_bytes: int) -> list:  # type: ignore[type-arg]
        counts.append(count)
        return await original(topic_, after, count, max_bytes)

    broker.store.read_range = spy  # type: ignore[method-assign]
    subscription, chunks = await consume(broker, {topic: "earliest"})
    try:
        received = numbers(await collect(chunks, has(total - 1), timeout=30))
        assert received == list(range(total))
        assert len(counts) >= 3 and max(counts) <= c.REPLAY_PAGE_SIZE
    finally:
        subscription.close()


@pytest.mark.parametrize(("buffer", "page"), [(262_144, 131_072), (16_384, 65_536)])
async def test_a_replays_pages_are_at_most_half_the_subscribers_buffer(
    store: RedisStreamStore, topic: str, buffer: int, page: int
) -> None:
    """A client that stops reading mid-replay holds what it was handed last (here and
    in its socket's buffer): that must be about its buffer, not a 1 MiB page; but no
    page under 64 KiB (each waits a moment for company: tiny ones made replays crawl)."""
    broker = Broker(store, limits=BrokerLimits(subscriber_buffer_bytes=buffer))
    await broker.start()
    try:
        await broker.publish(topic, [NewEvent("x" * 1000) for _ in range(600)])
        subscription = await broker.subscribe({topic: "earliest"})
        sizes: list[int] = []
        async for chunk in subscription.chunks(until_idle=True):
            sizes.append(len(chunk))
        subscription.close()
        assert sum(sizes) > 600_000
        # Pages count events' data; their frames add ids (some 4% here), and a page
        # passes its bytes by one event at most.
        assert page * 0.9 < max(sizes) <= page * 1.1 + 1_100
    finally:
        await broker.close()


async def test_a_trimmed_cursor_gets_a_gap_then_the_oldest(
    topic: str, store_url: str | None, consume: Consume
) -> None:
    store = open_store(store_url, retention_maxlen=10)
    broker = Broker(store)
    await broker.start()
    try:
        ids = await publish_numbers(broker, topic, range(40))
        oldest = (await store.state(topic)).first
        subscription, chunks = await consume(broker, {topic: ids[2]})
        events = await collect(chunks, has(39))
        gap, rest = events[0], events[1:]
        assert gap.event == "broker.gap"
        assert gap.json == {"reason": "trimmed", "requested": str(ids[2]), "topic": topic,
                            "resumed_after": gap.id}  # fmt: skip
        assert EventId.parse(str(gap.id)).position < oldest  # type: ignore[operator]
        assert numbers(rest) == list(range(40 - len(rest), 40)) and len(rest) >= 10
        subscription.close()
    finally:
        await broker.close()


async def test_an_id_of_another_topic_is_unknown(
    broker: Broker, topic: str, consume: Consume
) -> None:
    foreign = (await publish_numbers(broker, topic + "-other", range(1)))[0]
    await publish_numbers(broker, topic, range(3))
    subscription, chunks = await consume(broker, {topic: foreign})
    try:
        events = await collect(chunks, has(2))
        assert events[0].event == "broker.gap"
        assert events[0].json == {"reason": "unknown", "requested": str(foreign),
                                  "resumed_after": None, "topic": topic}  # fmt: skip
        assert numbers(events[1:]) == [0, 1, 2]
    finally:
        subscription.close()


async def test_an_id_of_a_lost_log_is_unknown(broker: Broker, topic: str, consume: Consume) -> None:
    old = await publish_numbers(broker, topic, range(3))
    store: RedisStreamStore = broker.store  # type: ignore[assignment]
    await store._client.delete(c.log_key(topic), c.meta_key(topic))  # Redis lost its data
    await publish_numbers(broker, topic, range(10, 12))
    subscription, chunks = await consume(broker, {topic: old[-1]})
    try:
        events = await collect(chunks, has(11))
        assert events[0].event == "broker.gap" and events[0].json["reason"] == "unknown"  # type: ignore[index]
        assert numbers(events[1:]) == [10, 11]
    finally:
        subscription.close()


async def test_one_cursor_resumes_every_topic(broker: Broker, topic: str, consume: Consume) -> None:
    a, b = topic + "-a", topic + "-b"
    subscription, chunks = await consume(broker, {a: "now", b: "now"})
    await publish_numbers(broker, a, range(0, 2))
    await publish_numbers(broker, b, range(100, 102))
    events = await collect(chunks, lambda ev: {1, 101} <= set(numbers(ev)))
    subscription.close()
    cursor = parse_cursor(str(events[-1].id))
    assert set(cursor) == {a, b}

    await publish_numbers(broker, a, range(2, 4))  # missed while away
    await publish_numbers(broker, b, range(102, 104))
    resumed, chunks = await consume(broker, dict(cursor))
    try:
        again = await collect(chunks, lambda ev: {3, 103} <= set(numbers(ev)))
        assert sorted(numbers(again)) == [2, 3, 102, 103]
    finally:
        resumed.close()


async def test_one_burst_past_the_buffer_is_taken_whole(
    store: RedisStreamStore, topic: str, consume: Consume
) -> None:
    """One live read larger than ``subscriber_buffer_bytes`` (a batch of large events),
    handed to a subscriber with nothing queued, is no slowness: it was dropped for it
    (audit). The limit bounds a backlog: what is queued when more comes."""
    broker = Broker(store, limits=BrokerLimits(subscriber_buffer_bytes=4096))
    await broker.start()
    try:
        await publish_numbers(broker, topic, range(-1, 0))
        subscription, chunks = await consume(broker, {topic: "now"})
        reading = asyncio.create_task(collect(chunks, lambda ev: len(ev) >= 4, timeout=10))
        await await_until(lambda: subscription.is_live, timeout=5, what="live")
        burst = [NewEvent(str(n) + " " * 2000) for n in range(4)]  # ~8 KB in one read
        await broker.publish(topic, burst)
        assert [int(e.data) for e in await reading] == [0, 1, 2, 3]
        subscription.close()
    finally:
        await broker.heartbeats.close()
        await broker.hub.close()


async def test_a_slow_subscriber_is_dropped_and_others_get_everything(
    store: RedisStreamStore, topic: str
) -> None:
    # One dispatch of the hub can carry ~100 events (~4 KB) of a fast publisher: the
    # buffer must hold a few of them for the reader that keeps up, and overflow for
    # the one that stopped (800 events of ~38 B: ~30 KB).
    broker = Broker(store, limits=BrokerLimits(subscriber_buffer_bytes=16_384))
    await broker.start()
    try:
        await publish_numbers(broker, topic, range(-1, 0))  # the log exists before they subscribe
        fast = await broker.subscribe({topic: "now"})
        slow = await broker.subscribe({topic: "now"})
        slow_chunks = slow.chunks()
        collector = asyncio.create_task(collect(fast.chunks(), has(799), timeout=30))
        assert (
            await anext(slow_chunks)
            == b"id: %s\n\n"
            % str(  # its cursor, caught up
                (await broker.store.state(topic)).event_id(
                    (await broker.store.state(topic)).last_issued
                )
            ).encode()
        )
        first_chunk = asyncio.create_task(anext(slow_chunks))
        await await_until(lambda: slow.is_live, timeout=5, what="the slow one is live")
        first = await publish_numbers(broker, topic, range(1))
        [event] = parse_events(await first_chunk)  # then it stops reading
        ids = first + await publish_numbers(broker, topic, range(1, 800))
        assert numbers(await collector) == list(range(800))
        with pytest.raises(SubscriberTooSlow):
            async with asyncio.timeout(10):
                async for _ in slow_chunks:
                    pass
        # It resumes from its last id without loss.
        assert event.id == str(ids[0])
        again = await broker.subscribe({topic: ids[0]})
        assert numbers(await collect(again.chunks(), has(799))) == list(range(1, 800))
        for subscription in (fast, slow, again):
            subscription.close()
    finally:
        await broker.heartbeats.close()
        await broker.hub.close()


async def test_closing_frees_every_registration(broker: Broker, topic: str) -> None:
    for round_ in range(50):
        subscription = await broker.subscribe({f"{topic}-{round_ % 5}": "now", topic: "now"})
        subscription.close()
    assert broker.hub.topic_count == 0 and broker.hub.subscriber_count == 0


class _HeldStates:
    """Holds the store's state reads of one topic until ``release``."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self._store: Any = broker.store
        self._state = self._store.state
        self._topic = topic
        self.asked = asyncio.Event()
        self._go = asyncio.Event()
        self._store.state = self._read

    async def _read(self, topic: str) -> Any:
        if topic == self._topic and not self._go.is_set():
            self.asked.set()
            await self._go.wait()
        return await self._state(topic)

    def release(self) -> None:
        self._go.set()
        self._store.state = self._state


async def test_a_subscriber_cancelled_while_it_makes_a_feed_cancels_no_other(
    broker: Broker, topic: str
) -> None:
    """The first subscriber of a topic makes its feed (one state read) while a second
    waits for it: cancelling the first (its request went away) raised its cancellation
    in the second, never cancelled (an edge catching Exception left it unanswered)."""
    held = _HeldStates(broker, topic)
    first = asyncio.create_task(broker.subscribe({topic: "now"}))
    await asyncio.wait_for(held.asked.wait(), 5)
    second = asyncio.create_task(broker.subscribe({topic: "now"}))
    await asyncio.sleep(0)  # one turn: the second runs to its wait for the first's feed
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    held.release()
    subscription = await asyncio.wait_for(second, 5)
    try:
        assert not subscription.closed
        await publish_numbers(broker, topic, range(1))
        assert numbers(await collect(subscription.chunks(), has(0), timeout=5)) == [0]
    finally:
        subscription.close()
    assert broker.hub.subscriber_count == 0


async def test_a_subscription_ended_while_it_opens_stays_registered_nowhere(
    broker: Broker, topic: str
) -> None:
    """Its credentials revoked while it attached to its topics (the heartbeat clock ends
    it): the topics it attached after that stayed registered with the hub, read by
    the live reader for a stream that was over."""
    trusted = True
    held = _HeldStates(broker, f"{topic}-b")
    opening = asyncio.create_task(
        broker.subscribe({f"{topic}-a": "now", f"{topic}-b": "now"}, trusted=lambda: trusted)
    )
    await asyncio.wait_for(held.asked.wait(), 5)  # making b's feed
    await await_until(lambda: broker.hub.subscriber_count == 1, timeout=5, what="a attached")
    trusted = False
    await await_until(lambda: broker.hub.subscriber_count == 0, timeout=5, what="the end")
    held.release()
    subscription = await asyncio.wait_for(opening, 5)
    assert subscription.closed
    assert (broker.hub.subscriber_count, broker.hub.topic_count) == (0, 0)


async def test_a_multi_topic_stream_makes_its_feeds_at_once(broker: Broker, topic: str) -> None:
    """A new topic's feed is a store read: made one after another, a stream of N new
    topics waited N+1 round trips before its head (and /client.js gives up connecting
    after a bound that covers two). Every read is held here until all are asked."""
    store: Any = broker.store
    read_state = store.state
    asked: list[str] = []
    go = asyncio.Event()

    async def held_read(name: str) -> Any:
        asked.append(name)
        await go.wait()
        return await read_state(name)

    store.state = held_read
    topics = [f"{topic}-{n}" for n in range(3)]
    opening = asyncio.create_task(broker.subscribe(dict.fromkeys(topics, "now")))
    try:
        await await_until(
            lambda: sorted(asked) == topics, timeout=5, what="every feed asked for", worker=opening
        )
    finally:
        go.set()
        store.state = read_state
    subscription = await asyncio.wait_for(opening, 5)
    try:
        await publish_numbers(broker, topics[2], range(1))
        assert numbers(await collect(subscription.chunks(), has(0), timeout=5)) == [0]
    finally:
        subscription.close()
    assert (broker.hub.subscriber_count, broker.hub.topic_count) == (0, 0)


async def test_a_multi_topic_stream_whose_feed_fails_leaves_nothing_registered(
    broker: Broker, topic: str
) -> None:
    """One topic's feed cannot be made (the store failed) while the others' are made at
    the same time: the stream fails, and no topic stays registered for it."""
    store: Any = broker.store
    read_state = store.state
    go = asyncio.Event()

    async def failing_read(name: str) -> Any:
        if name.endswith("-bad"):
            raise StoreUnavailable("the store failed")
        await go.wait()  # the others' reads still in flight when the stream fails
        return await read_state(name)

    store.state = failing_read
    try:
        with pytest.raises(StoreUnavailable):
            starts: dict[str, StartFrom] = {f"{topic}-{n}": "now" for n in ("a", "bad", "b")}
            await asyncio.wait_for(broker.subscribe(starts), 5)
    finally:
        go.set()
        store.state = read_state
    await await_until(
        lambda: (broker.hub.subscriber_count, broker.hub.topic_count) == (0, 0),
        timeout=5,
        what="the feeds made after the failure let go",
    )


async def test_live_entries_are_framed_once_and_shared(broker: Broker, topic: str) -> None:
    offered: list[list[object]] = [[], []]

    class Recorder:
        def __init__(self, index: int) -> None:
            self.index = index

        def offer(self, batch: LiveBatch) -> int:
            offered[self.index].extend(batch.entries)
            return 0

        def log_reset(self, topic: str) -> None:
            pass

        def abandon(self) -> None:
            pass

    first, second = Recorder(0), Recorder(1)
    await broker.hub.attach(topic, first)
    await broker.hub.attach(topic, second)
    await publish_numbers(broker, topic, range(3))
    await await_until(lambda: len(offered[1]) >= 3, timeout=5, what="3 entries offered")
    assert all(a is b for a, b in zip(offered[0], offered[1], strict=True))
    broker.hub.detach(topic, first)
    broker.hub.detach(topic, second)


async def test_heartbeats_while_idle(broker: Broker, topic: str, consume: Consume) -> None:
    subscription, chunks = await consume(broker, {topic: "now"})
    try:
        async with asyncio.timeout(5):
            assert is_origin_cursor(await anext(chunks))  # the cursor (no log yet)
            assert await anext(chunks) == b":\n\n"
    finally:
        subscription.close()


@pytest.mark.parametrize("topics", [1, 2], ids=["one-topic", "two-topics"])
async def test_a_stream_from_now_sends_its_cursor_once_caught_up(
    broker: Broker, topic: str, topics: int
) -> None:
    """An ``id:`` with no data (``EventSource`` keeps it, fires nothing): a client that
    drops before the first event comes back with it and gets what it missed, where
    with no id it would start from a new "now"."""
    names = [f"{topic}-{n}" for n in range(topics)]
    for name in names:
        await publish_numbers(broker, name, range(1))
    subscription = await broker.subscribe(dict.fromkeys(names, "now"))
    try:
        async with asyncio.timeout(5):
            chunk = past_a_heartbeat(await anext(subscription.chunks()))
    finally:
        subscription.close()
    assert chunk.startswith(b"id: ") and chunk.endswith(b"\n\n") and b"data" not in chunk
    text = chunk[4:-2].decode()
    cursor = parse_cursor(text) if topics > 1 else {names[0]: EventId.parse(text)}
    missed = {name: await publish_numbers(broker, name, range(1, 2)) for name in names}
    again = await broker.subscribe(cursor)
    try:
        events = await collect(again.chunks(), lambda ev: numbers(ev).count(1) == topics)
    finally:
        again.close()
    assert sorted(numbers(events)) == [1] * topics  # each topic's missed event, once
    assert {e.id for e in events} - {None} and all(ids for ids in missed.values())


@pytest.mark.parametrize("topics", [1, 2], ids=["one-topic", "two-topics"])
async def test_a_pushed_subscription_idles_without_a_task(
    broker: Broker, topic: str, topics: int
) -> None:
    """Once caught up, live events and heartbeats are written by the hub's and the
    clock's calls: no pump task is started again for them."""
    names = [f"{topic}-{n}" for n in range(topics)]
    for name in names:
        await publish_numbers(broker, name, range(1))
    consumer = PushConsumer()
    subscription = await broker.subscribe(dict.fromkeys(names, "earliest"), sink=consumer)
    try:
        consumer.start(subscription)
        first = await collect(consumer, lambda ev: numbers(ev).count(0) == topics)
        assert numbers(first) == [0] * topics
        await await_until(lambda: not consumer.pumping, timeout=5, what="the pump ended")
        last = {name: (await publish_numbers(broker, name, range(1, 4)))[-1] for name in names}
        events = await collect(consumer, lambda ev: numbers(ev).count(3) == topics)
        assert sorted(numbers(events)) == sorted([1, 2, 3] * topics)
        if topics > 1:  # the last id is the cursor over both topics, at their newest
            assert parse_cursor(str(events[-1].id)) == last
        async with asyncio.timeout(5):  # the fixture's heartbeat is 0.5 s
            assert await anext(consumer) == b":\n\n"
        assert consumer.pumps_started == 1
        assert consumer.direct_writes >= 2
    finally:
        subscription.close()


@pytest.mark.parametrize("topics", [1, 2], ids=["one-topic", "two-topics"])
async def test_the_first_events_of_a_new_topic_are_written_without_a_task(
    broker: Broker, topic: str, topics: int
) -> None:
    """Subscribers waiting for a topic that does not exist yet (an LLM answer's viewer,
    a broadcast's audience) get its first events through the hub's direct write: the
    new log's epoch differs from their cursor's, but the live reader read it from its
    very start, so nothing before those events can have been missed. (They used to go
    back to the log, one pump task and one read each, all at once.)"""
    names = [f"{topic}-{n}" for n in range(topics)]
    consumers = [PushConsumer() for _ in range(3)]
    subscriptions = [
        await broker.subscribe(dict.fromkeys(names, "now"), sink=consumer) for consumer in consumers
    ]
    try:
        for consumer, subscription in zip(consumers, subscriptions, strict=True):
            consumer.start(subscription)
        for consumer in consumers:
            await await_until(lambda c=consumer: not c.pumping, timeout=5, what="caught up")
        for name in names:
            await publish_numbers(broker, name, range(3))
        for consumer in consumers:
            events = await collect(consumer, lambda ev: numbers(ev).count(2) == topics)
            assert sorted(numbers(events)) == sorted([0, 1, 2] * topics)
            assert consumer.pumps_started == 1  # the catch-up's, at the start only
            assert consumer.direct_writes >= topics
    finally:
        for subscription in subscriptions:
            subscription.close()


async def test_closing_a_stream_whose_reader_was_cancelled_a_moment_ago_is_quiet(
    broker: Broker, topic: str
) -> None:
    """A consumer cancelled while it waits (its client left) has its wait cancelled at
    once, but runs its cancellation only at the next turn of the loop. A close in
    between (a drain closes every stream in one loop) must not fail on that wait."""
    subscription = await broker.subscribe({topic: "now"})
    chunks = subscription.chunks()
    await anext(chunks)  # its cursor, once caught up
    consumer = asyncio.ensure_future(anext(chunks))
    await await_until(lambda: subscription.is_live, timeout=5, what="the subscription is live")
    await asyncio.sleep(0)  # the consumer waits for something to send
    consumer.cancel()
    subscription.close()  # before the consumer has run its cancellation
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert subscription.closed
