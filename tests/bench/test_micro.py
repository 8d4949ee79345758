"""``python -m bench.micro dispatch`` measures the path it names: every offer of its
parked subscriptions is written directly (it raises otherwise), so a regression that
sends live entries to the queued path fails here, not silently in a figure."""

from __future__ import annotations

from bench.micro import dispatch


def test_the_dispatch_measurement_takes_the_direct_write() -> None:
    assert dispatch(subscribers=50, rounds=2) > 0
