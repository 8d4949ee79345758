"""The storage seam: the few operations the core needs from an event log store.

The Redis Streams implementation (``broker.redis_store``, with its parts, pools,
options, live readers and URL parsing in the other ``broker.redis_*`` modules)
is the only code that imports ``redis``. The embedded default store is that same implementation
over an in-process fakeredis, so both keep one set of semantics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from broker.ids import StreamPosition
from broker.listing import Listing
from broker.model import AppendResult, IngestLines, LogEntry, LogPage, LogState, NewEvent
from broker.policy import Policies


class Store(Protocol):
    """An ordered, durable log per topic."""

    durable: bool
    description: str
    policies: Policies
    """Each topic's retention and expiry."""
    idempotency_seconds: int
    """How long an idempotency record answers after its write (an ingest's lines: after
    its last line, or its last ``keep_lines``)."""

    async def append(
        self,
        topic: str,
        events: Sequence[NewEvent],
        *,
        idempotency_key: str | None = None,
        lines: IngestLines | None = None,
        close: bool = False,
        streaming: bool = False,
        log_epoch: str | None = None,
        after_entry: StreamPosition | None = None,
    ) -> AppendResult:
        """Append atomically and in order, then close the topic if asked (a final
        ``broker.end`` entry). A repeated idempotency key appends nothing; with
        ``lines`` each event has its own record (a streaming ingest's line). ``streaming``:
        nobody waits on this append to send more (a streaming ingest), so it may
        wait a moment for company on its way to the store. ``log_epoch``: the log the
        append must go to (a streaming ingest under way: its earlier lines' epoch);
        raises LogLost, nothing stored, if the topic's log is another one or none (or
        LogDeleted if that log was deleted, while the store still knows of it), and
        LinesLost if it no longer records the line the request stored last
        (``lines.after``, while the ingest's records answer: within the window), or no
        longer holds ``after_entry``, the entry the request stored last (``(0, 0)``: none
        yet; retention's trimming is no loss; checked for an ingest without lines, no
        Idempotency-Key, and for one whose records are past the window); and
        RecordsLapsed, nothing stored nor recorded, if its records are past the window
        while that entry is still held (not for a close: it has no line). ``lines.since``
        (the ingest its lines went to, ``AppendResult.ingest_since``) tells a loss where
        the entry cannot (retention trimmed past it since): ``lines.after`` not recorded in
        that ingest, still under way, or that ingest begun within the window and its
        records gone (``LinesLost.kept_through`` (0, 0): none kept). A resent line
        recorded already that is not the event stored for it, or lines out of step with
        those another stream stored under the key (blank lines counted: ``lines.after`` 0
        says the request's lines before these are blank, ``lines.blank_through`` that its
        body ended with blank lines): InvalidInput, nothing stored.
        Raises TopicClosed if the topic is closed (a repeated close answers its end)."""
        ...

    async def keep_lines(self, topic: str, key: str, log_epoch: str) -> bool:
        """Keep the line records of the streaming ingest ``key``, open and writing to the
        log of ``log_epoch``, answering as if it had just written a line (its body may
        stay open however long: blank lines, or a line sent in slow pieces). False, and
        nothing written, if they answer no more (past the window, or lost), or the log
        is another or none: records lapsed are never revived. A topic's TTL is not
        extended."""
        ...

    async def delete(self, topic: str) -> bool:
        """Delete the topic now; False if there was none."""
        ...

    async def list_topics(
        self, listing: Listing, cursor: str | None, limit: int, shown: Callable[[str], bool] = ...
    ) -> tuple[list[tuple[str, LogState]], str | None]:
        """At most ``limit`` existing topics of ``listing`` that ``shown`` lets the caller
        see, and the next cursor (which names no other topic)."""
        ...

    async def read_range(
        self, topic: str, after: StreamPosition, count: int, max_bytes: int = ...
    ) -> LogPage:
        """Up to ``count`` entries after ``after``, oldest first, with the log's epoch and
        how far retention has trimmed it, read in the same atomic step; fewer when they
        would pass ``max_bytes`` (``cut_short``; one entry at least)."""
        ...

    def may_have_trimmed(
        self, topic: str, after: StreamPosition, entries: list[LogEntry], away_ms: float
    ) -> bool:
        """Whether retention could have removed entries between ``after`` and ``entries``
        (a live read returned them after it; ``away_ms`` since the reader's previous read
        returned): False proves it did not, True asks the reader to check ``state``.
        Cheap: called for every live read."""
        ...

    async def read_live(
        self, positions: dict[str, StreamPosition], block_ms: int
    ) -> dict[str, list[LogEntry]]:
        """Wait up to ``block_ms`` for entries after each topic's position."""
        ...

    def take_unread_spells(self) -> dict[str, float]:
        """Topics that the last ``read_live`` read again after some went unread (a
        Cluster node failed while the others answered), with how long (ms): the live
        reader checks whether retention by age trimmed past them meanwhile."""
        ...

    async def interrupt_live_read(self) -> bool:
        """Make a waiting ``read_live`` return now; False if none was waiting yet."""
        ...

    async def state(self, topic: str) -> LogState:
        """The log's epoch, extent and retention point, read atomically."""
        ...

    async def revalidate(
        self, topic: str, epoch: str, read_through: StreamPosition, number: int | None = None
    ) -> LogState:
        """``state``, for a live reader back after an outage that had read the log of
        ``epoch`` through ``read_through`` (entry ``number`` of it, if known): if that log
        no longer holds that entry and retention did not remove it, the log lost events;
        the same atomic step records it (replays that go on past it say so:
        ``LogPage.losses``), numbers the log's next entry past ``number`` (so that another
        reader, which never read the lost ones, sees the next entry not follow what it
        read) and the state says after which entry (``LogState.lost_after``)."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        ...

    async def clock_ms(self) -> int:
        """The store's own time (ms): the clock event ids are made of, whatever this
        host's says."""
        ...

    async def open(self) -> None:
        """Open the connections it keeps now, rather than on first use; best effort."""
        ...

    async def close(self) -> None: ...
