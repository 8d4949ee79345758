"""What the store's scripts answer, read as the broker's values and errors.

append.lua's answer (the events' ids) or its refusal (a negative status, nothing
stored), state.lua's state of a log, range.lua's page of it. No Redis here: the
replies as redis-py hands them over (bytes, ints, lists).
"""

from __future__ import annotations

from typing import Any

from broker.errors import (
    BrokerError,
    InvalidInput,
    LinesLost,
    LogDeleted,
    LogLost,
    RecordsLapsed,
    TopicClosed,
)
from broker.ids import EventId, StreamPosition, parse_stream_id
from broker.model import (
    AppendResult,
    IngestAppendResult,
    IngestLines,
    LogEntry,
    LogPage,
    LogState,
)


def parse_answer(answer: bytes, *, replayed: bool) -> AppendResult:
    """``epoch|id,id,...|end id`` (the end id empty unless the append closed the topic)."""
    epoch, ids, end = answer.decode().split("|")
    stored = []
    for raw in ids.split(","):  # (parse_stream_id inlined: the hottest caller)
        if raw:
            ms, _, seq = raw.partition("-")
            stored.append(EventId(epoch, (int(ms), int(seq or 0))))
    return AppendResult(stored, replayed, EventId(epoch, parse_stream_id(end)) if end else None)


def parse_ingest_answer(answer: bytes, *, replayed: bool) -> IngestAppendResult:
    """A keyed streaming ingest's: ``epoch|id,id,...|end id|since`` (``|since`` absent
    where the append stored and replayed nothing of it)."""
    epoch, ids, end = answer.decode().split("|", 2)
    stored = []
    for raw in ids.split(","):  # (as parse_answer: a line's hot path)
        if raw:
            ms, _, seq = raw.partition("-")
            stored.append(EventId(epoch, (int(ms), int(seq or 0))))
    end, _, since = end.partition("|")
    end_id = EventId(epoch, parse_stream_id(end)) if end else None
    return IngestAppendResult(stored, replayed, end_id, since)


def refusal(status: int, answer: str, topic: str, lines: IngestLines | None) -> BrokerError:
    """Why append.lua refused an append (its negative status), nothing of it stored."""
    if status == -1:
        return TopicClosed(topic, answer)
    if status == -2:
        return LogLost(f"the log of topic {topic!r} it was writing to is gone")
    if status == -5:
        return LogDeleted(f"topic {topic!r} was deleted while the ingest was writing to it")
    if status == -4:
        lost = LinesLost(f"lines of topic {topic!r} it had stored are gone")
        lost.replayable = answer == ""
        if answer[:1].isdigit():  # (the newest entry of the ingest's kept: 0-0, none)
            lost.kept_through = parse_stream_id(answer)
        return lost
    if status == -6:
        return RecordsLapsed(f"the line records of the ingest on topic {topic!r} lapsed")
    return _not_the_line_stored(answer, lines)  # (-3)


def _not_the_line_stored(number: str, lines: IngestLines | None) -> InvalidInput:
    key = lines.key if lines is not None else ""
    detail = (
        f"line {number}: not the line {number} stored under Idempotency-Key {key!r} (the "
        "stream is not the one first sent under it, blank lines counted; or another "
        "stream under it, open at once, differs from it there): resend the same lines, or "
        "send another stream under a new key"
    )
    return InvalidInput(detail, field="Idempotency-Key")


def state_of(reply: list[Any]) -> LogState:
    """state.lua's reply: what a log says of itself."""
    (epoch, trimmed, length, first, last, end, expires_in) = reply[:7]
    deleted, marker, lost, issued, deleted_before, clock = reply[7:]
    return LogState(
        epoch=epoch.decode() if epoch else None,
        length=int(length),
        first=_position_or_none(first),
        last_entry=_position_or_none(last),
        trimmed_through=_position_or_none(trimmed) or (0, 0),
        end=_position_or_none(end),
        expires_in_ms=int(expires_in) if int(expires_in) >= 0 else None,
        deleted_epoch=deleted.decode() if deleted else None,
        deleted_at=_position_or_none(marker),
        lost_after=_position_or_none(lost),
        issued=int(issued) if issued else (None if epoch else 0),
        deleted_before=_deletions(deleted_before),
        clock_ms=int(clock) if clock else None,
    )


def page_of(topic: str, reply: list[Any]) -> LogPage:
    """range.lua's reply: a page of ``topic``'s log, with what the log says of itself."""
    epoch, trimmed, raw, found, cut, losses = reply
    return LogPage(
        entries=[LogEntry.from_redis(topic, id_, flat) for id_, flat in raw],
        epoch=epoch.decode() if epoch else None,
        trimmed_through=_position_or_none(trimmed) or (0, 0),
        after_found=bool(found),
        cut_short=bool(cut),
        losses=tuple(parse_stream_id(place) for place in losses),
    )


def _deletions(raw: bytes | None) -> tuple[EventId, ...]:
    """``epoch:marker ...`` (state.lua) as the markers' ids."""
    markers = []
    for deletion in (raw or b"").decode().split():
        epoch, _, marker = deletion.partition(":")
        markers.append(EventId(epoch, parse_stream_id(marker)))
    return tuple(markers)


def _position_or_none(raw: bytes | None) -> StreamPosition | None:
    return parse_stream_id(raw) if raw else None
