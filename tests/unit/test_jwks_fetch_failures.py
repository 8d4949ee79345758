"""What the log says of a key set's fetches failing (``api.keys.FetchFailures``), on a
clock of the test's own: once when they begin, reminded at most once a minute while
they go on, and once when a fetch succeeds again."""

from __future__ import annotations

import logging

import pytest

from api.keys import JWKS_FAILING_REMINDER_SECONDS, FetchFailures

URL = "http://keys.test/jwks.json"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _said(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "api.keys"]
    caplog.clear()
    return said


def test_failing_fetches_are_said_once_reminded_once_a_minute_and_their_end_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key server down for an hour, a fetch tried each 5 s: 720 warnings, the same line
    each. Now one warning says it began (and why), one a minute reminds that it goes on
    (since when), and one info line says it ended."""
    caplog.set_level(logging.INFO, logger="api.keys")
    clock = Clock()
    failures = FetchFailures(URL, clock=clock)
    failures.failed(ConnectionRefusedError("connection refused"))
    [(level, began)] = _said(caplog)
    assert level == logging.WARNING and URL in began and "connection refused" in began
    for _ in range(11):  # (each 5 s: 55 s in all, under the reminder's minute)
        clock.now += 5
        failures.failed(ConnectionRefusedError("connection refused"))
    assert _said(caplog) == []
    clock.now += 5  # (a minute since it was said)
    failures.failed(TimeoutError("timed out"))
    [(level, reminder)] = _said(caplog)
    assert level == logging.WARNING and "still failing, since " in reminder, reminder
    assert "(60 s, 13 attempts): timed out" in reminder, reminder
    clock.now += JWKS_FAILING_REMINDER_SECONDS - 1
    failures.failed(TimeoutError("timed out"))
    assert _said(caplog) == []
    clock.now += 1
    failures.succeeded()
    [(level, ended)] = _said(caplog)
    assert level == logging.INFO and "succeeded again" in ended and "(120 s, 14 attempts)" in ended
    failures.succeeded()  # (fetches that never failed: nothing to say)
    assert _said(caplog) == []
    failures.failed(ConnectionRefusedError("connection refused"))  # (failing anew: said anew)
    [(level, again)] = _said(caplog)
    assert level == logging.WARNING and "failed: connection refused" in again
