"""The end-to-end records of each subscriber, judged by the suite's oracle
(``tests.support.oracle``): counts, opens, errors, and whether a client gave up."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.e2e.publisher import Ack
from tests.support.oracle import GAP_EVENT, delivery_problems

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
    """Compare one client's records with the acknowledged sequence (acks[i].n == i),
    by the suite's oracle (``tests.support.oracle``)."""
    result = Delivery(client)
    result.opens = sum(1 for r in records if r["kind"] == "open")
    result.error_times = [float(r["t"]) for r in records if r["kind"] == "error"]
    result.gave_up = gave_up(records)
    received = [(r["id"], r["type"]) for r in events_of(records)]
    result.gaps = [json.loads(r["data"]) for r in events_of(records) if r["type"] == GAP_EVENT]
    result.delivered = len(received) - len(result.gaps)
    acked = [ack.id for ack in acks]
    result.problems = delivery_problems(acked, received, gaps_allowed=gaps_allowed)
    return result
