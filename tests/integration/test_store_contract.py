"""The storage seam's contract, run against every store: embedded (fakeredis) and real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from broker import constants as c
from broker import redis_scripts
from broker.errors import (
    InvalidInput,
    LinesLost,
    LogDeleted,
    LogLost,
    RecordsLapsed,
    StoreUnavailable,
    TopicClosed,
)
from broker.ids import EventId, parse_stream_id
from broker.model import IngestLines, NewEvent
from broker.policy import TopicPolicy
from broker.redis_open import open_store
from broker.redis_store import RedisStreamStore
from tests.support.failover import IngestAppends
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer, free_port


def events(*payloads: str) -> list[NewEvent]:
    return [NewEvent(data=p) for p in payloads]


async def test_append_returns_ids_and_reads_back(store: RedisStreamStore, topic: str) -> None:
    result = await store.append(topic, [NewEvent("1", c.KIND_JSON, "kind", 500)])
    assert not result.replayed and len(result.ids) == 1
    [entry] = (await store.read_range(topic, (0, 0), 10)).entries
    assert entry.id == result.ids[0]
    assert (entry.data_text, entry.event_type, entry.is_json) == ("1", "kind", True)
    assert entry.frame == f"id: {entry.id}\n".encode() + b"event: kind\nretry: 500\ndata: 1\n\n"


async def test_a_batch_is_stored_in_order_under_one_epoch(
    store: RedisStreamStore, topic: str
) -> None:
    result = await store.append(topic, events(*map(str, range(50))))
    assert [i.position for i in result.ids] == sorted(i.position for i in result.ids)
    assert len({i.epoch for i in result.ids}) == 1
    stored = (await store.read_range(topic, (0, 0), 100)).entries
    assert [e.data_text for e in stored] == [str(n) for n in range(50)]


async def test_read_range_pages_after_a_position(store: RedisStreamStore, topic: str) -> None:
    ids = (await store.append(topic, events(*map(str, range(10))))).ids
    page = (await store.read_range(topic, ids[3].position, 4)).entries
    assert [e.id for e in page] == ids[4:8]
    assert (await store.read_range(topic, ids[-1].position, 4)).entries == []


async def test_an_idempotent_repeat_stores_nothing(store: RedisStreamStore, topic: str) -> None:
    first = await store.append(topic, events("a", "b"), idempotency_key="k 1")
    again = await store.append(topic, events("other"), idempotency_key="k 1")
    assert again.replayed and again.ids == first.ids
    assert (await store.state(topic)).length == 2
    other_topic = await store.append(topic + "x", events("a"), idempotency_key="k 1")
    assert not other_topic.replayed  # keys are per topic


async def test_racing_writers_on_one_key_store_once(store: RedisStreamStore, topic: str) -> None:
    results = await asyncio.gather(
        *(store.append(topic, events(str(n)), idempotency_key="race") for n in range(30))
    )
    assert len({tuple(r.ids) for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert (await store.state(topic)).length == 1


async def test_racing_instances_on_one_key_store_once(
    redis_server: RedisServer, topic: str
) -> None:
    """Two instances (two clients) race on one key against real Redis."""
    first, second = open_store(redis_server.url), open_store(redis_server.url)
    try:
        results = await asyncio.gather(
            *(s.append(topic, events(str(n)), idempotency_key="k") for n in range(20)
              for s in (first, second))
        )  # fmt: skip
        assert len({tuple(r.ids) for r in results}) == 1
        assert (await first.state(topic)).length == 1
    finally:
        await first.close()
        await second.close()


async def test_the_idempotency_window_expires(topic: str, redis_server: RedisServer) -> None:
    store = open_store(redis_server.url, idempotency_seconds=1)
    try:
        await store.append(topic, events("a"), idempotency_key="k")
        deadline = time.monotonic() + 5
        while (await store.append(topic, events("a"), idempotency_key="k")).replayed:
            assert time.monotonic() < deadline, "the key outlived its window"
            await asyncio.sleep(0.1)
        assert (await store.state(topic)).length == 2
    finally:
        await store.close()


async def test_records_past_the_window_are_pruned(topic: str, redis_server: RedisServer) -> None:
    """Records live in one hash per topic: those past the window leave it as others are
    written (it does not grow for as long as keys keep coming), and the hash itself
    expires a window after the last one (a topic kept for good)."""
    store = open_store(redis_server.url, idempotency_seconds=1)
    admin = store._client
    records, times = c.records_key(topic), c.record_times_key(topic)
    try:
        await store.append(topic, events("a"), idempotency_key="old")
        deadline, n = time.monotonic() + 15, 0  # (pruning runs at one append in eight)
        while await admin.hexists(records, "old"):
            assert time.monotonic() < deadline, "a record past the window was kept"
            n += 1
            await store.append(topic, events("b"), idempotency_key=f"new-{n}")
            await asyncio.sleep(0.05)
        assert await admin.hlen(records) == await admin.zcard(times) >= 1
        assert 0 < await admin.pttl(records) <= 1000 and 0 < await admin.pttl(times) <= 1000
    finally:
        await store.close()


@pytest.mark.parametrize("url_kind", ["embedded", "redis"])
async def test_a_stream_longer_than_the_window_resent_whole_stores_each_line_once(
    url_kind: str, redis_server: RedisServer, topic: str
) -> None:
    """An ingest's lines answer for the window after its last line, not each after its
    own write: a stream that ran longer than the window, broke, and was resent whole
    stored its early lines a second time."""
    store = open_store(None if url_kind == "embedded" else redis_server.url, idempotency_seconds=1)
    try:
        stored = []
        started = time.monotonic()
        for n in range(1, 5):  # a line every 0.4 s: line 1 is older than the window ...
            lines = IngestLines("K", [n], after=n - 1)  # (one request's appends)
            line = await store.append(topic, events(f"l{n}"), lines=lines)
            stored += line.ids
            await asyncio.sleep(0.4)
        assert time.monotonic() - started > 1.5
        # ... but the stream went on; it breaks, and is sent again whole.
        numbers = [1, 2, 3, 4, 5]
        resent = await store.append(
            topic, events(*(f"l{n}" for n in numbers)), lines=IngestLines("K", numbers)
        )
        assert resent.ids[:4] == stored
        assert (await store.state(topic)).length == 5
    finally:
        await store.close()


@pytest.mark.parametrize("url_kind", ["embedded", "redis"])
async def test_an_ingest_key_used_again_past_the_window_stores_its_lines(
    url_kind: str, redis_server: RedisServer, topic: str
) -> None:
    """An ingest under a key whose last line is past the window is a new one: its first
    line refreshed the key's time, and the old ingest's records of lines 2, 3 answered
    again: those lines were not stored, answered with the old ids."""
    url = None if url_kind == "embedded" else redis_server.url
    store = open_store(url, idempotency_seconds=1, topic_ttl_seconds=3600)  # (records kept)
    try:
        old = await store.append(topic, events("o1", "o2", "o3"), lines=IngestLines("K", [1, 2, 3]))
        await asyncio.sleep(1.3)  # past the window
        new = []
        for n in (1, 2, 3):  # a new ingest under the same key, a line at a time
            lines = IngestLines("K", [n], after=n - 1)
            result = await store.append(topic, events(f"n{n}"), lines=lines)
            assert not result.replayed, n
            new += result.ids
        assert not set(new) & set(old.ids)
        assert (await store.state(topic)).length == 6
        again = await store.append(topic, events("n1", "n2"), lines=IngestLines("K", [1, 2]))
        assert again.replayed and again.ids == new[:2]  # the new ingest's records answer
    finally:
        await store.close()


async def test_an_ingests_lines_past_the_window_are_pruned_together(
    topic: str, redis_server: RedisServer
) -> None:
    """The lines of an ingest whose last line is past the window leave the topic's line
    records as other ingests write theirs (each line, and the line after it past blank
    ones); the records expire a window after the last."""
    store = open_store(redis_server.url, idempotency_seconds=1)
    admin = store._client
    lines, times = c.line_records_key(topic), c.line_times_key(topic)
    try:
        await store.append(topic, events("b", "d"), lines=IngestLines("old", [2, 4]))
        assert await admin.hlen(lines) == 6  # two lines, the lines after 0 and 2, top, highest
        deadline, n = time.monotonic() + 15, 0  # (pruning runs at one append in eight)
        while await admin.zscore(times, "old") is not None:
            assert time.monotonic() < deadline, "an ingest past the window was kept"
            n += 1
            await store.append(topic, events("c"), lines=IngestLines("new", [n], after=n - 1))
            await asyncio.sleep(0.05)
        fields = {field.decode() for field in await admin.hkeys(lines)}
        assert fields and all(field.startswith("new\n") for field in fields), fields
        assert 0 < await admin.pttl(lines) <= 1000 and 0 < await admin.pttl(times) <= 1000
    finally:
        await store.close()


@pytest.mark.parametrize("url_kind", ["embedded", "redis"])
async def test_retention_maxlen_records_exactly_what_it_trimmed(
    url_kind: str, redis_server: RedisServer, topic: str
) -> None:
    store = open_store(None if url_kind == "embedded" else redis_server.url, retention_maxlen=10)
    try:
        ids = []
        for n in range(40):
            ids += (await store.append(topic, events(str(n)))).ids
        state = await store.state(topic)
        retained = [e.id for e in (await store.read_range(topic, (0, 0), 100)).entries]
        assert 10 <= state.length <= 11 and retained == ids[-state.length :]
        assert state.trimmed_through == ids[-state.length - 1].position
    finally:
        await store.close()


@pytest.mark.parametrize("url_kind", ["embedded", "redis"])
async def test_retention_by_age_trims_old_events(
    url_kind: str, redis_server: RedisServer, topic: str
) -> None:
    store = open_store(None if url_kind == "embedded" else redis_server.url, retention_seconds=0.3)
    try:
        old = (await store.append(topic, events("old1", "old2"))).ids
        deadline = time.monotonic() + 5
        while (await store.state(topic)).first == old[0].position:
            assert time.monotonic() < deadline, "old events were never trimmed"
            await asyncio.sleep(0.1)
            await store.append(topic, events("new"))
        state = await store.state(topic)
        assert state.trimmed_through >= old[1].position
        assert all(
            e.data_text == "new" for e in (await store.read_range(topic, (0, 0), 100)).entries
        )
    finally:
        await store.close()


async def test_state_of_a_topic_without_log(store: RedisStreamStore, topic: str) -> None:
    state = await store.state(topic)
    assert (state.epoch, state.length, state.first, state.last_entry) == (None, 0, None, None)


async def test_a_lost_log_gets_a_new_epoch(store: RedisStreamStore, topic: str) -> None:
    before = (await store.append(topic, events("a"))).ids[0]
    await store._client.delete(c.log_key(topic))  # the log is lost, its meta survived
    after = (await store.append(topic, events("b"))).ids[0]
    assert after.epoch != before.epoch
    assert (await store.state(topic)).epoch == after.epoch


async def test_an_ingest_whose_log_was_lost_begins_no_new_one(
    store: RedisStreamStore, topic: str
) -> None:
    """An append told the log it must find (a streaming ingest under way) is refused,
    nothing stored, once that log is gone; and goes on while it is there."""
    first = await store.append(topic, events("a"), lines=IngestLines("K", [1]))
    epoch = first.ids[0].epoch
    lines = IngestLines("K", [2], after=1)
    second = await store.append(topic, events("b"), lines=lines, log_epoch=epoch)
    assert second.ids[0].epoch == epoch
    await store._client.delete(c.log_key(topic))  # the log is lost, its meta survived
    with pytest.raises(LogLost):
        await store.append(topic, events("c"), lines=IngestLines("K", [3], 2), log_epoch=epoch)
    assert not (await store.state(topic)).exists
    await store.append(topic, events("another"))  # a new log, by another writer
    with pytest.raises(LogLost):
        await store.append(topic, events("c"), lines=IngestLines("K", [3], 2), log_epoch=epoch)
    assert [e.data_text for e in (await store.read_range(topic, (0, 0), 10)).entries] == ["another"]


async def test_an_ingest_whose_log_was_deleted_is_told_so_and_begins_no_new_one(
    store: RedisStreamStore, topic: str
) -> None:
    """A DELETE while an ingest goes on: its next append is refused as deleted, not as a
    log lost (that one is resent, and a resend created again the topic its owner had
    deleted), nothing stored; so it is once a publish created the topic again, and
    after that log was deleted too. A log lost otherwise (expired) stays lost."""
    first = await store.append(topic, events("a"), lines=IngestLines("K", [1]))
    epoch = first.ids[0].epoch

    async def next_line() -> None:
        await store.append(topic, events("b"), lines=IngestLines("K", [2]), log_epoch=epoch)

    assert await store.delete(topic)
    with pytest.raises(LogDeleted):
        await next_line()
    with pytest.raises(LogDeleted):  # (nor closed, by ?close=true)
        await store.append(topic, [], lines=IngestLines("K", [], 1), close=True, log_epoch=epoch)
    assert not (await store.state(topic)).exists
    await store.append(topic, events("another"))  # created again, by another writer
    with pytest.raises(LogDeleted):
        await next_line()
    assert await store.delete(topic)
    await store.append(topic, events("a third"))  # (the first log: among those before)
    with pytest.raises(LogDeleted):
        await next_line()
    assert [e.data_text for e in (await store.read_range(topic, (0, 0), 10)).entries] == ["a third"]
    expired = await store.append(topic + "x", events("a"), lines=IngestLines("K", [1]))
    await store._client.delete(c.log_key(topic + "x"), c.meta_key(topic + "x"))  # (expiry)
    with pytest.raises(LogLost):
        lines = IngestLines("K", [2])
        await store.append(topic + "x", events("b"), lines=lines, log_epoch=expired.ids[0].epoch)


async def test_a_resent_line_unlike_the_one_stored_is_refused_with_its_batch(
    store: RedisStreamStore, topic: str
) -> None:
    stored = await store.append(
        topic, [NewEvent("a"), NewEvent("b", event="kind", retry=5)], lines=IngestLines("K", [1, 2])
    )
    unlike = [
        NewEvent("b2", event="kind", retry=5),
        NewEvent("b", event="other", retry=5),
        NewEvent("b", retry=5),
        NewEvent("b", event="kind"),
    ]
    for second in unlike:
        with pytest.raises(InvalidInput, match=r"^line 2: "):
            await store.append(topic, [NewEvent("a"), second], lines=IngestLines("K", [1, 2]))
    with pytest.raises(InvalidInput, match=r"^line 1: "):
        await store.append(topic, [NewEvent("a2"), NewEvent("c")], lines=IngestLines("K", [1, 3]))
    assert (await store.state(topic)).length == 2
    alike = await store.append(
        topic,
        [NewEvent("a"), NewEvent("b", event="kind", retry=5), NewEvent("c")],
        lines=IngestLines("K", [1, 2, 3]),
    )
    assert alike.ids[:2] == stored.ids and (await store.state(topic)).length == 3


async def test_an_ingest_whose_newest_lines_a_failover_lost_stores_no_more(
    store: RedisStreamStore, topic: str
) -> None:
    """A failover to a replica that had not received an ingest's lines 4-5 keeps the
    log, its epoch unchanged, without them. The ingest went on: line 6 stored after 3,
    4-5 answered but gone, and the resend stored them after 6. Now an append naming
    the line its request stored last (5) is refused, nothing stored, and so is the
    close; the resend replays 1-3 and stores 4-6 after them, in order (``replayable``)."""
    kept = [await ingest_line(store, topic, n) for n in (1, 2, 3)]
    before_4 = await IngestAppends.read(store._client, topic, "K")
    lost = [await ingest_line(store, topic, n, epoch=kept[0].epoch) for n in (4, 5)]
    await before_4.lose_since(store._client, 2)  # the failover
    with pytest.raises(LinesLost) as refused:
        await ingest_line(store, topic, 6, epoch=kept[0].epoch)
    assert refused.value.replayable
    with pytest.raises(LinesLost):
        await store.append(
            topic, [], lines=IngestLines("K", [], after=5), close=True, log_epoch=kept[0].epoch
        )
    state = await store.state(topic)
    assert (state.length, state.end) == (3, None)
    resent = await store.append(
        topic, events(*(f"l{n}" for n in range(1, 7))), lines=IngestLines("K", range(1, 7))
    )
    assert resent.ids[:3] == kept and not set(resent.ids[3:]) & set(lost)
    entries = (await store.read_range(topic, (0, 0), 10)).entries
    assert [e.data_text for e in entries] == [f"l{n}" for n in range(1, 7)]


async def test_an_ingest_whose_every_line_a_failover_lost_stores_no_more(
    store: RedisStreamStore, topic: str
) -> None:
    """A failover to a replica that had received none of an ingest's lines keeps the
    log (another writer's event), and nothing says the ingest began: no line record,
    no head, no time. Its line 3 was stored after the other event, 1-2 answered but
    gone, and the resend stored them after 3. The entry the request stored last
    (``after_entry``) is no longer in the log: refused, told not ``replayable`` (no
    record of the ingest's lines is left to replay)."""
    other = (await store.append(topic, events("other"))).ids[0]
    before_1 = await IngestAppends.read(store._client, topic, "K")
    first = await ingest_line(store, topic, 1, epoch=other.epoch)
    second = await ingest_line(store, topic, 2, epoch=other.epoch, after=first)
    await before_1.lose_since(store._client, 2)  # the failover
    with pytest.raises(LinesLost) as refused:
        await ingest_line(store, topic, 3, epoch=other.epoch, after=second)
    assert not refused.value.replayable
    assert (await store.state(topic)).length == 1
    await store.append(topic, events("l1", "l2", "l3"), lines=IngestLines("K", [1, 2, 3]))
    entries = (await store.read_range(topic, (0, 0), 10)).entries
    assert [e.data_text for e in entries] == ["other", "l1", "l2", "l3"]


async def test_an_ingest_whose_every_line_a_failover_lost_is_refused_past_half_its_window(
    windowed_store: tuple[RedisStreamStore, _RedisClock], topic: str
) -> None:
    """The same failover, the ingest's next append coming later than half the window
    after its last line. Nothing of the ingest was left to tell it live, and only a line
    stored within half the window had to be recorded: at the window's allowed minimum
    (twice the body's timeout), a pause up to 9/8 of that timeout (the idle deadline
    fires up to an eighth late), or a store slow to answer, went past it, and line 3 was
    stored after the other event, untold. The entry it stored last tells, whatever the
    window: refused."""
    store, clock = windowed_store
    now_s = int((await store._client.time())[0])  # (the entries' ids go by Redis's clock)
    await clock.set(store, now_s)
    other = (await store.append(topic, events("other"))).ids[0]
    before_1 = await IngestAppends.read(store._client, topic, "K")
    first = await ingest_line(store, topic, 1, epoch=other.epoch)
    second = await ingest_line(store, topic, 2, epoch=other.epoch, after=first)
    await before_1.lose_since(store._client, 2)  # the failover
    await clock.set(store, now_s + 40)  # two thirds of the window after line 2
    with pytest.raises(LinesLost):
        await ingest_line(store, topic, 3, epoch=other.epoch, after=second)
    assert (await store.state(topic)).length == 1


async def test_an_ingest_without_a_key_whose_newest_lines_a_failover_lost_stores_no_more(
    store: RedisStreamStore, topic: str
) -> None:
    """No Idempotency-Key, so no line records: each append names the entry its request
    stored last (``after_entry``), which must still be in the log. A failover that lost
    lines 4-5 let line 6 be stored after 3, in silence; now it is refused, nothing
    stored, and so is the close."""
    kept = [await keyless_line(store, topic, 1)]
    for n in (2, 3):
        kept.append(await keyless_line(store, topic, n, after=kept[-1]))
    before_4 = await IngestAppends.read(store._client, topic, None)
    lost = [await keyless_line(store, topic, 4, after=kept[-1])]
    lost.append(await keyless_line(store, topic, 5, after=lost[-1]))
    await before_4.lose_since(store._client, 2)  # the failover
    with pytest.raises(LinesLost):
        await keyless_line(store, topic, 6, after=lost[-1])
    with pytest.raises(LinesLost):
        await store.append(
            topic, [], close=True, log_epoch=kept[0].epoch, after_entry=lost[-1].position
        )
    state = await store.state(topic)
    assert (state.length, state.end) == (3, None)
    # (an ingest whose last entry is kept goes on)
    assert (await keyless_line(store, topic, 4, after=kept[-1])).epoch == kept[0].epoch


@pytest.mark.parametrize("url_kind", ["embedded", "redis"])
async def test_an_ingest_without_a_key_goes_on_after_retention_removed_its_last_entry(
    url_kind: str, redis_server: RedisServer, topic: str
) -> None:
    """Retention is no loss: the entry an ingest stored last, trimmed since (MAXLEN 1,
    another writer's events after it), does not stop it. Its own appends never trim it:
    the newest entry stays."""
    url = None if url_kind == "embedded" else redis_server.url
    store = open_store(url, retention_maxlen=1)
    try:
        last = await keyless_line(store, topic, 1)
        for n in range(2, 40):  # (past the trim slack: each append trims)
            last = await keyless_line(store, topic, n, after=last)
        for n in range(40):
            await store.append(topic, events(f"other{n}"))
        assert (await store.state(topic)).trimmed_through >= last.position
        after = await keyless_line(store, topic, 40, after=last)
        assert after.epoch == last.epoch
    finally:
        await store.close()


async def keyless_line(
    store: RedisStreamStore, topic: str, n: int, after: EventId | None = None
) -> EventId:
    """Line n of an ingest without an Idempotency-Key, appended as the ingest appends it:
    in the log of its first line, after the entry it stored last (``after``)."""
    epoch = after.epoch if after is not None else None
    position = after.position if after is not None else (0, 0)
    result = await store.append(topic, events(f"l{n}"), log_epoch=epoch, after_entry=position)
    return result.ids[0]


async def ingest_line(
    store: RedisStreamStore, topic: str, n: int, epoch: str = "", after: EventId | None = None
) -> EventId:
    """Line n of the ingest keyed K, appended as the ingest appends it (after line n-1,
    stored as ``after``)."""
    position = (0, 0) if after is None else after.position
    lines = IngestLines("K", [n], after=n - 1)
    result = await store.append(
        topic, events(f"l{n}"), lines=lines, log_epoch=epoch or None, after_entry=position
    )
    return result.ids[0]


async def test_read_live_waits_for_new_entries(store: RedisStreamStore, topic: str) -> None:
    start = (await store.append(topic, events("old"))).ids[0].position
    read = asyncio.create_task(store.read_live({topic: start}, 5000))
    await asyncio.sleep(0.05)  # time for the read to answer, were it not waiting
    assert not read.done(), "the read did not wait: nothing new was appended yet"
    new = (await store.append(topic, events("new"))).ids[0]
    batches = await asyncio.wait_for(read, 5)
    assert [e.id for e in batches[topic]] == [new]


async def test_interrupt_ends_a_waiting_live_read(store: RedisStreamStore, topic: str) -> None:
    read = asyncio.create_task(store.read_live({topic: (0, 0)}, 30_000))
    deadline = time.monotonic() + 5
    while not await store.interrupt_live_read():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert await asyncio.wait_for(read, 5) == {}


async def test_an_unreachable_redis_fails_fast(topic: str) -> None:
    store = open_store(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.append(topic, events("a")), 10)
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.close()


async def test_identical_concurrent_reads_share_one_round_trip(
    store: RedisStreamStore, topic: str
) -> None:
    await store.append(topic, events("a", "b"))
    calls = 0
    original = store._read_range

    async def counting(*args: object) -> object:
        nonlocal calls
        calls += 1
        return await original(*args)  # type: ignore[arg-type]

    store._read_range = counting  # type: ignore[method-assign]
    pages = await asyncio.gather(*(store.read_range(topic, (0, 0), 10) for _ in range(50)))
    assert calls == 1 and all(page is pages[0] for page in pages)


async def test_appends_survive_a_script_cache_flush(store: RedisStreamStore, topic: str) -> None:
    """Redis restarted (or SCRIPT FLUSH): the pipelined appends reload their script."""
    await store.append(topic, events("a"))
    await store._client.script_flush()
    results = await asyncio.gather(*(store.append(topic, events(str(n))) for n in range(20)))
    assert len({r.ids[0] for r in results}) == 20
    assert (await store.state(topic)).length == 21


async def test_concurrent_appends_keep_each_answer_apart(
    store: RedisStreamStore, topic: str
) -> None:
    results = await asyncio.gather(
        *(
            store.append(f"{topic}-{n % 3}", events(str(n)), idempotency_key=f"k{n}")
            for n in range(60)
        )
    )
    for n, result in enumerate(results):
        [entry] = [e for e in (await store.read_range(f"{topic}-{n % 3}", (0, 0), 100)).entries
                   if e.id == result.ids[0]]  # fmt: skip
        assert entry.data_text == str(n)


async def test_a_read_asked_after_another_was_sent_reads_anew(
    store: RedisStreamStore, topic: str
) -> None:
    """Coalescing never hands a caller a result read before it asked.

    (A subscriber reads after attaching to the live reader; an older result could
    miss an event the live reader had already dispatched before it attached.)
    """
    await store.append(topic, events("a"))
    held, first_ran = asyncio.Event(), asyncio.Event()
    original = store._read_range
    calls = 0

    async def slow_reply(*args: object) -> object:
        nonlocal calls
        calls += 1
        call = calls
        result = await original(*args)  # type: ignore[arg-type]
        if call == 1:
            first_ran.set()
            await held.wait()  # the first read has run in Redis; its reply is late
        return result

    store._read_range = slow_reply  # type: ignore[method-assign]
    first = asyncio.create_task(store.read_range(topic, (0, 0), 10))
    # Until the first read has run, not only been asked: under load its command waited
    # (for a connection) past the append of b on the appends' own connection, and read
    # b too (seen twice in two runs of this file under stress-ng).
    await asyncio.wait_for(first_ran.wait(), 5)
    await store.append(topic, events("b"))
    second = asyncio.create_task(store.read_range(topic, (0, 0), 10))
    await await_until(lambda: calls >= 2, timeout=5, what="a second read sent")
    held.set()
    assert [e.data_text for e in (await second).entries] == ["a", "b"]
    assert [e.data_text for e in (await first).entries] == ["a"]


class _RedisClock:
    """The append script (and keep_lines.lua) with Redis's clock replaced by a key the
    test sets (seconds): a clock stepped back (NTP, a restart or failover onto a host
    behind), or time passing, on a real redis-server. Single Redis only (the key is not
    among the script's KEYS)."""

    KEY = "test:append-clock"
    TIME = "local time = redis.call('TIME')"
    SCRIPTS = ("append.lua", "keep_lines.lua")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = redis_scripts._lua

        def stepped(name: str) -> str:
            text = original(name)
            if name not in self.SCRIPTS:
                return text
            assert self.TIME in text, f"{name} no longer reads TIME this way"
            return text.replace(self.TIME, f"local time = {{redis.call('GET', '{self.KEY}'), '0'}}")

        monkeypatch.setattr(redis_scripts, "_lua", stepped)

    async def set(self, store: RedisStreamStore, seconds: int) -> None:
        await store._client.set(self.KEY, seconds)


@pytest.fixture
async def windowed_store(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[RedisStreamStore, _RedisClock]]:
    """A store with a 60 s idempotency window (topics kept an hour) on a Redis whose
    clock the test sets (``_RedisClock``): the window's edges without waiting for them."""
    clock = _RedisClock(monkeypatch)
    store = open_store(redis_server.url, idempotency_seconds=60, topic_ttl_seconds=3600)
    try:
        yield store, clock
    finally:
        await store._client.delete(_RedisClock.KEY)
        await store.close()


async def test_an_ingest_resent_after_redis_clock_stepped_back_stores_nothing_twice(
    redis_server: RedisServer, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Line records were matched to their ingest by their write time (at or after the
    ingest began): lines written after Redis's clock stepped back were not the
    ingest's, and the producer's next resend stored them again."""
    clock = _RedisClock(monkeypatch)
    store = open_store(redis_server.url)
    numbers = list(range(1, 11))
    ten = events(*(f"l{n}" for n in numbers))
    try:
        await clock.set(store, 2_000_000_000)
        first = await store.append(topic, ten[:5], lines=IngestLines("K", numbers[:5]))
        await clock.set(store, 2_000_000_000 - 600)  # ten minutes back
        broken = await store.append(topic, ten, lines=IngestLines("K", numbers))
        again = await store.append(topic, ten, lines=IngestLines("K", numbers))
        assert broken.ids[:5] == first.ids
        assert again.replayed and again.ids == broken.ids
        assert (await store.state(topic)).length == 10
    finally:
        await store._client.delete(_RedisClock.KEY)
        await store.close()


async def test_a_new_ingest_under_a_key_after_the_clock_stepped_back_is_a_new_one(
    windowed_store: tuple[RedisStreamStore, _RedisClock], topic: str
) -> None:
    """An ingest under a key whose last line is past the window is a new one: the old
    one's records never answer it, and the lines it writes after the clock stepped
    back are its own (resent, they are stored once)."""
    store, clock = windowed_store
    await clock.set(store, 2_000_000_000)
    old = await store.append(topic, events("o1", "o2"), lines=IngestLines("K", [1, 2]))
    await clock.set(store, 2_000_000_000 + 120)  # past the window ...
    new = await store.append(topic, events("n1"), lines=IngestLines("K", [1]))
    await clock.set(store, 2_000_000_000 - 600)  # ... and then ten minutes back
    more = await store.append(topic, events("n2"), lines=IngestLines("K", [2], after=1))
    again = await store.append(topic, events("n1", "n2"), lines=IngestLines("K", [1, 2]))
    assert not new.replayed and not more.replayed
    assert not set(new.ids + more.ids) & set(old.ids)
    assert again.replayed and again.ids == new.ids + more.ids  # (resent: stored once)
    assert (await store.state(topic)).length == 4


async def test_a_log_that_lost_entries_never_issues_their_ids_again(
    redis_server: RedisServer, topic: str
) -> None:
    """A log back from an older copy (a failover, an AOF's lost second) issued new ids
    from its last kept entry: a primary whose clock was behind gave new events the
    lost events' ids, and a client holding one resumed after the wrong event, passing
    the rest in silence. Once a live reader finds the loss, the log's next id is past
    everything it read, whatever the clock."""
    store = open_store(redis_server.url)
    admin = store._client
    try:
        kept = await store.append(topic, events(*"abcde"))
        copy = await admin.dump(c.log_key(topic))
        lost = await store.append(topic, events(*"fghij"))
        await admin.restore(c.log_key(topic), 0, copy, replace=True)
        state = await store.revalidate(topic, kept.ids[0].epoch, lost.ids[-1].position)
        assert state.lost_after == kept.ids[-1].position
        info = await admin.xinfo_stream(c.log_key(topic))
        assert parse_stream_id(info["last-generated-id"]) >= lost.ids[-1].position
    finally:
        await store.close()


async def test_an_ingest_that_paused_past_its_window_is_refused_nothing_recorded(
    windowed_store: tuple[RedisStreamStore, _RedisClock], topic: str
) -> None:
    """An ingest whose last line is past the window (Redis's clock moved on: its records
    not kept meanwhile, or the clock stepped forward) finds the line it stored last
    unrecorded, nothing of its log lost. It went on, its line 2 recorded anew under its
    key as a new ingest's, and the whole stream resent with the key stored line 1 twice,
    silently. Now it is refused (``RecordsLapsed``), nothing stored nor recorded."""
    store, clock = windowed_store
    await clock.set(store, 2_000_000_000)
    first = await ingest_line(store, topic, 1)
    await clock.set(store, 2_000_000_000 + 120)  # past the window
    records = await line_records(store, topic)
    with pytest.raises(RecordsLapsed):
        await ingest_line(store, topic, 2, epoch=first.epoch, after=first)
    assert await line_records(store, topic) == records
    assert (await store.state(topic)).length == 1


async def test_an_ingest_past_its_window_is_refused_where_its_key_began_anew(
    windowed_store: tuple[RedisStreamStore, _RedisClock], topic: str
) -> None:
    """An ingest paused past the window while another stream under its key began a new
    ingest of it (its lines 1-2 recorded anew): the paused one found that stream's line 2
    recorded where its own had been, and stored its line 3 in the new ingest, after the
    other's line 2 (the two differing there): two streams mixed, both answered. It is
    refused (``RecordsLapsed``), as without the other, nothing stored."""
    store, clock = windowed_store
    await clock.set(store, 2_000_000_000)
    paused = await store.append(topic, events("a1", "a2"), lines=IngestLines("K", [1, 2]))
    await clock.set(store, 2_000_000_000 + 120)  # past the window
    await store.append(topic, events("a1", "b2"), lines=IngestLines("K", [1, 2]))
    with pytest.raises(RecordsLapsed):
        await ingest_line(store, topic, 3, epoch=paused.ids[0].epoch, after=paused.ids[1])
    entries = (await store.read_range(topic, (0, 0), 10)).entries
    assert [e.data_text for e in entries] == ["a1", "a2", "a1", "b2"]


async def test_an_ingest_past_its_window_is_told_lapsed_not_lost_where_its_key_began_anew(
    windowed_store: tuple[RedisStreamStore, _RedisClock], topic: str
) -> None:
    """As above, the other stream's ingest not (yet) at the line the paused one stored
    last: the paused one was told its lines were lost (``LinesLost``, a failover's
    answer: resend the whole stream), every line of it still in the log, and its resend
    stored them again in the new ingest. Its records lapsed (``RecordsLapsed``)."""
    store, clock = windowed_store
    await clock.set(store, 2_000_000_000)
    paused = await store.append(topic, events("a1", "a2"), lines=IngestLines("K", [1, 2]))
    await clock.set(store, 2_000_000_000 + 120)  # past the window
    await store.append(topic, events("a1"), lines=IngestLines("K", [1]))
    with pytest.raises(RecordsLapsed):
        await ingest_line(store, topic, 3, epoch=paused.ids[0].epoch, after=paused.ids[1])
    entries = (await store.read_range(topic, (0, 0), 10)).entries
    assert [e.data_text for e in entries] == ["a1", "a2", "a1"]


async def test_an_ingest_past_its_window_whose_last_entry_retention_trimmed_is_told_lapsed(
    redis_server: RedisServer, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, its line 2's entry trimmed since by retention (MAXLEN 1, other writers'
    events after it), which is no loss: it was told its lines lost (a resend of the whole
    stream, the other's ingest recording line 1 only, stored line 2 twice) because its
    entry was not in the log. Its records lapsed (``RecordsLapsed``), as where no other
    stream began an ingest under its key."""
    clock = _RedisClock(monkeypatch)
    store = open_store(
        redis_server.url, idempotency_seconds=60, topic_ttl_seconds=3600, retention_maxlen=1
    )
    try:
        await clock.set(store, 2_000_000_000)
        paused = await store.append(topic, events("a1", "a2"), lines=IngestLines("K", [1, 2]))
        await clock.set(store, 2_000_000_000 + 120)  # past the window
        await store.append(topic, events("a1"), lines=IngestLines("K", [1]))
        for n in range(40):  # (past the trim slack: each append trims)
            await store.append(topic, events(f"other{n}"))
        assert (await store.state(topic)).trimmed_through >= paused.ids[1].position
        with pytest.raises(RecordsLapsed):
            await ingest_line(store, topic, 3, epoch=paused.ids[0].epoch, after=paused.ids[1])
    finally:
        await store._client.delete(_RedisClock.KEY)
        await store.close()


@pytest.mark.parametrize("other_sent", [["a1"], ["a1", "a2", "b3"]])
async def test_an_ingest_past_its_window_ending_on_blank_lines_leaves_its_keys_new_ingest_alone(
    windowed_store: tuple[RedisStreamStore, _RedisClock], topic: str, other_sent: list[str]
) -> None:
    """An ingest paused past the window while another stream under its key began a new
    ingest of it, then its body ended on blank lines (3-4): its end's check, which stores
    nothing, counted them in the other's ingest, which was then refused at its own line 2
    (the same stream resent: 400, a line where blank ones were counted); or, the other
    past them (a line 3), it was refused itself (400) though every line of it was stored.
    Its end is answered as without the other (its records lapsed: nothing to check its
    blank lines against, nothing counted), and the other goes on."""
    store, clock = windowed_store
    await clock.set(store, 2_000_000_000)
    paused = await store.append(topic, events("a1", "a2"), lines=IngestLines("K", [1, 2]))
    epoch = paused.ids[0].epoch
    await clock.set(store, 2_000_000_000 + 120)  # past the window
    other = await store.append(
        topic, events(*other_sent), lines=IngestLines("K", range(1, len(other_sent) + 1))
    )
    ended = await store.append(
        topic,
        [],
        lines=IngestLines("K", [], after=2, blank_through=4),
        log_epoch=epoch,
        after_entry=paused.ids[1].position,
    )
    assert ended.ids == []
    on = len(other_sent) + 1
    await store.append(
        topic,
        events(f"a{on}"),
        lines=IngestLines("K", [on], after=on - 1),
        log_epoch=epoch,
        after_entry=other.ids[-1].position,
    )
    entries = (await store.read_range(topic, (0, 0), 10)).entries
    assert [e.data_text for e in entries] == ["a1", "a2", *other_sent, f"a{on}"]


async def test_a_line_a_failover_lost_stored_again_by_another_stream_is_told_replayable(
    store: RedisStreamStore, topic: str
) -> None:
    """Two streams under one key, open at once (a retry while the first still lives): a
    failover lost the first one's line 2, and the other stored its line 2 since (the
    ingest under way records it, under another id). The first one's next append is
    refused, as its line 2 is lost; and told ``replayable``, not told that no record is
    left to replay (then its producer sent line 2 on as a stream of its own: stored
    twice): the resend of its whole stream replays lines 1-2 and stores line 3, once."""
    first = await ingest_line(store, topic, 1)
    before_2 = await IngestAppends.read(store._client, topic, "K")
    second = await ingest_line(store, topic, 2, epoch=first.epoch, after=first)
    await before_2.lose_since(store._client, 1)  # the failover
    retry = await store.append(topic, events("l1", "l2"), lines=IngestLines("K", [1, 2]))
    assert retry.ids[0] == first and retry.ids[1] != second
    with pytest.raises(LinesLost) as refused:
        await ingest_line(store, topic, 3, epoch=first.epoch, after=second)
    assert refused.value.replayable
    resent = await store.append(topic, events("l1", "l2", "l3"), lines=IngestLines("K", [1, 2, 3]))
    assert resent.ids[:2] == retry.ids
    entries = (await store.read_range(topic, (0, 0), 10)).entries
    assert [e.data_text for e in entries] == ["l1", "l2", "l3"]


async def test_an_ingest_whose_records_lapsed_sends_the_rest_as_a_stream_of_its_own(
    store: RedisStreamStore, topic: str
) -> None:
    """The records of an open ingest lapsed under it, its entry still in the log (here:
    its last write's time set back past the window, as a failover can bring it back).
    Its next line is refused, nothing stored nor recorded; not its close (no line is
    recorded anew: every line of it is stored). The rest sent as a stream of its own
    under the same key is a new ingest of it: resent, it is replayed, each line once."""
    first = await ingest_line(store, topic, 1)
    await store._client.zadd(c.line_times_key(topic), {"K": 0})  # (the records lapse)
    records = await line_records(store, topic)
    with pytest.raises(RecordsLapsed):
        await ingest_line(store, topic, 2, epoch=first.epoch, after=first)
    assert await line_records(store, topic) == records
    rest = IngestLines("K", [1])  # (line 2, the rest's line 1)
    once = await store.append(topic, events("l2"), lines=rest)
    again = await store.append(topic, events("l2"), lines=rest)
    assert again.replayed and again.ids == once.ids
    entries = (await store.read_range(topic, (0, 0), 10)).entries
    assert [e.data_text for e in entries] == ["l1", "l2"]


async def test_the_close_of_an_ingest_whose_records_lapsed_is_done(
    store: RedisStreamStore, topic: str
) -> None:
    """Its body ended, every line of it stored: the close records no line, and is done."""
    first = await ingest_line(store, topic, 1)
    await store._client.zadd(c.line_times_key(topic), {"K": 0})  # (the records lapse)
    closed = await store.append(
        topic,
        [],
        lines=IngestLines("K", [], after=1),
        close=True,
        log_epoch=first.epoch,
        after_entry=first.position,
    )
    assert closed.end_id is not None
    assert (await store.state(topic)).end == closed.end_id.position


async def test_an_ingest_whose_records_lapsed_on_a_closed_topic_is_told_closed(
    store: RedisStreamStore, topic: str
) -> None:
    """As above, the topic closed meanwhile (by another producer). Its next line was
    refused as lapsed (``RecordsLapsed``), its producer sent the rest under K+n, and only
    then was it told the topic closed. None of its lines can be found a replay (its
    records lapsed) and the topic refuses anything new: it is told so at once
    (``TopicClosed``), nothing stored nor recorded."""
    first = await ingest_line(store, topic, 1)
    end = (await store.append(topic, [], close=True)).end_id
    await store._client.zadd(c.line_times_key(topic), {"K": 0})  # (the records lapse)
    records = await line_records(store, topic)
    with pytest.raises(TopicClosed) as refused:
        await ingest_line(store, topic, 2, epoch=first.epoch, after=first)
    assert refused.value.end_id == str(end)
    assert await line_records(store, topic) == records
    entries = (await store.read_range(topic, (0, 0), 10)).entries
    assert [e.event_type for e in entries][1:] == ["broker.end"]


@pytest.mark.parametrize("lapsed", [False, True], ids=["lost", "lost, records lapsed"])
async def test_lines_a_failover_lost_on_a_closed_topic_are_still_told_lost(
    store: RedisStreamStore, topic: str, lapsed: bool
) -> None:
    """A failover lost line 2 of an ingest, then the topic was closed: its next line is
    told the line lost (``LinesLost``), not only the topic closed (it took line 2 for
    stored); its resend is then told the topic closed."""
    first = await ingest_line(store, topic, 1)
    before_2 = await IngestAppends.read(store._client, topic, "K")
    second = await ingest_line(store, topic, 2, epoch=first.epoch, after=first)
    await before_2.lose_since(store._client, 1)  # the failover
    await store.append(topic, [], close=True)
    if lapsed:
        await store._client.zadd(c.line_times_key(topic), {"K": 0})
    with pytest.raises(LinesLost) as refused:
        await ingest_line(store, topic, 3, epoch=first.epoch, after=second)
    assert refused.value.replayable is not lapsed
    with pytest.raises(TopicClosed):
        await store.append(topic, events("l1", "l2", "l3"), lines=IngestLines("K", [1, 2, 3]))


async def line_records(store: RedisStreamStore, topic: str) -> tuple[object, object]:
    """The topic's ingests' line records, and when each ingest last wrote."""
    client = store._client
    lines = await client.hgetall(c.line_records_key(topic))
    written = await client.zrange(c.line_times_key(topic), 0, -1, withscores=True)
    return lines, written


async def test_an_open_ingests_lines_kept_answer_past_the_window_after_its_last_line(
    windowed_store: tuple[RedisStreamStore, _RedisClock], topic: str
) -> None:
    """An ingest open past the window after its last line (blank lines, or a line in
    slow pieces, keep its body going) had its records lapse: its resend stored its lines
    again. Kept (``keep_lines``, its watch's) within the window, they answer a window
    after the keeping: the resend replays them."""
    store, clock = windowed_store
    await clock.set(store, 2_000_000_000)
    first = await store.append(topic, events("l1", "l2"), lines=IngestLines("K", [1, 2]))
    await clock.set(store, 2_000_000_000 + 45)
    assert await store.keep_lines(topic, "K", first.ids[0].epoch)
    await clock.set(store, 2_000_000_000 + 90)  # past the window after line 2
    again = await store.append(topic, events("l1", "l2", "l3"), lines=IngestLines("K", [1, 2, 3]))
    assert again.ids[:2] == first.ids
    assert (await store.state(topic)).length == 3


async def test_lapsed_line_records_are_not_kept(
    windowed_store: tuple[RedisStreamStore, _RedisClock], topic: str
) -> None:
    """Records past the window answer no more (a prune may have taken part of them):
    ``keep_lines`` does not make them answer again, and writes nothing."""
    store, clock = windowed_store
    await clock.set(store, 2_000_000_000)
    first = await store.append(topic, events("l1"), lines=IngestLines("K", [1]))
    await clock.set(store, 2_000_000_000 + 61)
    assert not await store.keep_lines(topic, "K", first.ids[0].epoch)
    assert await store._client.zscore(c.line_times_key(topic), "K") == 2_000_000_000_000


async def test_line_records_lost_or_of_another_log_are_not_kept(
    store: RedisStreamStore, topic: str
) -> None:
    """Nothing is begun by ``keep_lines``: not for an ingest whose every line a failover
    lost (its next append is told so: d50d2f9), nor for one whose log is another."""
    other = (await store.append(topic, events("other"))).ids[0]
    before_1 = await IngestAppends.read(store._client, topic, "K")
    await ingest_line(store, topic, 1, epoch=other.epoch)
    await ingest_line(store, topic, 2, epoch=other.epoch)
    await before_1.lose_since(store._client, 2)  # the failover
    assert not await store.keep_lines(topic, "K", other.epoch)
    assert await store._client.zscore(c.line_times_key(topic), "K") is None
    assert await store._client.hget(c.line_records_key(topic), "K\n") is None
    await ingest_line(store, topic, 1, epoch=other.epoch)
    assert not await store.keep_lines(topic, "K", "another-epoch")


async def test_keeping_line_records_leaves_the_topics_expiry(
    store_url: str | None, topic: str
) -> None:
    """A topic with a TTL still expires whole when nobody publishes to it for the TTL,
    its ingest open or not (its next append is told its log was lost): keeping its lines
    extends no key's expiry. A topic kept for good keeps them for the window."""
    ttl_topic = topic + ".ttl"
    store = open_store(store_url, topic_policies=[TopicPolicy("*.ttl", ttl_seconds=3600)])
    try:
        await _keeping_leaves_the_expiry(store, topic, ttl_topic)
    finally:
        await store.close()


async def test_a_blank_end_leaves_its_records_the_topics_expiry(
    store_url: str | None, topic: str
) -> None:
    """A keyed body of blank lines only, on a topic with a TTL some time after its last
    publish: the records it begins expire with the log, not a whole TTL from then (the
    topic expired, they stayed on, the rest of it gone)."""
    ttl_topic = topic + ".ttl"
    store = open_store(store_url, topic_policies=[TopicPolicy("*.ttl", ttl_seconds=3600)])
    client = store._client
    try:
        await store.append(ttl_topic, events("before"))
        for key in c.topic_keys(ttl_topic):  # (some time after the last publish)
            await client.pexpire(key, 5_000)
        blank = IngestLines("K", [], 0, blank_through=3)
        assert (await store.append(ttl_topic, [], lines=blank)).ids == []
        assert await client.hget(c.line_records_key(ttl_topic), "K\nh")  # (recorded)
        for key in c.topic_keys(ttl_topic):  # (-2: a key not there, such as its idem)
            left = await client.pttl(key)
            assert left == -2 or 0 < left <= 5_000, (key, left)
    finally:
        await store.close()


async def _keeping_leaves_the_expiry(store: RedisStreamStore, topic: str, ttl_topic: str) -> None:
    client = store._client
    kept = await store.append(ttl_topic, events("l1"), lines=IngestLines("K", [1]))
    keys = c.topic_keys(ttl_topic)
    for key in keys:  # (some time after the last publish)
        await client.pexpire(key, 5_000)
    assert await store.keep_lines(ttl_topic, "K", kept.ids[0].epoch)
    for key in (keys[0], keys[1], keys[4], keys[5]):
        assert 0 < await client.pttl(key) <= 5_000, key
    for_good = await store.append(topic, events("l1"), lines=IngestLines("K", [1]))
    for key in (c.line_records_key(topic), c.line_times_key(topic)):
        await client.pexpire(key, 5_000)
    assert await store.keep_lines(topic, "K", for_good.ids[0].epoch)
    assert await client.pttl(c.log_key(topic)) == -1
    for key in (c.line_records_key(topic), c.line_times_key(topic)):
        assert await client.pttl(key) > 5_000, key
