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
    requested: EventId, state: LogState, *, seen: str | None = None
) -> tuple[EventId, Gap | None]:
    """The position to read after, and the gap notice to send first, if any.

    ``seen``: for a stream at the origin, the epoch of a log it saw entries of live
    and did not deliver. Gone by now (deleted, expired, replaced), that log's events
    are lost to it: it is told, as a cursor of that log would be."""
    if requested.is_origin and seen is not None and state.epoch != seen:
        deletion = state.deletion_of(seen)
        if deletion is not None:
            return deletion, Gap("deleted", requested, None)
        start, _ = resume_point(requested, state)  # a later log from its start
        return start, Gap("unknown", requested, None)
    if requested.is_origin:
        return origin_point(requested, state)
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


def origin_point(requested: EventId, state: LogState) -> tuple[EventId, Gap | None]:
    """For a cursor at the origin: a log there now is read from its start (after a
    ``trimmed`` gap if retention removed some of it).

    An origin that carries the store's time ``T`` (``0.T-s``: no log then, and after
    every deletion known then) also tells of a log deleted since: its marker lingers
    a minute, or a later log remembers it; the client's ``deleted`` gap. A log that
    expired whole meanwhile leaves nothing to tell by (the origin of a client that
    stayed connected is as old as its stream: telling on age would tell every such
    client of a loss that was none)."""
    if requested.position > (0, 0):
        missed = state.deleted_since(requested)
        if missed is not None:
            return missed, Gap("deleted", requested, None)
    if state.epoch is None:  # nothing it could have missed: its time kept, or now's
        return (requested if requested.position > (0, 0) else state.origin), None
    if state.trimmed_through > (0, 0):
        return _from_oldest(state, "trimmed", requested)
    return EventId(state.epoch, (0, 0)), None


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
