"""Shared reads (``_SingleFlight``): one caller going away never fails the others."""

from __future__ import annotations

import asyncio

import pytest

from broker.redis_store import _SingleFlight

WINDOW_S = 0.005


async def _page() -> str:
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
    reads = _SingleFlight(WINDOW_S)
    calls = 0

    async def counted() -> str:
        nonlocal calls
        calls += 1
        return await _page()

    first = asyncio.create_task(reads.run(("range", "t"), counted))
    await asyncio.sleep(0)
    second = asyncio.create_task(reads.run(("range", "t"), counted))
    await asyncio.sleep(cancel_after_s)
    first.cancel()
    assert await asyncio.wait_for(second, 1) == "page"
    assert calls == 1
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_failed_read_fails_every_caller_once() -> None:
    reads = _SingleFlight(WINDOW_S)

    async def failing() -> str:
        raise ConnectionError("redis went away")

    outcomes = await asyncio.gather(
        *(reads.run(("state", "t"), failing) for _ in range(3)), return_exceptions=True
    )
    assert [type(o) for o in outcomes] == [ConnectionError] * 3


async def test_a_read_closes_to_newcomers_once_sent() -> None:
    reads = _SingleFlight(WINDOW_S)
    calls = 0

    async def counted() -> str:
        nonlocal calls
        calls += 1
        return await _page()

    early = asyncio.create_task(reads.run(("range", "t"), counted))
    await asyncio.sleep(WINDOW_S * 2)  # the first read has gone to Redis
    late = asyncio.create_task(reads.run(("range", "t"), counted))
    assert await early == await late == "page"
    assert calls == 2
