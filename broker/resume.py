"""Where a subscription resumes: the judgement of a cursor against a log.

A cursor (an event id a client sent back) is one of:
  - resumable: issued by this log, and everything after it is still retained;
  - trimmed: issued by this log, but retention removed events after it;
  - unknown: well-formed, but this log never issued it (another topic's id, or
    an id of a log that was lost and recreated, or one from a lost future).
The last two resume after a gap notice: from the oldest retained event, except
an id of this log beyond its newest event (its tail was lost: ``appendfsync
everysec``, an asynchronous failover), which resumes from the newest: replaying
the whole history to a client that had seen all of it would flood it.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.ids import EventId
from broker.model import LogState


@dataclass(frozen=True, slots=True)
class Gap:
    """What a ``broker.gap`` notice tells the client."""

    reason: str  # "trimmed" | "unknown" | "deleted"
    requested: EventId
    resumed_after: EventId | None


def resume_point(
    requested: EventId, state: LogState, *, seen: str | None = None, ttl_ms: int = 0
) -> tuple[EventId, Gap | None]:
    """The position to read after, and the gap notice to send first, if any.

    ``seen``: for a stream at the origin, the epoch of a log it saw entries of live
    and did not deliver. Gone by now (deleted, expired, replaced), that log's events
    are lost to it: it is told, as a cursor of that log would be. ``ttl_ms``: the
    topic's TTL (0: it never expires), which an origin cursor is judged by."""
    if requested.is_origin and seen is not None and state.epoch != seen:
        deletion = state.deletion_of(seen)
        if deletion is not None:
            return deletion, Gap("deleted", requested, None)
        start, _ = resume_point(requested, state)  # a later log from its start
        return start, Gap("unknown", requested, None)
    if requested.is_origin:
        return origin_point(requested, state, ttl_ms=ttl_ms)
    deletion = state.deletion_of(requested.epoch)
    if deletion is not None:  # (and maybe published to again since)
        # Told at the marker's id: a client coming back with it is answered 204.
        return deletion, Gap("deleted", requested, None)
    if state.epoch is None:
        return state.origin, Gap("unknown", requested, None)
    if requested.epoch != state.epoch:
        return _from_oldest(state, "unknown", requested)
    if requested.position > state.last_issued:
        newest = state.event_id(state.last_issued)
        return newest, Gap("unknown", requested, newest)
    if requested.position < state.trimmed_through:
        return _from_oldest(state, "trimmed", requested)
    return requested, None


def origin_point(
    requested: EventId, state: LogState, *, ttl_ms: int = 0
) -> tuple[EventId, Gap | None]:
    """For a cursor at the origin: a log there now is read from its start (after a
    ``trimmed`` gap if retention removed some of it).

    An origin that carries the store's time ``T`` (``0.T-s``: no log then, and after
    every deletion known then) also tells of a log deleted since: its marker lingers
    a minute, or a later log remembers it; the client's ``deleted`` gap. A log that
    expired whole meanwhile leaves no trace, but it lived a TTL after its last append,
    so after ``T`` by a TTL at least: a cursor that old (see ``may_have_expired_since``)
    is told ``unknown``, then waits at a fresh origin or reads the log there from its
    start. A client that stays connected at the origin is sent a later one before its
    own grows that old (``refreshed_origin``): telling on age alone would tell every
    such client of a loss that was none."""
    if requested.position > (0, 0):
        missed = state.deleted_since(requested)
        if missed is not None:
            return missed, Gap("deleted", requested, None)
        if may_have_expired_since(requested, state, ttl_ms):
            start = EventId(state.epoch, (0, 0)) if state.epoch else state.origin
            return start, Gap("unknown", requested, None)
    if state.epoch is None:  # nothing it could have missed: its time kept, or now's
        return (requested if requested.position > (0, 0) else state.origin), None
    if state.trimmed_through > (0, 0):
        return _from_oldest(state, "trimmed", requested)
    return EventId(state.epoch, (0, 0)), None


def may_have_expired_since(origin: EventId, state: LogState, ttl_ms: int) -> bool:
    """Whether a whole log could have come and expired after ``origin``'s time ``T``:
    a log expires a TTL after its last append, after its creation, after ``T``. So
    with no log now, when the store's time is ``T`` + TTL or later; with a log, when
    it was created then or later (its first entry's time: its id is the store's
    time when it was added). A log trimmed since its creation cannot say when that
    was, and needs no saying: its ``trimmed`` gap tells already. No TTL: nothing
    expires. An origin with no time (``0.0-0``) cannot be judged, as before."""
    ms = origin.position[0]
    if not ttl_ms or ms == 0:
        return False
    if state.epoch is None:
        return state.clock_ms is not None and state.clock_ms - ms >= ttl_ms
    created = state.first if state.trimmed_through == (0, 0) else None
    return created is not None and created[0] - ms >= ttl_ms


def refreshed_origin(held: EventId, state: LogState) -> EventId | None:
    """A later origin for a stream that stayed connected at ``held``: the state's own,
    when it shows no log and no log deleted since ``held`` (at its time there was no
    log, and nothing deleted since: nothing the client could have missed, as any log
    made meanwhile would have reached the stream live). None when it shows a log or
    a deletion: the live path is about to deliver or tell it."""
    if state.exists or state.deleted_since(held) is not None:
        return None
    later = state.origin
    return later if later.position > held.position else None


def _from_oldest(state: LogState, reason: str, requested: EventId) -> tuple[EventId, Gap]:
    position = state.event_id(state.trimmed_through)
    resumed_after = position if state.trimmed_through != (0, 0) else None
    return position, Gap(reason, requested, resumed_after)


def foreign_point(requested: EventId, state: LogState) -> tuple[EventId, Gap]:
    """For an id of another topic's log (whatever it is, the origin too): an
    ``unknown`` gap, then from the oldest retained event."""
    if state.epoch is None:
        return state.origin, Gap("unknown", requested, None)
    return _from_oldest(state, "unknown", requested)


def earliest_point(state: LogState) -> EventId:
    """Just before the oldest retained event: ``?from=earliest`` starts here, without a gap."""
    return state.event_id(state.trimmed_through) if state.epoch else state.origin


def latest_point(state: LogState) -> EventId:
    """After the newest event: a subscription with no cursor starts here."""
    return state.event_id(state.last_issued) if state.epoch else state.origin
