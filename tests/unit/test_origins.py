"""When a stream's held origins are due for a later one, and how often the clock looks."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from broker import heartbeat
from broker.heartbeat import HeartbeatClock
from broker.ids import EventId
from broker.origins import HeldOrigins, refresh_tick_s
from broker.policy import Policies, Retention, TopicPolicy

ORIGIN = EventId("0", (5000, 0))


def test_an_origin_is_due_at_a_quarter_of_its_topics_ttl_and_forgotten_once_left() -> None:
    held = HeldOrigins()
    held.hold("t", ORIGIN, taken_at=100.0, ttl_ms=4000)
    assert held.due({"t": ORIGIN}, now=100.9) == []
    assert held.due({"t": ORIGIN}, now=101.0) == ["t"]
    assert held.due({"t": EventId("abcdefgh", (6000, 0))}, now=102.0) == []  # moved on
    assert not held  # (and forgotten)


def test_only_origins_of_expiring_topics_are_held() -> None:
    held = HeldOrigins()
    held.hold("kept", ORIGIN, taken_at=0.0, ttl_ms=0)
    held.hold("log", EventId("abcdefgh", (0, 0)), taken_at=0.0, ttl_ms=1000)
    assert not held


def test_the_clock_ticks_often_enough_for_the_shortest_ttl() -> None:
    default = Retention(maxlen=10)
    assert refresh_tick_s(Policies(default)) is None
    policies = Policies(Retention(maxlen=10, ttl_ms=60_000), [TopicPolicy("a:*", ttl_seconds=2)])
    assert refresh_tick_s(policies) == 0.25
    clock = HeartbeatClock(15.0, origins_tick_s=0.25)
    assert clock._tick == 5.0 and clock.due_after == 10.0  # beats as often as before
    assert clock._origins_tick == 0.25
    assert HeartbeatClock(15.0, origins_tick_s=None)._origins_tick == 5.0


class Member:
    """A stream, as the clock sees it: what it was asked, and when (the clock's time)."""

    def __init__(self) -> None:
        self.beats: list[float] = []
        self.looks: list[float] = []
        self.abandoned = False

    def beat_if_due(self, now: float, due_after: float) -> None:
        self.beats.append(now)

    def abandon(self) -> None:
        self.abandoned = True

    def look_at_origins(self, now: float) -> None:
        self.looks.append(now)


async def run_clock(
    monkeypatch: pytest.MonkeyPatch, clock: HeartbeatClock, members: list[Member], seconds: float
) -> None:
    """Run ``clock`` for ``seconds`` of its own time, faked: its module's ``time`` and
    ``asyncio.sleep`` only (the event loop keeps the real ones)."""
    now = [1000.0]
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        now[0] += delay
        await real_sleep(0)

    monkeypatch.setattr(heartbeat, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(heartbeat, "asyncio", SimpleNamespace(**vars(asyncio) | {"sleep": sleep}))
    try:
        for member in members:
            clock.add(member)
        for _ in range(100_000):
            if now[0] >= 1000.0 + seconds:
                break
            await real_sleep(0)
    finally:
        await clock.close()


async def test_between_its_beats_the_clock_looks_only_at_streams_holding_origins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A short TTL makes the clock look at origins often, but only at the streams that
    hold one: every other stream is beaten (and judged for a drop: two ticks in a row)
    at the clock's own pace, a third of the interval."""
    clock = HeartbeatClock(3.0, origins_tick_s=0.25)  # beats every 1 s, origins every 0.25 s
    quiet, holder, gone = Member(), Member(), Member()
    clock.add(holder)
    clock.watch_origins(holder)
    clock.watch_origins(gone)  # (never beaten: closed before it was watched)
    await run_clock(monkeypatch, clock, [quiet], 10.0)
    assert 9 <= len(quiet.beats) <= 10 and quiet.looks == []
    assert len(holder.beats) == len(quiet.beats)
    assert 39 <= len(holder.looks) <= 41
    assert gone.looks == [] and gone.beats == []
    assert not (quiet.abandoned or holder.abandoned)
    clock.unwatch_origins(holder)
    assert holder not in clock._origin_holders


@pytest.mark.parametrize("origins_tick_s", [0.25, 2.4, 3.0, 3.3, 5.0, 7.0])
async def test_beats_keep_their_pace_whatever_the_looks_at_origins(
    monkeypatch: pytest.MonkeyPatch, origins_tick_s: float
) -> None:
    """Every beat falls on a look at origins, a third of the interval apart: rounded to
    the looks, beats came up to half a look late, and a stream's two beats more than
    the interval apart (15.8 s of 15 with looks every 3 s: second review)."""
    clock = HeartbeatClock(15.0, origins_tick_s=origins_tick_s)
    member = Member()
    await run_clock(monkeypatch, clock, [member], 60.0)
    gaps = [b - a for a, b in zip(member.beats, member.beats[1:], strict=False)]
    assert gaps and all(abs(gap - 5.0) < 1e-6 for gap in gaps), gaps
    assert clock._origins_tick <= min(origins_tick_s, 5.0)
