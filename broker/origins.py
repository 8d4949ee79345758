"""The origins a stream's client holds, and when each is due for a later one.

A client at the origin of an expiring topic holds ``0.<T>-<s>``: no log at the
store's time ``T``. Back a TTL after ``T`` or later, it may have missed a whole log
that came and expired meanwhile (``broker.resume.may_have_expired_since``), and
is told. A client that stayed connected missed nothing (any log made meanwhile
reached it live), so before its origin grows that old its stream sends it a
later one, read from the store (``broker.resume.refreshed_origin``), as an ``id:``
line with no data: ``EventSource`` keeps it for its reconnect without firing an
event. An origin is due once it is ``ORIGIN_REFRESH_AGE`` of the TTL old; the
heartbeat clock, which looks at the streams holding origins (and only at them) at
least every ``ORIGIN_REFRESH_TICK`` of the shortest TTL (``refresh_tick_s``), sees
it: what a client holds while connected is
at most about three eighths of a TTL old, and a client back within five eighths of
a TTL is told of nothing it did not miss.

Nothing here reads the store, or runs per heartbeat beyond a look at the few
origins a stream holds: the reads are the stream's, each shared by every stream
of its topic that asks at the same tick (``Store.state`` coalesces them).
"""

from __future__ import annotations

from broker.ids import EventId
from broker.policy import Policies

ORIGIN_REFRESH_AGE = 0.25
"""How old (a fraction of the topic's TTL) an origin a client holds grows before its
stream sends a later one (at a half, a client back more than a quarter of a TTL after
it left was told for nothing: with a TTL of 10 s, most EventSource reconnects; review)."""
ORIGIN_REFRESH_TICK = 0.125
"""How often (a fraction of the shortest TTL) at least the heartbeat clock ticks, so
that an origin due is refreshed soon after."""


def refresh_tick_s(policies: Policies) -> float | None:
    """The longest tick of the heartbeat clock that keeps origins fresh; None when no
    topic expires (nothing to refresh)."""
    shortest = policies.shortest_ttl_ms
    return shortest / 1000 * ORIGIN_REFRESH_TICK if shortest else None


class HeldOrigins:
    """Per topic of one stream: the origin its client holds, and when (monotonic
    time) a later one is due. Only topics with a TTL are held: without one nothing
    expires, and an origin tells nothing by its age."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[str, tuple[EventId, float]] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def hold(self, topic: str, origin: EventId, taken_at: float, ttl_ms: int) -> None:
        """The client holds ``origin``, whose time was the store's at ``taken_at``."""
        if ttl_ms and origin.is_origin:
            self._held[topic] = (origin, taken_at + ttl_ms / 1000 * ORIGIN_REFRESH_AGE)
        else:
            self._held.pop(topic, None)

    def due(self, positions: dict[str, EventId], now: float) -> list[str]:
        """The topics whose held origin is due for a later one; those the stream left
        (a log's events moved it on) are forgotten."""
        due = []
        for topic, (origin, due_at) in list(self._held.items()):
            if positions.get(topic) != origin:
                del self._held[topic]
            elif now >= due_at:
                due.append(topic)
        return due
