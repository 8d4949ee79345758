"""The deadline wheel of api.deadlines: one timer for many connections."""

from __future__ import annotations

import asyncio
import time

from api.deadlines import Deadlines

TICK = 0.02


class Waiter:
    def __init__(self) -> None:
        self.expired_at: float | None = None

    def expire(self) -> None:
        self.expired_at = time.monotonic()


async def settle(deadlines: Deadlines, timeout: float) -> None:
    """Until no deadline is pending (bounded)."""
    end = time.monotonic() + timeout
    while len(deadlines) and time.monotonic() < end:
        await asyncio.sleep(TICK)


async def test_each_item_expires_once_its_delay_has_passed_within_a_tick() -> None:
    deadlines = Deadlines(tick=TICK)
    early, late = Waiter(), Waiter()
    start = time.monotonic()
    deadlines.set(late, 0.3)
    deadlines.set(early, 0.1)  # earlier than the armed timer: re-armed
    await settle(deadlines, 2)
    assert early.expired_at is not None and late.expired_at is not None
    assert 0.1 - TICK <= early.expired_at - start < 0.1 + 0.15
    assert 0.3 - TICK <= late.expired_at - start < 0.3 + 0.15


async def test_a_cleared_deadline_never_fires_and_a_reset_one_moves() -> None:
    deadlines = Deadlines(tick=TICK)
    cleared, moved, kept = Waiter(), Waiter(), Waiter()
    start = time.monotonic()
    for waiter in (cleared, moved, kept):
        deadlines.set(waiter, 0.1)
    deadlines.clear(cleared)
    deadlines.set(moved, 0.3)
    assert len(deadlines) == 2
    await settle(deadlines, 2)
    assert cleared.expired_at is None
    assert kept.expired_at is not None and kept.expired_at - start < 0.25
    assert moved.expired_at is not None and moved.expired_at - start >= 0.3 - TICK


async def test_an_item_that_raises_does_not_stop_the_others() -> None:
    class Broken:
        def expire(self) -> None:
            raise RuntimeError("boom")

    deadlines = Deadlines(tick=TICK)
    after = Waiter()
    deadlines.set(Broken(), 0.05)
    deadlines.set(after, 0.05)
    await settle(deadlines, 2)
    assert after.expired_at is not None
    deadlines.set(after, 0.05)  # and the timer still runs for later deadlines
    after.expired_at = None
    await settle(deadlines, 2)
    assert after.expired_at is not None
