"""The suite's one delivery oracle: what a subscriber received against what was acknowledged.

Every acknowledged event must reach the subscriber exactly once, in the order it
was acknowledged, with the id it was acknowledged with. The only excuse for a
missing run of acknowledged events is an explicit ``broker.gap`` right before
the jump, and only where the scenario allows gaps at all. Judged by id: where a
failover can store an event whose publisher was never answered (and whose retry
is then a new event, with a new id), a scenario may allow unacknowledged ids.

Positions in the acknowledged sequence are written ``n`` (the publishers of the
suite publish 0, 1, 2... and ``acked[n]`` is the id of ``n``).
"""

from __future__ import annotations

from collections.abc import Sequence

GAP_EVENT = "broker.gap"


def delivery_problems(
    acked: Sequence[str],
    received: Sequence[tuple[str | None, str | None]],
    *,
    gaps_allowed: bool,
    unacknowledged_ok: bool = False,
) -> list[str]:
    """What is wrong with ``received`` (``(id, event type)`` in arrival order); [] if nothing."""
    position = {event_id: n for n, event_id in enumerate(acked)}
    problems: list[str] = []
    seen: set[str] = set()
    expected = 0  # the next acknowledged event the subscriber must receive
    after_gap = False
    for event_id, event_type in received:
        if event_type == GAP_EVENT:
            if not gaps_allowed:
                problems.append(f"unexpected {GAP_EVENT} after n={expected - 1}")
            after_gap = True
            continue
        if event_id in seen:
            problems.append(f"duplicate: id {event_id} (n={position.get(str(event_id))})")
            continue
        seen.add(str(event_id))
        n = position.get(str(event_id))
        if n is None:
            if not unacknowledged_ok:
                problems.append(f"id {event_id} was never acknowledged (after n={expected - 1})")
            continue
        if n < expected:
            problems.append(f"out of order: n={n} (id {event_id}) after n={expected - 1}")
        elif n > expected and not (after_gap and gaps_allowed):
            problems.append(f"lost n={expected}..{n - 1}: got n={n} with no {GAP_EVENT}")
        expected = max(expected, n + 1)
        after_gap = False
    if expected < len(acked):
        problems.append(f"missing n={expected}..{len(acked) - 1} at the end")
    return problems
