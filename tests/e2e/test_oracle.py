"""The oracle itself must catch what it is there to catch: loss, duplicates, reordering."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.oracle import GAP_EVENT, check_delivery
from tests.e2e.publisher import Ack

pytestmark = pytest.mark.e2e

ACKS = [Ack(n, f"id-{n}", 1, False) for n in range(5)]


def received(*ns: int, gap_before: int | None = None) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = [{"kind": "open"}]
    for n in ns:
        if n == gap_before:
            gap = {"reason": "unknown", "requested": "x", "resumed_after": None}
            records.append({"kind": "event", "type": GAP_EVENT, "id": "", "data": json.dumps(gap)})
        data = json.dumps({"n": n})
        records.append({"kind": "event", "type": "message", "id": f"id-{n}", "data": data})
    return records


def test_exact_delivery_passes() -> None:
    assert check_delivery("c", ACKS, received(0, 1, 2, 3, 4), gaps_allowed=False).problems == []


@pytest.mark.parametrize(
    ("sequence", "problem"),
    [
        ((0, 1, 3, 4), "lost n=2..2"),
        ((0, 1, 2, 2, 3, 4), "duplicate: id id-2"),
        ((0, 2, 1, 3, 4), "lost n=1..1"),
        ((0, 2, 1, 3, 4), "out of order: n=1"),
        ((0, 1, 2), "missing n=3..4 at the end"),
    ],
)
def test_loss_duplicates_and_reordering_are_caught(sequence: tuple[int, ...], problem: str) -> None:
    problems = check_delivery("c", ACKS, received(*sequence), gaps_allowed=False).problems
    assert any(p.startswith(problem) for p in problems), problems


def test_a_wrong_id_is_a_problem() -> None:
    records = received(0, 1, 2, 3, 4)
    records[2]["id"] = "id-other"
    problems = check_delivery("c", ACKS, records, gaps_allowed=False).problems
    assert problems[0] == "id id-other was never acknowledged (after n=0)"
    assert problems[1].startswith("lost n=1..1")


def test_a_gap_event_justifies_a_jump_only_where_gaps_are_allowed() -> None:
    records = received(0, 3, 4, gap_before=3)
    assert check_delivery("c", ACKS, records, gaps_allowed=True).problems == []
    problems = check_delivery("c", ACKS, records, gaps_allowed=False).problems
    assert problems and problems[0].startswith(f"unexpected {GAP_EVENT}")
