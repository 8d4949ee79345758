"""What the log says, and how often: ``broker.health`` (on a fake clock)."""

from __future__ import annotations

import logging

import pytest

from broker import health
from broker.health import StoreHealth, ThrottledLog


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(health.time, "monotonic", lambda: now[0])
    return now


def test_a_throttled_log_says_once_per_interval_with_the_count_unsaid(
    clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """Slow subscribers dropped in a broadcast's network stall wrote a line each."""
    said = ThrottledLog(10.0, logging.getLogger("test.throttled"), logging.INFO)
    with caplog.at_level(logging.INFO, "test.throttled"):
        for _ in range(1000):
            said.say("dropped a subscriber")
        clock[0] += 10.0
        said.say("dropped a subscriber")
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages == [
        (logging.INFO, "dropped a subscriber"),
        (logging.INFO, "dropped a subscriber (and 999 more since the last said)"),
    ]


def test_an_outage_is_said_when_it_begins_while_it_lasts_and_when_it_ends(
    clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    store = StoreHealth(logging.getLogger("test.store"))
    with caplog.at_level(logging.INFO, "test.store"):
        store.answered()  # nothing was failing: nothing to say
        for _ in range(100):
            store.failed("publish", ConnectionError("refused"))
        clock[0] += 31.0
        store.failed("history", ConnectionError("refused"))
        clock[0] += 2.5
        store.answered()
        store.answered()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "store: a publish failed: refused (answered 503 until it answers)",
        "store: still failing, for 31 s, 101 operations: refused (and 99 more since the last said)",
        "store: answers again, after 33.5 s and 101 failed operations",
    ]
    assert store.failing_since is None
