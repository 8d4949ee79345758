"""One heartbeat clock for every open stream of the process, instead of a timer each.

Idle streams get a ``:`` comment so proxies and clients know they are alive.
A timer per stream costs memory per idle subscriber and a task wake-up per
beat; this clock ticks three times per interval and beats, straight to the
socket where it can, the streams that have sent nothing for long enough, so
each gets one at least every interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol


class Beating(Protocol):
    def beat_if_idle(self, now: float, idle_for: float) -> None:
        """Send a heartbeat if nothing was sent in the last ``idle_for`` seconds."""


class HeartbeatClock:
    """Beats every registered stream that has been idle for most of ``interval_s``."""

    def __init__(self, interval_s: float) -> None:
        self._interval = interval_s
        self._tick = interval_s / 3
        self._members: set[Beating] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, member: Beating) -> None:
        self._members.add(member)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="broker-heartbeats")

    def discard(self, member: Beating) -> None:
        self._members.discard(member)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            now = time.monotonic()
            for member in list(self._members):
                member.beat_if_idle(now, self._interval - self._tick)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
