"""The watch of one streaming ingest (``api.ingest``): ends its task when it waited too
long for the body (no line within the idle deadline) or for the store (an append not
confirmed in time), or, while it waits for a line, when the instance drains; and hands
each of its looks to the keeper of a keyed ingest's line records (``api.ingest_records``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from api.ingest_records import LineRecordsKeeper

BODY = "body"
STORE = "store"
DRAIN = "drain"  # (the instance shuts down while the ingest waits for a line)
WATCH_STEPS = 8
"""The watch looks every ``1/WATCH_STEPS`` of the shorter limit: a wait is ended at
most that much late."""


class IngestWatch:
    """Ends the ingest's task when it waited too long for the body (``idle``: no line)
    or for the store (``store``: an append not confirmed).

    One timer for the whole ingest, firing every eighth of the shorter limit and
    looking at what the task waits for and since when: an ``asyncio.timeout``
    around every read of a token stream cost a few percent of the ingest's CPU,
    and around every append about 2% more (py-spy, sessions bench).
    """

    def __init__(
        self,
        *,
        idle: float,
        store: float,
        draining: Callable[[], bool] = lambda: False,
        keeper: LineRecordsKeeper | None = None,
    ) -> None:
        """``keeper``: shown each look (a keyed ingest's line records kept answering)."""
        self._draining = draining
        self._keeper = keeper
        self._limits = {BODY: idle, STORE: store}
        self._period = min(idle, store) / WATCH_STEPS
        self._waiting: str | None = None
        self._since = 0.0  # (loop time)
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._fired: str | None = None

    def __enter__(self) -> IngestWatch:
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + self._period, self._check)
        return self

    def __exit__(self, *_: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._keeper is not None:
            self._keeper.stop()
        self._task = None

    def waiting(self, what: str) -> None:
        self._waiting, self._since = what, asyncio.get_running_loop().time()

    def done(self) -> None:
        self._waiting = None

    def fired(self, what: str) -> bool:
        """The cancellation came from here, for ``what``: undo its count, so that the
        task may go on (to store what it has, to answer) with the watch still on."""
        if self._fired != what or self._task is None:
            return False
        self._fired = None
        self._task.uncancel()
        return True

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiting = self._waiting
        if waiting == BODY and self._task and self._draining():
            self._fired, self._waiting = DRAIN, None
            self._task.cancel()
        elif waiting is not None and now - self._since >= self._limits[waiting] and self._task:
            self._fired, self._waiting = waiting, None
            self._task.cancel()
        if self._keeper is not None:
            self._keeper.look(now)
        self._timer = loop.call_at(now + self._period, self._check)
