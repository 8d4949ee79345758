"""Shared reads (``SingleFlight``): one caller going away never fails the others."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

from broker.single_flight import SingleFlight

WINDOW_S = 0.005


class CountedRead:
    """A read of one page that takes a round trip, counting how often it is sent."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        await asyncio.sleep(0.02)  # a round trip to Redis
        return "page"


@pytest.mark.parametrize(
    "cancel_after_s",
    [0.001, 0.010],
    ids=["while-waiting-for-company", "while-the-read-is-in-flight"],
)
async def test_a_cancelled_caller_leaves_the_shared_read_to_the_others(
    cancel_after_s: float,
) -> None:
    reads = SingleFlight(WINDOW_S)
    counted = CountedRead()
    first = asyncio.create_task(reads.run(("range", "t"), counted))
    await asyncio.sleep(0)
    second = asyncio.create_task(reads.run(("range", "t"), counted))
    await asyncio.sleep(cancel_after_s)
    first.cancel()
    assert await asyncio.wait_for(second, 1) == "page"
    assert counted.calls == 1
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_failed_read_fails_every_caller_once() -> None:
    reads = SingleFlight(WINDOW_S)

    async def failing() -> str:
        raise ConnectionError("redis went away")

    outcomes = await asyncio.gather(
        *(reads.run(("state", "t"), failing) for _ in range(3)), return_exceptions=True
    )
    assert [type(o) for o in outcomes] == [ConnectionError] * 3


async def test_a_read_closes_to_newcomers_once_sent() -> None:
    reads = SingleFlight(WINDOW_S)
    counted = CountedRead()
    early = asyncio.create_task(reads.run(("range", "t"), counted))
    await asyncio.sleep(WINDOW_S * 2)  # the first read has gone to Redis
    late = asyncio.create_task(reads.run(("range", "t"), counted))
    assert await early == await late == "page"
    assert counted.calls == 2


async def test_while_callers_keep_coming_the_read_waits_for_them_up_to_a_cap() -> None:
    """A reconnect storm's callers arrive over hundreds of milliseconds: a read that got
    company in its window waits another window (up to ``max_window_s``), so a storm
    costs a read per cap, not one per window. A lone caller still waits one window.

    Judged from the arrivals as they happened (a loaded machine sleeps longer than
    asked): the storm spans more than the cap, so at least two reads; at most one
    per cap's worth of arrivals (less a window: a read closes early rather than
    outlive its cap), plus one for each gap longer than a window."""
    window = 0.05
    cap = window * 6
    reads = SingleFlight(window, max_window_s=cap)
    counted = CountedRead()
    lone = asyncio.create_task(reads.run(("range", "alone"), counted))
    await asyncio.sleep(window * 2)  # the lone read had no company: it has gone
    later = asyncio.create_task(reads.run(("range", "alone"), counted))
    assert await lone == await later == "page"
    assert counted.calls == 2
    counted.calls = 0
    loop = asyncio.get_running_loop()
    callers, arrivals = [], []
    for _ in range(50):  # one every fifth of a window: about ten windows
        arrivals.append(loop.time())
        callers.append(asyncio.create_task(reads.run(("range", "t"), counted)))
        await asyncio.sleep(window / 5)
    assert set(await asyncio.gather(*callers)) == {"page"}
    span = arrivals[-1] - arrivals[0]
    breaks = sum(1 for a, b in itertools.pairwise(arrivals) if b - a > window)
    assert span > cap
    assert 2 <= counted.calls <= 1 + breaks + math.ceil(span / (cap - window)), (span, breaks)
