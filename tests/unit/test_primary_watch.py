"""The Sentinel store's watch of the primary (``broker.redis_primary``), on fake Sentinels:
it moves on a majority's word only, and goes on whatever a drop raised."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError

from broker.redis_primary import PrimaryWatch

OLD, NEW = ("10.0.0.1", 6379), ("10.0.0.2", 6379)


class FakeSentinel:
    """One Sentinel: names ``view`` (None: does not answer)."""

    def __init__(self, view: tuple[str, int] | None) -> None:
        self.view = view

    async def sentinel_masters(self) -> dict[str, Any]:
        if self.view is None:
            raise ConnectionError("down")
        host, port = self.view
        state = {"ip": host, "port": port, "is_master": True, "is_sdown": False}
        return {"mymaster": state | {"is_odown": False, "num-other-sentinels": 2}}


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
    assert moves == [OLD] and watch.primary == NEW  # once, from the old one


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
