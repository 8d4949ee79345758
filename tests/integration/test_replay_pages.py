"""Pages of a log of large events: what they hold, and what Redis reads to build them.

A page was read with one ``XRANGE ... COUNT 500`` (1000 for a history page) and only
then cut to its bytes: with events of 60 KB a page kept about 8 of them, but Redis read
and copied all 500 (30 MB) to build it. lua/range.lua now reads in steps sized to the
bytes left; these tests hold it to the pages it gave before, and to the work.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from redis.asyncio.client import Monitor

from broker import NewEvent
from broker import constants as c
from broker.ids import StreamPosition
from broker.model import LogEntry, LogPage
from broker.redis_open import open_store
from broker.redis_store import RedisStreamStore
from tests.support.redis_server import RedisServer

LARGE = 60_000
LARGE_EVENTS = 300
RESUMED_AFTER = 99  # a place in the middle of the log
HISTORY_LIMIT = 1000  # api/routes.py's HISTORY_MAX_LIMIT
SUBSCRIBER_PAGE_BYTES = c.DEFAULT_SUBSCRIBER_BUFFER_BYTES // 2  # Subscription's page
MONITOR_LINES = 10_000  # far more than one page's commands: a bound, never reached


def entry_bytes(entry: LogEntry) -> int:
    """What range.lua counts of an entry against a page's bound: its fields, names and
    values."""
    return sum(len(name) + len(value) for name, value in entry.fields.items())


def cut_as_before(whole: list[LogEntry], most: int) -> tuple[list[LogEntry], bool]:
    """The page the script gave when it read all ``count`` entries at once and then cut
    them: the longest run within ``most`` bytes, one entry at least; cut if shorter."""
    total = 0
    for index, entry in enumerate(whole):
        total += entry_bytes(entry)
        if total > most and index > 0:
            return whole[:index], True
    return whole, False


async def append_large(store: RedisStreamStore, topic: str, count: int) -> list[StreamPosition]:
    """``count`` events of about 60 KB, numbered in their data, in batches under 1 MiB."""
    positions: list[StreamPosition] = []
    for first in range(0, count, 15):
        batch = [NewEvent(f'"{n:04d}{"x" * LARGE}"') for n in range(first, min(first + 15, count))]
        positions += [event_id.position for event_id in (await store.append(topic, batch)).ids]
    return positions


async def append_mixed(store: RedisStreamStore, topic: str) -> None:
    """Runs of tiny and of large events, and single large ones among tiny ones, so that
    the sizes a page has read so far mislead it about the next ones both ways."""
    sizes = random.Random(7).choices([8, 40, 1_500, 4_000], weights=[6, 2, 2, 1], k=40)
    sizes += [10] * 12 + [3_000] * 6 + [20] * 10 + [5_000, 9] * 4
    for size in sizes:
        await store.append(topic, [NewEvent(f'"{"y" * size}"')])


@pytest.mark.parametrize("most", [200, 1_000, 4_500, 9_000, 60_000])
@pytest.mark.parametrize("count", [3, 500])
async def test_a_page_read_in_steps_is_the_page_read_at_once(
    store: RedisStreamStore, topic: str, count: int, most: int
) -> None:
    """From every place in a log of mixed sizes, on both stores (fakeredis runs the same
    Lua, with the same ``(id`` starts): the same entries, in order, and ``cut`` exactly
    when the page stopped for its bytes, as when the script read all at once."""
    await append_mixed(store, topic)
    origin = (0, 0)
    whole_log = (await store.read_range(topic, origin, 10_000, 0)).entries
    for after in [origin, *(entry.position for entry in whole_log[::3])]:
        whole = (await store.read_range(topic, after, count, 0)).entries
        expected, cut = cut_as_before(whole, most)
        page = await store.read_range(topic, after, count, most)
        assert [e.position for e in page.entries] == [e.position for e in expected], after
        assert page.cut_short == cut, after


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisStreamStore]:
    store = open_store(redis_server.url)
    yield store
    await store.close()


@pytest.mark.parametrize(
    ("count", "most"),
    [
        (c.REPLAY_PAGE_SIZE, c.REPLAY_PAGE_MIN_BYTES),  # a replay, a small buffer
        (c.REPLAY_PAGE_SIZE, SUBSCRIBER_PAGE_BYTES),  # a replay, the default buffer
        (HISTORY_LIMIT, c.REPLAY_PAGE_BYTES),  # a history page of ?limit=1000
    ],
)
async def test_a_page_of_large_events_makes_redis_read_about_what_it_keeps(
    redis_store: RedisStreamStore, redis_server: RedisServer, topic: str, count: int, most: int
) -> None:
    """The entries the script asks Redis for (the COUNTs of its XRANGEs, seen by
    MONITOR, which shows a script's commands) are at most twice what the page keeps,
    and two: read at once, they were all ``count`` of them, 30 MB for 8 events kept.
    Paging from a place in the middle reaches each event after it once, in order."""
    positions = await append_large(redis_store, topic, LARGE_EVENTS)
    after, seen = positions[RESUMED_AFTER], []
    async with redis.Redis.from_url(redis_server.url) as admin, admin.monitor() as monitor:
        for page_number in range(LARGE_EVENTS):
            page = await redis_store.read_range(topic, after, count, most)
            asked = await _entries_asked(monitor, admin, topic, page_number)
            assert asked <= 2 * len(page.entries) + 2, (page_number, asked, len(page.entries))
            seen += page.entries
            if _is_last(page, count):
                break
            after = page.entries[-1].position
    assert [entry.position for entry in seen] == positions[RESUMED_AFTER + 1 :]
    numbers = [int(entry.data[1:5]) for entry in seen]  # '"0100xxx..."'
    assert numbers == list(range(RESUMED_AFTER + 1, LARGE_EVENTS))


def _is_last(page: LogPage, count: int) -> bool:
    """Whether a replay stops after this page (as Subscription._replay_topic decides)."""
    return len(page.entries) < count and not page.cut_short


async def _entries_asked(monitor: Monitor, admin: redis.Redis, topic: str, page: int) -> int:
    """The sum of the COUNTs of the XRANGEs scripts ran on ``topic``'s log since the
    last call: up to a marker sent after the read, since MONITOR shows commands in the
    order the server ran them."""
    marker = f"page-read-{page}"
    await admin.echo(marker)
    log, asked = c.log_key(topic), 0
    async with asyncio.timeout(10):
        for _ in range(MONITOR_LINES):
            seen = await monitor.next_command()
            words = seen["command"].split()
            if words[0].upper() == "ECHO" and words[1:] == [marker]:
                return asked
            if seen["client_type"] == "lua" and words[:2] == ["XRANGE", log] and "COUNT" in words:
                asked += int(words[words.index("COUNT") + 1])
    raise AssertionError(f"MONITOR never showed {marker}")
