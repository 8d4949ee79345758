"""A stream kept open while the caller's iterator is silent (internal to
``brokerclient.publish_body``).

The broker stops a streaming ingest whose body goes ``BROKER_BODY_TIMEOUT_SECONDS``
(30 s) without a read, 408; a model that thinks, or calls a tool, before its next token
is silent that long. While the iterator has given nothing for ``keepalive_seconds``,
the stream sends a space (``KEEPALIVE``): JSON's whitespace, so the start of the next
line, not a line of its own. The broker numbers every line, blank ones included, under
``K:n``, and refuses a resend out of step with the lines it recorded (400): a blank line
sent as a keep-alive would be in the stream as sent, at a place no resend of the same
events could know (a caller's resend after ``StreamInterrupted`` sends them as fast as
it can), and every ``after_line`` and ``K+n`` would count lines the caller never gave.
Spaces before a line store the same event and number nothing: a resend, by the client
or the caller, is exact whatever the pauses were. (The body's last line, once the
iterator ends after a pause, is such spaces alone: a blank line the broker counts at
the stream's end, which a resend of the same events, ending without it, is answered
as before; see the README's streaming ingest.)

At most ``KEEPALIVES_PER_LINE`` spaces go before one line (the broker's line limit is
the largest event plus 4 KiB): past them the stream waits for the iterator as it did
without keep-alives (``keepalive_seconds`` x 1024: 2.8 hours at the default).

Sync: the iterator is read in a worker thread (``ThreadedSource``), one event when the
stream asks for it, never ahead (the iterator stands where the stream does, as it did),
handed over through a queue that the stream waits on with a timeout. Async: one pending
step (``__anext__``) of the caller's iterator in a task, waited on with ``asyncio.wait``
(never ``wait_for``: the caller's generator is never cancelled mid-step by a timeout),
each step in the same copy of the caller's context. Either stays pending across the
attempts of one call: a retry after a broken connection replays the lines sent, then
takes that same event (none asked twice, none reordered).
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

KEEPALIVE = b" "
"""What a silent stream sends: a space before its next line (see the module's docstring)."""
KEEPALIVE_SECONDS = 10.0
"""``stream()``'s default: a third of the broker's default body timeout (30 s)."""
KEEPALIVES_PER_LINE = 1024
"""Spaces before one line at most (the broker refuses a line past the largest event
plus 4 KiB: 1 KiB of them leaves the event's envelope the rest)."""

END = object()
"""An iterator's end, told from any event it may yield."""


def keepalive_of(seconds: float | None) -> float | None:
    """``keepalive_seconds`` as given: None for off (None or 0), else a positive number."""
    if seconds is None or seconds == 0:
        return None
    if not seconds > 0:  # (a NaN too)
        raise ValueError(
            f"keepalive_seconds is a number of seconds over 0, or 0 or None (off): {seconds!r}"
        )
    return float(seconds)


class ThreadedSource:
    """The caller's iterator, read in a daemon thread: ``next_within`` asks it for one
    event and waits for it at most ``timeout`` seconds (``SILENT``: not yet; asked again,
    it waits for that same event). What the iterator raises (a ``KeyboardInterrupt``
    too) is raised by ``next_within``, in the caller's thread; a Ctrl-C lands there, in
    the wait, as it landed in the iterator before. The thread runs in a copy of the
    caller's context (its ``contextvars``).

    ``close`` (the call's end) ends the thread once it has nothing asked of it; one
    blocked in the iterator then (a Ctrl-C, or the broker unreachable, while the
    iterator was silent) stays until the iterator gives its next event, which it drops,
    and ends: the event the caller's iterator was making is lost with the call."""

    def __init__(self, source: Iterator[Any]) -> None:
        self._source = source
        self._asks: queue.SimpleQueue[bool] = queue.SimpleQueue()  # (True: the call ended)
        self._given: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self._asked = False
        self._ended = False
        self._context = contextvars.copy_context()
        self._thread: threading.Thread | None = None

    def next_within(self, timeout: float | None) -> Any:
        """The iterator's next event (``END`` at its end), or ``SILENT`` after
        ``timeout`` seconds (None: as long as it takes)."""
        if self._ended:  # (the thread is over: a retry's replay asks again)
            return END
        if not self._asked:
            if self._thread is None:
                self._start()
            self._asks.put(False)
            self._asked = True
        try:
            given, value = self._given.get(timeout=timeout)
        except queue.Empty:
            return SILENT
        self._asked = False
        if not given:
            raise value
        self._ended = value is END
        return value

    def close(self) -> None:
        if self._thread is not None:
            self._asks.put(True)

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._context.run, args=(self._read,), name="brokerclient-stream", daemon=True
        )
        self._thread.start()

    def _read(self) -> None:
        while not self._asks.get():
            try:
                item = next(self._source, END)
            except BaseException as error:  # (a KeyboardInterrupt too: raised in the caller's)
                self._given.put((False, error))
                return
            self._given.put((True, item))
            if item is END:
                return


SILENT = object()
"""``next_within``'s "nothing yet"."""


class AsyncStep:
    """The caller's async iterator, one step (``__anext__``) pending in a task at a time:
    ``next_within`` waits for it at most ``timeout`` seconds (``SILENT``: not yet; the
    step goes on, and is waited on again). A ``KeyboardInterrupt`` or ``SystemExit``
    the iterator raises is raised by ``next_within`` (raised in a task, it left the
    event loop, past the stream). ``close`` (the call's end: cancelled, or given up)
    cancels a step still pending, which no one would take.

    Every step runs in one copy of the caller's context (its ``contextvars``), as
    ``ThreadedSource``'s thread does: a task of its own each, each step ran in a fresh
    copy, and what the iterator set in one step was gone in the next (a ``ContextVar``
    set before a ``yield`` and reset after it raised ValueError, "created in a different
    Context": a tracing span, a logger's bound context)."""

    def __init__(self, source: AsyncIterator[Any]) -> None:
        self._source = source
        self._step: asyncio.Future[tuple[bool, Any]] | None = None
        self._context = contextvars.copy_context()

    async def next_within(self, timeout: float | None) -> Any:
        if self._step is None:
            self._step = asyncio.get_running_loop().create_task(
                _step(self._source), context=self._context
            )
        done, _ = await asyncio.wait((self._step,), timeout=timeout)
        if not done:
            return SILENT
        step, self._step = self._step, None
        given, value = step.result()  # (what the iterator raised, an Exception, raised here)
        if not given:
            raise value
        return value

    def close(self) -> None:
        if self._step is not None and not self._step.done():
            self._step.add_done_callback(_retrieved)
            self._step.cancel()
        self._step = None


async def _step(source: AsyncIterator[Any]) -> tuple[bool, Any]:
    try:
        return True, await anext(source, END)
    except (KeyboardInterrupt, SystemExit) as error:
        return False, error


def _retrieved(step: asyncio.Future[tuple[bool, Any]]) -> None:
    """A step cancelled at the call's end: what it raised is taken, not logged as
    never retrieved."""
    if not step.cancelled():
        step.exception()
