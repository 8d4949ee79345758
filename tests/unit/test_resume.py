"""The judgement of a cursor against a log: resumable, trimmed or unknown."""

from __future__ import annotations

from typing import Any

from broker.ids import ORIGIN, EventId
from broker.model import LogState
from broker.resume import Gap, earliest_point, latest_point, refreshed_origin, resume_point

EPOCH = "abcdefgh"


Position = tuple[int, int]


def log_state(
    first: Position | None = (10, 0),
    last: Position | None = (20, 0),
    trimmed: Position = (0, 0),
    epoch: str | None = EPOCH,
) -> LogState:
    return LogState(epoch=epoch, length=5, first=first, last_entry=last, trimmed_through=trimmed)


def test_a_retained_cursor_resumes_exactly() -> None:
    position, gap = resume_point(EventId(EPOCH, (15, 0)), log_state())
    assert position == EventId(EPOCH, (15, 0))
    assert gap is None


def test_the_last_trimmed_event_still_resumes_without_gap() -> None:
    # Events after (9, 0) are all retained: the client lost nothing.
    position, gap = resume_point(EventId(EPOCH, (9, 0)), log_state(trimmed=(9, 0)))
    assert position == EventId(EPOCH, (9, 0))
    assert gap is None


def test_a_cursor_before_trimmed_events_gets_a_trimmed_gap() -> None:
    requested = EventId(EPOCH, (5, 0))
    position, gap = resume_point(requested, log_state(trimmed=(9, 0)))
    assert position == EventId(EPOCH, (9, 0))
    assert gap is not None
    assert (gap.reason, gap.requested, gap.resumed_after) == ("trimmed", requested, position)


def test_another_epoch_is_unknown_and_resumes_from_the_oldest() -> None:
    requested = EventId("zzzzzzzz", (15, 0))
    position, gap = resume_point(requested, log_state())
    assert position == EventId(EPOCH, (0, 0))
    assert gap is not None and gap.reason == "unknown" and gap.resumed_after is None


def test_an_id_beyond_the_end_is_unknown_and_resumes_from_the_newest() -> None:
    """The log's tail was lost (AOF everysec, a failover): the client saw all that is
    left, so it gets only what comes next, not the whole history again."""
    requested = EventId(EPOCH, (21, 0))
    position, gap = resume_point(requested, log_state())
    assert position == EventId(EPOCH, (20, 0))
    assert gap == Gap("unknown", requested, EventId(EPOCH, (20, 0)))


def test_an_id_beyond_what_retention_removed_resumes_after_the_newest_issued() -> None:
    requested = EventId(EPOCH, (21, 0))
    position, gap = resume_point(requested, log_state(first=None, last=None, trimmed=(20, 0)))
    assert position == EventId(EPOCH, (20, 0))
    assert gap is not None and gap.reason == "unknown" and gap.resumed_after == position


def test_an_id_up_to_what_retention_removed_is_not_from_the_future() -> None:
    # Everything was trimmed by age; the newest issued id is the trimmed one.
    state = log_state(first=None, last=None, trimmed=(20, 0))
    position, gap = resume_point(EventId(EPOCH, (20, 0)), state)
    assert gap is None and position == EventId(EPOCH, (20, 0))


def test_a_missing_log_makes_every_cursor_unknown() -> None:
    missing = log_state(first=None, last=None, epoch=None)
    position, gap = resume_point(EventId(EPOCH, (15, 0)), missing)
    assert position == ORIGIN
    assert gap is not None and gap.reason == "unknown" and gap.resumed_after is None


def test_the_origin_resumes_from_the_start_of_any_log() -> None:
    assert resume_point(ORIGIN, log_state(epoch=None)) == (ORIGIN, None)
    assert resume_point(ORIGIN, log_state()) == (EventId(EPOCH, (0, 0)), None)
    _, gap = resume_point(ORIGIN, log_state(trimmed=(9, 0)))
    assert gap is not None and gap.reason == "trimmed"


def test_earliest_and_latest_points() -> None:
    state = log_state(trimmed=(9, 0))
    assert earliest_point(state) == EventId(EPOCH, (9, 0))
    assert latest_point(state) == EventId(EPOCH, (20, 0))
    assert earliest_point(log_state(epoch=None)) == latest_point(log_state(epoch=None)) == ORIGIN


def test_a_cursor_of_a_log_deleted_a_moment_ago_gets_a_deleted_gap() -> None:
    deleted = LogState(
        epoch=None, length=0, first=None, last_entry=None, trimmed_through=(0, 0),
        deleted_epoch=EPOCH, deleted_at=(20, 0),
    )  # fmt: skip
    position, gap = resume_point(EventId(EPOCH, (15, 0)), deleted)
    assert position == EventId(EPOCH, (20, 0))  # the marker's: told there (a reconnect: 204)
    assert gap == Gap("deleted", EventId(EPOCH, (15, 0)), None)
    _, other = resume_point(EventId("zzzzzzzz", (15, 0)), deleted)
    assert other is not None and other.reason == "unknown"


def test_the_origin_is_told_of_a_log_it_saw_live_that_is_gone_or_replaced() -> None:
    """A stream at the origin saw entries of log ``seen`` live without delivering them:
    that log still there, it is replayed from its start; gone, the stream is told
    (``unknown``), and a later log is read from its start."""
    seen = "seenlogx"
    assert resume_point(ORIGIN, log_state(epoch=seen), seen=seen) == (EventId(seen, (0, 0)), None)
    gone = log_state(first=None, last=None, epoch=None)
    assert resume_point(ORIGIN, gone, seen=seen) == (ORIGIN, Gap("unknown", ORIGIN, None))
    replaced = resume_point(ORIGIN, log_state(), seen=seen)
    assert replaced == (EventId(EPOCH, (0, 0)), Gap("unknown", ORIGIN, None))


def _no_log(now_ms: int, **deleted: Any) -> LogState:
    return LogState(
        epoch=None, length=0, first=None, last_entry=None, trimmed_through=(0, 0),
        clock_ms=now_ms, **deleted,
    )  # fmt: skip


def test_a_state_with_no_log_stamps_the_origin_with_the_stores_time() -> None:
    assert latest_point(_no_log(5000)) == EventId("0", (5000, 0))
    assert earliest_point(_no_log(5000)) == EventId("0", (5000, 0))


def test_an_origin_with_a_time_is_told_of_a_log_deleted_since() -> None:
    """A client back with ``0.T-0`` (no log at T) after a log was made and deleted:
    its events went with it, and the marker (newer than T) says so."""
    deleted = {"deleted_epoch": EPOCH, "deleted_at": (7000, 1)}
    since = EventId("0", (6000, 0))
    assert resume_point(since, _no_log(8000, **deleted)) == (
        EventId(EPOCH, (7000, 1)),
        Gap("deleted", since, None),
    )
    before = EventId("0", (7500, 0))  # the deletion came before its time: nothing missed
    assert resume_point(before, _no_log(8000, **deleted)) == (before, None)
    # With no time, nothing can be told; the origin it goes on from carries now's.
    assert resume_point(ORIGIN, _no_log(8000, **deleted)) == (EventId("0", (8000, 0)), None)


def test_the_origin_of_a_state_comes_after_every_deletion_it_knows() -> None:
    """A marker's id may pass the clock (written the same millisecond, or ids ahead of
    it): an origin at the clock took that deletion, known when the stream began, for
    one since, and told a stream opened after a DELETE that it was deleted (it ended,
    and its client was answered 204 for good)."""
    known = _no_log(7000, deleted_epoch=EPOCH, deleted_at=(7000, 3))
    assert known.origin == EventId("0", (7000, 3))
    assert resume_point(known.origin, known) == (known.origin, None)
    ahead = _no_log(7000, deleted_epoch=EPOCH, deleted_at=(12000, 0))
    assert resume_point(ahead.origin, ahead) == (ahead.origin, None)


TTL_MS = 1000


def test_an_origin_a_ttl_old_with_no_log_now_may_have_missed_a_log_that_expired() -> None:
    """A log made after the origin's time lived a TTL after its last append at least:
    with no log now, an origin a TTL old or more may have missed a whole one."""
    held = EventId("0", (6000, 0))
    told = resume_point(held, _no_log(7000), ttl_ms=TTL_MS)
    assert told == (EventId("0", (7000, 0)), Gap("unknown", held, None))  # waits at now's
    assert resume_point(held, _no_log(6999), ttl_ms=TTL_MS) == (held, None)  # too soon
    assert resume_point(held, _no_log(9000)) == (held, None)  # no TTL: nothing expires
    no_time = resume_point(ORIGIN, _no_log(9000), ttl_ms=TTL_MS)
    assert no_time == (EventId("0", (9000, 0)), None)  # 0.0-0: nothing to judge by


def test_an_origin_a_ttl_before_the_logs_creation_may_have_missed_an_earlier_log() -> None:
    """A log there now, made a TTL or more after the origin's time (its first entry's),
    may have followed one that came and expired between: told, then read from its start.
    Made sooner, nothing could have expired between. Trimmed, its ``trimmed`` gap tells."""
    held = EventId("0", (6000, 0))
    later = log_state(first=(7000, 0), last=(7500, 0))
    assert resume_point(held, later, ttl_ms=TTL_MS) == (
        EventId(EPOCH, (0, 0)),
        Gap("unknown", held, None),
    )
    sooner = log_state(first=(6999, 5), last=(7500, 0))
    assert resume_point(held, sooner, ttl_ms=TTL_MS) == (EventId(EPOCH, (0, 0)), None)
    trimmed = log_state(first=(7000, 0), last=(7500, 0), trimmed=(6999, 0))
    _, gap = resume_point(held, trimmed, ttl_ms=TTL_MS)
    assert gap is not None and gap.reason == "trimmed"


def test_a_connected_origin_is_refreshed_only_while_there_is_no_log_and_no_deletion() -> None:
    held = EventId("0", (6000, 0))
    assert refreshed_origin(held, _no_log(6500)) == EventId("0", (6500, 0))
    assert refreshed_origin(held, log_state()) is None  # the live path delivers it
    deleted = _no_log(6500, deleted_epoch=EPOCH, deleted_at=(6200, 0))
    assert refreshed_origin(held, deleted) is None  # the live path tells it
    older = _no_log(6500, deleted_epoch=EPOCH, deleted_at=(5000, 0))
    assert refreshed_origin(held, older) == EventId("0", (6500, 0))
    assert refreshed_origin(held, _no_log(5000)) is None  # (a clock stepped back: kept)
