"""Deadlines for many connections on one timer handle per process.

Every connection that waits for a request head or body has a deadline, and a
broker holds tens of thousands of connections: a task each would cost
kilobytes, and a ``loop.call_at`` handle each would be made and cancelled for
every request on the publish hot path. Here deadlines fall into buckets of
``tick`` seconds; one timer handle, armed for the earliest bucket, expires
what is due. Setting or clearing a deadline is a dict and a set operation. A
deadline fires at most one tick late, which is nothing next to timeouts of
seconds. A connection that is not waiting (an open event stream) has no
deadline at all: it costs nothing here.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Protocol

log = logging.getLogger(__name__)

TICK_SECONDS = 0.25


class Expiring(Protocol):
    def expire(self) -> None:
        """The deadline passed: close (or answer and close) the connection."""


class Deadlines:
    """At most one pending deadline per item; ``expire()`` is called on the item once due."""

    def __init__(self, tick: float = TICK_SECONDS) -> None:
        self._tick = tick
        self._slots: dict[Expiring, int] = {}
        self._buckets: dict[int, set[Expiring]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._armed_slot = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._slots)

    def set(self, item: Expiring, delay: float) -> None:
        """``item`` expires ``delay`` seconds from now (replacing any earlier deadline)."""
        loop = self._loop or self._bind()
        slot = math.ceil((loop.time() + delay) / self._tick)
        if self._slots.get(item) == slot:
            return
        self.clear(item)
        self._slots[item] = slot
        bucket = self._buckets.get(slot)
        if bucket is None:  # (not ``setdefault(slot, set())``: a set made per call)
            bucket = self._buckets[slot] = set()
        bucket.add(item)
        if self._timer is None or slot < self._armed_slot:
            self._arm(loop, slot)

    def clear(self, item: Expiring) -> None:
        """``item`` waits for nothing any more."""
        slot = self._slots.pop(item, None)
        if slot is None:
            return
        bucket = self._buckets[slot]
        bucket.discard(item)
        if not bucket:
            del self._buckets[slot]

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()  # one per server process, for its life
        return self._loop

    def _arm(self, loop: asyncio.AbstractEventLoop, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_slot = slot
        self._timer = loop.call_at(slot * self._tick, self._fire)

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop or self._bind()
        due = math.floor(loop.time() / self._tick)
        for slot in sorted(s for s in self._buckets if s <= due):
            for item in self._buckets.pop(slot):
                del self._slots[item]
                try:
                    item.expire()
                except Exception:
                    log.exception("could not close a connection past its deadline")
        if self._buckets:
            self._arm(loop, min(self._buckets))
