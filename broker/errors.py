"""The core's errors. The HTTP edge maps each class to one status, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.ids import StreamPosition


class BrokerError(Exception):
    """Base of every error the core raises on purpose."""


class InvalidInput(BrokerError):
    """A request the broker refuses as malformed (HTTP 400)."""

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class InvalidTopic(InvalidInput):
    """A topic name outside 1-200 characters of ``A-Z a-z 0-9 _ . : -``."""


class InvalidEventId(InvalidInput):
    """A Last-Event-ID (or cursor) that is not an id this broker could have issued."""


class TooLarge(BrokerError):
    """An event, body or batch over its configured limit (HTTP 413)."""

    def __init__(self, detail: str, *, limit: int) -> None:
        super().__init__(detail)
        self.detail = detail
        self.limit = limit


class StoreUnavailable(BrokerError):
    """The store could not be reached or did not confirm in time (HTTP 503)."""

    title = "Store unavailable"  # (the problem's title, and its type's name)

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        # The Idempotency-Key a retry must carry, when the publisher made it up (the
        # direct publisher): the append may have been stored.
        self.idempotency_key: str | None = None


class StoreFull(StoreUnavailable):
    """The store refused a write for want of memory (Redis at its ``maxmemory`` with
    ``noeviction``): nothing of it was stored (HTTP 503; retry once room is made)."""

    title = "Store full"


@dataclass(frozen=True, slots=True)
class LinesKept:
    """Which lines of a streaming ingest its log kept, told to a producer that is to send
    the rest as a stream of its own (the whole stream resent would store them twice).

    ``through``: the last line kept (0: none), exactly when ``exact``; else at most that
    one (the ingest could not tell which, and nobody can resend exactly). ``first_id``
    and ``last_id``: the ids of the first and last lines kept, when known."""

    through: int
    exact: bool = True
    first_id: str | None = None
    last_id: str | None = None


class LogGone(BrokerError):
    """The log a streaming ingest under way was writing to is not as the ingest left
    it (or no longer records its lines), and its append was refused whole. Not a store
    outage: the store answered (so it is neither counted nor logged as one). Each
    subclass says what became of the log; the edge maps each to its answer
    (``api.problems``)."""

    title = "Ingest log gone"  # (the problem's title, and its type's name)

    def __init__(
        self, detail: str, *, mid_body: bool = False, kept: LinesKept | None = None
    ) -> None:
        """``mid_body``: told before the request's body ended (set by the ingest): the
        answer then closes the connection, so that a producer still sending learns at
        once, as of a store failure (``api.problems.StoreLostMidBody``). ``kept``: set
        by the ingest when the rest is to be sent as a stream of its own (its answer
        says so in members a client reads: ``api.problems``)."""
        super().__init__(detail)
        self.detail = detail
        self.mid_body = mid_body
        self.kept = kept


class LogLost(LogGone):
    """The log a streaming ingest under way was writing to is gone (a Redis restarted
    without its data, the topic expired; a deletion the store no longer knows of):
    the lines it stored there went with it, and its append was refused whole, so that
    the resend of the whole stream under its key stores every line again, in order
    (HTTP 503, ``Retry-After``). A deletion it knows of is ``LogDeleted``."""

    title = "Ingest log lost"
    retry_after = 1


class LinesLost(LogLost):
    """The log a streaming ingest under way was writing to is kept, but lost the
    ingest's newest lines (a failover to a replica that had not received them yet):
    its append was refused whole, so that the resend of the whole stream under its key
    replays the lines kept and stores the rest after them, in order (HTTP 503). Told
    with ``kept`` (lines kept that the whole stream resent would store twice: not
    ``replayable``, or without a key), it is HTTP 409, no ``Retry-After``: a producer
    retries a 503 by resending the whole stream (``api.problems``)."""

    title = "Ingest lines lost"
    replayable = True
    """Whether the lines kept are still recorded under the ingest's Idempotency-Key, so
    that the resend of the whole stream replays them: not once its records were past
    the window (they went with every line of it; or they lapsed, the store out of reach
    for most of the window while the ingest paused, see ``Store.keep_lines``), where the
    store told the loss by the entry it stored last, and the resend stored the lines
    kept twice."""
    kept_through: StreamPosition | None = None
    """Where the store can tell (an ingest without a key: the meta's newest such entry,
    before the one it stored last; with one, ``(0, 0)`` where its ingest began within the
    window and its records are gone): the log kept its entries at or before this one, and
    lost those after it, whatever retention trimmed since (``(0, 0)``: none kept). None:
    not told, its entries are looked for in the log (``api.ingest_lost``)."""


class RecordsLapsed(LogGone):
    """The line records of a keyed streaming ingest under way lapsed (past the window:
    they could not be kept answering while it paused, the store out of reach for most
    of the window; or Redis's clock stepped forward), its log kept whole: its append was
    refused whole, nothing stored nor recorded (HTTP 409). Gone on, its lines from then
    on were recorded anew under its key, and the whole stream resent with the key, as a
    producer whose connection broke does, stored its early lines twice, silently. The
    lines after the last one stored are to be sent as a stream of their own."""

    title = "Ingest records lapsed"


class LogDeleted(LogGone):
    """The log a streaming ingest under way was writing to was deleted (``DELETE`` of
    its topic): its append was refused whole, and it is not to be resent (HTTP 409):
    a producer that resent its stream, as a 503 tells it to, created again the topic
    its owner had deleted on purpose."""

    title = "Topic deleted"


class StoreMisconfigured(StoreUnavailable):
    """The store is set up so that the broker cannot keep its promises (a Redis that
    may evict the broker's keys): writes are refused (HTTP 503), and ``broker serve``
    does not start, until it is fixed."""

    title = "Store may evict events"


class TopicNotFound(BrokerError):
    """A topic that has never had an event (HTTP 404)."""

    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic!r} has no events")
        self.topic = topic


class TopicClosed(BrokerError):
    """A publish to a topic that was closed (HTTP 409): its log ends with ``broker.end``."""

    def __init__(self, topic: str, end_id: str, *, stored_before: int = 0) -> None:
        """``stored_before``: the lines a streaming ingest stored before it closed."""
        told = f"; {stored_before} line(s) stored before it closed" if stored_before else ""
        super().__init__(f"topic {topic!r} is closed; its end is {end_id}{told}")
        self.topic = topic
        self.end_id = end_id


class StreamOver(BrokerError):
    """A subscription with nothing left to deliver: every topic is closed and the
    cursor is at or past its end (HTTP 204, which stops an EventSource for good)."""
