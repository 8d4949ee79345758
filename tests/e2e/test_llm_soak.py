"""The LLM use case with every fault at once: tests/soak/llm_soak.py, run once.

Three brokers behind the shipped HAProxy on one Redis; 30 generations streamed
by ingest (resent whole under their Idempotency-Key when cut), each watched by
an httpx-sse viewer and a brokerclient AsyncSubscriber whose connections are cut
at random, some reopened after the end (Last-Event-ID) or opened after it
(?from=earliest); meanwhile a broker drains and restarts, another crashes and
restarts, and Redis kills every client connection four times. Every viewer gets
every token once, in order, then broker.end, with no gap; every log holds each
line once, in order, then its end. About 25 s (40 s on a loaded machine).
A failure names its seed: `python -m tests.soak.llm_soak --seed N` replays the
same choices (the faults' timing differs from run to run).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.soak.llm_soak import soak_on_new_deployment
from tests.support.redis_server import free_port

pytestmark = pytest.mark.e2e


def soak_ports() -> list[int]:
    """Redis, three brokers, HAProxy: free ports, or SOAK_PORT_BASE and the next four
    (on a machine whose runs each keep to their own range)."""
    base = os.environ.get("SOAK_PORT_BASE")
    if base:
        return [int(base) + i for i in range(5)]
    return [free_port() for _ in range(5)]


@pytest.mark.timeout(150)
def test_every_viewer_gets_every_token_once_through_every_fault_at_once(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    ports = soak_ports()
    problems, report = soak_on_new_deployment(seed, ports, tmp_path)
    print(report)  # (with -s or -rP: how many cuts and resends the run took)
    assert not problems, report
