"""The end-to-end oracle: what each subscriber received against what was acknowledged.

Every acknowledged event must reach every subscriber exactly once and in the
order of the log, with the id it was acknowledged with. The only excuse for a
missing run of events is an explicit `broker.gap` right before the jump, and
only where the scenario allows gaps at all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.e2e.publisher import Ack

GAP_EVENT = "broker.gap"
CLOSED = 2  # EventSource.readyState: the client gave up and will not reconnect.


@dataclass
class Delivery:
    """What one subscriber's record shows, checked against the acknowledgements."""

    client: str
    problems: list[str] = field(default_factory=list)
    delivered: int = 0
    gaps: list[dict[str, Any]] = field(default_factory=list)
    opens: int = 0
    error_times: list[float] = field(default_factory=list)
    gave_up: str | None = None  # why the client closed for good, if it did

    def summary(self, since: float = 0.0) -> str:
        """One line of counts (error times relative to `since`), then the problems."""
        errors = ", ".join(f"{t - since:.2f}s" for t in self.error_times)
        head = (
            f"{self.client}: {self.delivered} events, {len(self.gaps)} gaps, "
            f"{self.opens} opens, errors at [{errors}]"
        )
        if self.gave_up is not None:
            head += f"; CLOSED for good: {self.gave_up}"
        return "\n  ".join([head, *self.problems[:15]])


def events_of(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "event"]


def last_n(records: Sequence[dict[str, Any]]) -> int | None:
    """The sequence number of the last non-gap event a client received."""
    for record in reversed(events_of(records)):
        if record["type"] != GAP_EVENT:
            return int(json.loads(record["data"])["n"])
    return None


def gave_up(records: Sequence[dict[str, Any]]) -> str | None:
    """Why the client closed for good (an EventSource never reconnects then), or None."""
    for record in records:
        if record["kind"] == "error" and record.get("readyState") == CLOSED:
            return str(record.get("message") or "error with readyState CLOSED")
    return None


def check_delivery(
    client: str, acks: Sequence[Ack], records: Sequence[dict[str, Any]], *, gaps_allowed: bool
) -> Delivery:
    """Compare one client's records with the acknowledged sequence (acks[i].n == i)."""
    result = Delivery(client)
    result.opens = sum(1 for r in records if r["kind"] == "open")
    result.error_times = [float(r["t"]) for r in records if r["kind"] == "error"]
    result.gave_up = gave_up(records)
    expected = 0  # the index in `acks` of the next event this client must receive
    after_gap = False
    for record in events_of(records):
        if record["type"] == GAP_EVENT:
            result.gaps.append(json.loads(record["data"]))
            if not gaps_allowed:
                after = f"after n={expected - 1}"
                result.problems.append(f"unexpected {GAP_EVENT} {record['data']} {after}")
            after_gap = True
            continue
        n = int(json.loads(record["data"])["n"])
        problem = _check_one(acks, expected, n, record["id"], after_gap and gaps_allowed)
        if problem:
            result.problems.append(problem)
        if n >= expected:
            expected = n + 1
        after_gap = False
        result.delivered += 1
    if expected < len(acks):
        result.problems.append(f"missing n={expected}..{len(acks) - 1} at the end")
    return result


def _check_one(acks: Sequence[Ack], expected: int, n: int, event_id: str, jump_ok: bool) -> str:
    if n < expected:
        return f"duplicate or out of order: n={n} (id {event_id}) after n={expected - 1}"
    if n >= len(acks):
        return f"n={n} (id {event_id}) was never acknowledged"
    if n > expected and not jump_ok:
        return f"lost n={expected}..{n - 1}: got n={n} (id {event_id}) with no {GAP_EVENT}"
    if acks[n].id != event_id:
        return f"n={n} arrived with id {event_id}, acknowledged as {acks[n].id}"
    return ""
