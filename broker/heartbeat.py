"""One heartbeat clock for every open stream of the process, instead of a timer each.

Every stream gets a ``:`` comment at least every interval, so proxies and clients
know it is alive (the contract's heartbeat; a client may watch for comments, so a
stream busy with events gets them too). A timer per stream costs memory per idle
subscriber and a task wake-up per beat; this clock ticks three times per interval
and beats, straight to the socket where it can, the streams whose last comment is
old enough. Between those ticks, when topics expire sooner, it looks at the few
streams that hold an origin of such a topic (``broker.origins``), and at no other. A stream
whose consumer is busy (a replay) puts its due comment in front of what it sends
next (``Subscription.chunks``); one whose consumer waits on the store is beaten
straight to the socket too (``CatchUp._from_store``: a stalled store held it silent
for up to 10 s). The clock also ends streams whose credentials
expired (``Subscription.beat_if_due``), so that costs no timer per stream either.

Nothing a member does can stop the clock: a member that raises is cut (its
client resumes by id) and the others are beaten as usual; should the clock's
task end all the same, it is started again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

from broker.framing import beat_event

log = logging.getLogger(__name__)


class Beating(Protocol):
    def beat_if_due(self, now: float, due_after: float) -> None:
        """Send a heartbeat if none was sent in the last ``due_after`` seconds."""

    def abandon(self) -> None:
        """Beating it failed: end it, so that its client resumes."""

    def look_at_origins(self, now: float) -> None:
        """Ask for later origins if one it holds is due (``broker.origins``)."""


class HeartbeatClock:
    """Beats every registered stream whose last beat is most of ``interval_s`` old.

    ``origins_tick_s``: how often to look at the streams that hold origins
    (``watch_origins``; None: at each tick). Their other checks, the beat, the end of
    their credentials and the drop of a client that stopped reading (two ticks in a
    row: a third of the interval apart), keep the clock's own pace, like every stream's.
    """

    def __init__(self, interval_s: float, *, origins_tick_s: float | None = None) -> None:
        self._interval = interval_s
        self.beat_event = beat_event(interval_s)
        """The beat of the streams that asked for events (``?heartbeat=event``), built
        once: their beats cost what a comment's do."""
        self.due_after = interval_s - interval_s / 3
        """A stream beaten that long ago is due again: it gets its next beat within the
        interval, whenever the clock ticks."""
        self._tick = interval_s / 3
        # Looks at origins that divide the tick: every beat falls on one of them, a
        # tick apart (rounded to a look, beats came up to half a look late, and a
        # stream's beats more than the interval apart: second review).
        self._looks_per_tick = max(1, math.ceil(self._tick / (origins_tick_s or self._tick)))
        self._origins_tick = self._tick / self._looks_per_tick
        self._members: set[Beating] = set()
        self._origin_holders: set[Beating] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def add(self, member: Beating) -> None:
        self._members.add(member)
        if self._task is None:
            self._start()

    def discard(self, member: Beating) -> None:
        self._members.discard(member)
        self._origin_holders.discard(member)

    def watch_origins(self, member: Beating) -> None:
        """Look at ``member``'s origins every ``origins_tick_s`` until it is discarded or
        unwatched; a member not beaten (discarded already: closed) is not watched."""
        if member in self._members:
            self._origin_holders.add(member)

    def unwatch_origins(self, member: Beating) -> None:
        self._origin_holders.discard(member)

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
        looks = 0
        while True:
            await asyncio.sleep(self._origins_tick)
            looks += 1
            if looks >= self._looks_per_tick:
                looks = 0
                self.beat(time.monotonic())
            else:
                self.look_at_origins(time.monotonic())

    def beat(self, now: float) -> None:
        """One tick: beat (or end) every member that is due, and look at its origins."""
        for member in list(self._members):
            self._call(member, member.beat_if_due, now, self.due_after)
        self.look_at_origins(now)

    def look_at_origins(self, now: float) -> None:
        """Between ticks: only the members that hold origins, at their own pace."""
        for member in list(self._origin_holders):
            self._call(member, member.look_at_origins, now)

    def _call(self, member: Beating, check: Callable[..., None], *args: float) -> None:
        try:
            check(*args)
        except Exception:
            log.exception("a stream failed its heartbeat; cutting it")
            self.discard(member)
            with contextlib.suppress(Exception):
                member.abandon()

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
