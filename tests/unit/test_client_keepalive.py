"""The keep-alive's readers of the caller's iterator (``brokerclient.keepalive``): one
event when asked, never ahead; a wait that times out leaves that event to come."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from brokerclient.keepalive import END, SILENT, AsyncStep, ThreadedSource, keepalive_of

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


def test_the_thread_reads_one_event_when_asked_never_ahead() -> None:
    """Silent (``SILENT``), the same event is waited for again, not asked twice; the
    iterator stands where the stream does (a caller going on with it after a failure
    lost the events read ahead); its end is told again to a retry's replay."""
    go_on = threading.Event()
    taken: list[int] = []

    def slow() -> Iterator[int]:
        for n in (1, 2):
            if n == 2:
                assert go_on.wait(timeout=10)
            taken.append(n)
            yield n

    source = ThreadedSource(slow())
    try:
        assert source.next_within(5) == 1
        assert source.next_within(0.05) is SILENT
        assert source.next_within(0.05) is SILENT
        assert taken == [1]
        go_on.set()
        assert source.next_within(5) == 2
        assert source.next_within(5) is END
        assert source.next_within(5) is END
        assert taken == [1, 2]
    finally:
        source.close()


@pytest.mark.parametrize("error", [ValueError("not JSON"), KeyboardInterrupt()])
def test_what_the_iterator_raises_is_raised_in_the_callers_thread(error: BaseException) -> None:
    def raising() -> Iterator[int]:
        yield 1
        raise error

    source = ThreadedSource(raising())
    assert source.next_within(5) == 1
    with pytest.raises(type(error)) as raised:
        source.next_within(5)
    assert raised.value is error


def test_the_thread_reads_in_the_callers_context() -> None:
    def who() -> Iterator[str]:
        yield WHO.get()

    token = WHO.set("the caller")
    try:
        source = ThreadedSource(who())
    finally:
        WHO.reset(token)
    assert source.next_within(5) == "the caller"
    source.close()


def test_an_async_step_is_waited_on_not_cancelled_by_the_wait() -> None:
    """The generator's step goes on past each timeout (``asyncio.wait``: ``wait_for``
    cancelled it, and the token it was making was lost); the call's end cancels it."""
    steps: list[str] = []

    async def thinking() -> AsyncIterator[str]:
        steps.append("thinking")
        await asyncio.sleep(0.3)
        steps.append("answered")
        yield "token"
        await asyncio.sleep(10)
        steps.append("never")
        yield "late"

    async def run() -> None:
        source = AsyncStep(thinking())
        silent = 0
        for _ in range(100):  # (0.3 s of 0.02 s waits, bounded)
            got = await source.next_within(0.02)
            if got is not SILENT:
                break
            silent += 1
        assert got == "token" and silent >= 3
        assert await source.next_within(0.02) is SILENT
        source.close()
        await asyncio.sleep(0)

    asyncio.run(run())
    assert steps == ["thinking", "answered"]


@pytest.mark.parametrize("seconds", [-1.0, float("nan")])
def test_a_keepalive_not_over_zero_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="keepalive_seconds"):
        keepalive_of(seconds)
    assert keepalive_of(None) is None and keepalive_of(0) is None and keepalive_of(2) == 2.0


def test_an_async_iterators_steps_share_one_context() -> None:
    """What the iterator sets in one step it finds in the next, and a token it took
    before a ``yield`` resets after it (a tracing span, a logger's bound context): each
    step in a task of its own ran in a fresh copy of the caller's context, and the reset
    raised ValueError ("created in a different Context"). The caller's own values are
    seen, and the caller's context is left as it was."""
    seen: list[str] = []

    async def spanning() -> AsyncIterator[str]:
        seen.append(WHO.get())
        token = WHO.set("the iterator")
        try:
            yield "opened"
            seen.append(WHO.get())
            yield "inside"
        finally:
            WHO.reset(token)
        seen.append(WHO.get())
        yield "closed"

    async def run() -> list[object]:
        token = WHO.set("the caller")
        try:
            source = AsyncStep(spanning())
        finally:
            WHO.reset(token)
        got = [await source.next_within(5) for _ in range(4)]
        source.close()
        seen.append(WHO.get())
        return got

    assert asyncio.run(run()) == ["opened", "inside", "closed", END]
    assert seen == ["the caller", "the iterator", "the caller", "nobody"]
