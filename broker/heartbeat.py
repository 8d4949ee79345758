"""One heartbeat clock for every open stream of the process, instead of a timer each.

Every stream gets a ``:`` comment at least every interval, so proxies and clients
know it is alive (the contract's heartbeat; a client may watch for comments, so a
stream busy with events gets them too). A timer per stream costs memory per idle
subscriber and a task wake-up per beat; this clock ticks three times per interval
(more often when topics expire sooner: ``broker.origins``) and beats, straight to
the socket where it can, the streams whose last comment is old enough. A stream
whose consumer is busy (a replay) puts its due comment in front of what it sends
next (``Subscription.chunks``). The clock also ends streams whose credentials
expired (``Subscription.beat_if_due``), so that costs no timer per stream either.

Nothing a member does can stop the clock: a member that raises is cut (its
client resumes by id) and the others are beaten as usual; should the clock's
task end all the same, it is started again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

log = logging.getLogger(__name__)


class Beating(Protocol):
    def beat_if_due(self, now: float, due_after: float) -> None:
        """Send a heartbeat if none was sent in the last ``due_after`` seconds."""

    def abandon(self) -> None:
        """Beating it failed: end it, so that its client resumes."""


class HeartbeatClock:
    """Beats every registered stream whose last beat is most of ``interval_s`` old.

    ``tick_at_most_s``: tick at least this often (a third of the interval otherwise),
    for what streams look at on each tick besides their beat (``broker.origins``)."""

    def __init__(self, interval_s: float, *, tick_at_most_s: float | None = None) -> None:
        self._interval = interval_s
        self.due_after = interval_s - interval_s / 3
        """A stream beaten that long ago is due again: it gets its next beat within the
        interval, whenever the clock ticks."""
        self._tick = min(interval_s / 3, tick_at_most_s or interval_s)
        self._members: set[Beating] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def add(self, member: Beating) -> None:
        self._members.add(member)
        if self._task is None:
            self._start()

    def discard(self, member: Beating) -> None:
        self._members.discard(member)

    def _start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="broker-heartbeats")
        self._task.add_done_callback(self._restart_unless_closed)

    def _restart_unless_closed(self, task: asyncio.Task[None]) -> None:
        if self._closed:
            return
        if not task.cancelled() and task.exception() is not None:
            log.error("the heartbeat clock failed; restarting it", exc_info=task.exception())
        else:
            log.error("the heartbeat clock stopped; restarting it")
        self._start()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            self.beat(time.monotonic())

    def beat(self, now: float) -> None:
        """One tick: beat (or end) every member that is due."""
        for member in list(self._members):
            try:
                member.beat_if_due(now, self.due_after)
            except Exception:
                log.exception("a stream failed its heartbeat; cutting it")
                self._members.discard(member)
                with contextlib.suppress(Exception):
                    member.abandon()

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
