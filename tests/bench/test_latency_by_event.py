"""The bench's latency by event, where no subscriber's latency was sampled (a run under
load in which the sampled subscribers did not connect): it crashed the whole scenario
on a NaN rounded (the Nchan run of ``test_bench_smoke``, once), where there is nothing by
event to say."""

from __future__ import annotations

from bench.measure import Outcome
from bench.scenarios import _latency_by_event


def test_no_latency_sampled_gives_no_figures_by_event_and_no_crash() -> None:
    outcome = Outcome()
    outcome.details["published"] = 3
    _latency_by_event(outcome, [{"latencies_ms": []}, {"latencies_ms": []}])
    assert "latency_p50_ms_by_event" not in outcome.details


def test_latencies_are_read_by_event_across_processes() -> None:
    outcome = Outcome()
    outcome.details["published"] = 2
    _latency_by_event(outcome, [{"latencies_ms": [1.0, 10.0]}, {"latencies_ms": [3.0, 30.0]}])
    assert len(outcome.details["latency_p50_ms_by_event"]) == 2
    assert (
        outcome.details["latency_p50_ms_by_event"][0]
        < 10
        < outcome.details["latency_p50_ms_by_event"][1]
    )
