"""The Sentinel store's watch of the primary (``broker.redis_primary``), on fake Sentinels:
it moves on a majority's word only, and goes on whatever a drop raised."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError

from broker.redis_primary import PrimaryWatch, WatchedSentinelPool

OLD, NEW = ("10.0.0.1", 6379), ("10.0.0.2", 6379)
HANGS = ("hangs", 0)


class FakeSentinel:
    """One Sentinel: names ``view`` (None: does not answer)."""

    def __init__(self, view: tuple[str, int] | None) -> None:
        self.view = view
        self.asked = 0

    async def sentinel_master(self, service: str) -> dict[str, Any]:
        assert service == "mymaster"
        self.asked += 1
        if self.view == HANGS:
            await asyncio.sleep(60)
        if self.view is None:
            raise ConnectionError("down")
        host, port = self.view
        state = {"ip": host, "port": port, "is_master": True, "is_sdown": False}
        return state | {"is_odown": False, "num-other-sentinels": 2}


def watch_of(*views: tuple[str, int] | None) -> tuple[PrimaryWatch, list[FakeSentinel]]:
    sentinel = Sentinel([])  # type: ignore[no-untyped-call]
    fakes = [FakeSentinel(view) for view in views]
    sentinel.sentinels = fakes  # type: ignore[assignment]
    return PrimaryWatch(sentinel, "mymaster", interval_s=0.01), fakes


async def run_a_while(watch: PrimaryWatch, moved: Any, turns: int = 10) -> None:
    task = asyncio.create_task(watch.run(moved))
    await asyncio.sleep(0.01 * turns)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_majority_naming_another_primary_moves_once() -> None:
    watch, fakes = watch_of(OLD, OLD, OLD)
    moves: list[tuple[str, int] | None] = []

    async def moved() -> None:
        moves.append(watch.primary)

    task = asyncio.create_task(watch.run(moved))
    await asyncio.sleep(0.05)
    for fake in fakes[:2]:
        fake.view = NEW
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert moves == [NEW] and watch.primary == NEW  # once, to the new one


@pytest.mark.parametrize(
    "views",
    [(NEW, OLD, OLD), (NEW, None, None), (NEW, OLD, None)],
    ids=["one-of-three", "one-answers", "a-tie"],
)
async def test_no_majority_moves_nothing(views: tuple[Any, ...]) -> None:
    """A Sentinel that lags or is cut off, alone, drops no connection."""
    watch, fakes = watch_of(OLD, OLD, OLD)
    moves: list[object] = []

    async def moved() -> None:
        moves.append(1)

    task = asyncio.create_task(watch.run(moved))
    await asyncio.sleep(0.05)
    for fake, view in zip(fakes, views, strict=True):
        fake.view = view
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert moves == [] and watch.primary == OLD


async def test_a_drop_that_raises_stops_no_watch() -> None:
    watch, _ = watch_of(NEW, NEW, NEW)
    watch.primary = OLD
    calls: list[int] = []

    async def moved() -> None:
        calls.append(1)
        raise RuntimeError("a pool could not close")

    await run_a_while(watch, moved)
    assert calls == [1] and watch.primary == NEW


async def test_a_sentinel_that_hangs_holds_no_round_up() -> None:
    """Each round waits for each Sentinel at most ``ASK_DEADLINE_S`` (one frozen held every
    round up for its 5 s socket timeout: the watch asked once in 8 s; review)."""
    watch, fakes = watch_of(OLD, OLD, HANGS)
    await run_a_while(watch, lambda: asyncio.sleep(0), turns=150)  # 1.5 s
    assert fakes[0].asked >= 3 and watch.primary == OLD


class FakePool:
    def __init__(self, master_address: tuple[str, int] | None) -> None:
        self.master_address = master_address


async def test_connections_opened_elsewhere_than_the_majority_says_are_dropped() -> None:
    """The store opened while the Sentinels disagreed, and its pool's connections went
    where a lagging one said: the watch's first answer is no proof; they are dropped,
    once, and open where the majority says from then on."""
    watch, _ = watch_of(NEW, NEW, OLD)
    pools = [FakePool(OLD), FakePool(None)]
    watch.pools = pools  # type: ignore[assignment]
    moves: list[object] = []

    async def moved() -> None:
        moves.append(watch.primary)

    await run_a_while(watch, moved)
    assert moves == [NEW] and [p.master_address for p in pools] == [NEW, NEW]


async def test_connections_open_where_the_watch_says_not_where_one_sentinel_says() -> None:
    """redis-py's lookup takes the first Sentinel that answers; one that lags sent the
    connections the watch had just dropped back to the old primary (review: 40 appends
    acknowledged there, then dropped with it). Once the watch has a majority's word,
    connections open there; before, as redis-py looks it up."""

    class LaggingSentinel:
        async def discover_master(self, service: str) -> tuple[str, int]:
            return OLD

    pool = WatchedSentinelPool("mymaster", LaggingSentinel())  # type: ignore[no-untyped-call]
    assert await pool.get_master_address() == OLD  # (no watch yet)
    watch, _ = watch_of(NEW, NEW, NEW)
    pool.watch = watch
    assert await pool.get_master_address() == OLD  # (the watch has not answered yet)
    watch.primary, watch._primary_at = NEW, time.monotonic()
    assert await pool.get_master_address() == NEW
    watch._primary_at -= 60  # no majority for a minute: redis-py's lookup again
    assert await pool.get_master_address() == OLD
    await pool.aclose()
