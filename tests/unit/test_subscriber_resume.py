"""The Python subscriber's reconnect schedule (no I/O: ``_Resume`` decides, on a fake clock)."""

from __future__ import annotations

import pytest

from brokerclient import subscriber
from brokerclient.errors import Unreachable


def test_give_up_after_is_kept_not_overshot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each try takes 0.01 s and fails: the subscriber gives up once ``give_up_after`` has
    passed since the first try, not a whole backoff later (``broker tail
    --give-up-after 2`` gave up after about 3.8 s)."""
    now = [100.0]
    monkeypatch.setattr(subscriber.time, "monotonic", lambda: now[0])
    resume = subscriber._Resume(["t"], None, False, give_up_after=2.0)
    with pytest.raises(Unreachable):
        for _ in range(100):
            resume.attempting()
            now[0] += 0.01  # the try
            now[0] += resume.failed("down")
    assert now[0] - 100.0 <= 2.0 + 0.01 + 1e-9


def test_give_up_after_counts_the_first_try(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first connect that takes 10 s to time out is 10 s spent failing."""
    now = [100.0]
    monkeypatch.setattr(subscriber.time, "monotonic", lambda: now[0])
    resume = subscriber._Resume(["t"], None, False, give_up_after=5.0)
    resume.attempting()
    now[0] += 10.0  # the connect timed out
    with pytest.raises(Unreachable):
        resume.failed("connect timeout")
