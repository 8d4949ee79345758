"""When a stream's held origins are due for a later one, and how often the clock looks."""

from __future__ import annotations

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
    clock = HeartbeatClock(15.0, tick_at_most_s=0.5)
    assert clock._tick == 0.5 and clock.due_after == 10.0  # beats as often as before
    assert HeartbeatClock(15.0, tick_at_most_s=None)._tick == 5.0
