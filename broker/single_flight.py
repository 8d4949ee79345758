"""Concurrent identical reads share one round trip (the store's read coalescer).

No Redis here: the coalescer only knows keys and awaitables.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class SingleFlight:
    """Concurrent identical reads share one Redis round trip.

    A reconnect storm sends thousands of subscribers after the same range at
    once; they get one XRANGE between them, and one parsed result.

    A caller may only join a read that has not been sent yet: a subscriber
    reads the log *after* it attached to the live reader, and a read sent
    before that could miss an event that the live reader had also dispatched
    before it attached. So a read waits a few milliseconds for company, closes
    to newcomers, and only then goes to Redis.

    The read runs in a task of its own, which every caller awaits shielded:
    a caller that goes away (its client disconnected) cancels only its own
    wait, never the read the others are waiting for.
    """

    def __init__(self, window_s: float, *, max_window_s: float | None = None) -> None:
        self._window = window_s
        self._max_window = max(window_s, max_window_s or window_s)
        self._forming: dict[tuple[Any, ...], asyncio.Task[Any]] = {}
        self._joined: dict[tuple[Any, ...], int] = {}  # callers of each forming read

    async def run(self, key: tuple[Any, ...], call: Callable[[], Awaitable[T]]) -> T:
        read = self._forming.get(key)
        if read is None:
            read = asyncio.get_running_loop().create_task(self._read(key, call))
            read.add_done_callback(_retrieve_outcome)
            self._forming[key] = read
            self._joined[key] = 0
        self._joined[key] += 1
        return await asyncio.shield(read)

    async def _read(self, key: tuple[Any, ...], call: Callable[[], Awaitable[T]]) -> T:
        """Wait a window for company; while company keeps coming (a reconnect storm
        arrives over hundreds of milliseconds), another, up to the longest window."""
        loop = asyncio.get_running_loop()
        closes_at = loop.time() + self._max_window
        try:
            joined = self._joined[key]
            await asyncio.sleep(self._window)
            while self._joined[key] > joined and loop.time() + self._window <= closes_at:
                joined = self._joined[key]
                await asyncio.sleep(self._window)
        finally:
            del self._forming[key]  # closed: whoever asks from now on reads anew
            del self._joined[key]
        return await call()


def _retrieve_outcome(task: asyncio.Task[Any]) -> None:
    """No "exception never retrieved" when every caller of a failed read went away."""
    if not task.cancelled():
        task.exception()
