"""Sizes below `--quick` for the harness's smoke tests: they check that every figure is a
number and every scenario delivered what it counts, never how fast, so a shorter run checks
as much. These were the suite's two slowest tests (88 s and 68 s under `make test`).
Each scenario still runs, with subscribers, sessions that drop and resume, topics that
expire and topics that churn; only the seconds, tokens and counts are fewer."""

from __future__ import annotations

SIZES = {
    "fanout_seconds": 0.5,  # 25 events to each of the 20 subscribers
    "broadcast_rate": 10.0,  # its 4 events in 0.4 s, not 1 s
    "publish_seconds": 0.5,
    "idle_subscribers": 40,
    "storm_clients": 20,
    "sessions_rounds": 1,  # 10 sessions a mode, not 20
    "sessions_tokens": 12,
    "sessions_rate": 40.0,  # a generation in 0.3 s, not 1 s
    "sessions_drop_fraction": 0.5,  # so that some of the 10 drop and resume
    "sessions_ttl_s": 1.0,
    "churn_live": 20,  # a topic lives 1 s: the ramp before the window is 1 s, not 3 s
    "churn_measure_s": 1.0,
    "settle_s": 0.2,  # the idle and storm scenarios' pauses before a reading: 0.9 s, not 4.5
}

SMALLER_THAN_QUICK = tuple(
    argument for name, value in SIZES.items() for argument in ("--set", f"{name}={value:g}")
)
"""`python -m bench --quick` arguments that set the sizes above."""
