"""What a streaming ingest (``api.ingest``) tells its producer when its lines or its log
are lost mid-ingest, and so how the producer resends them exactly.

A log lost whole (a Redis restarted without its data, the topic expired) or deleted, a
log that lost the ingest's newest lines (a failover to a replica that had not received
them), and line records that lapsed under it each get an answer of their own: what was
stored, and whether the whole stream resent stores it again or only the lines after the
last one kept, as a stream of their own. Where no line record can tell which lines a
failover kept (without an Idempotency-Key, or past the window), the ingest remembers
where its newest appends ended, and finds the last one the log still holds by bisection.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from broker import Broker, EventId, StoreUnavailable
from broker.errors import LinesKept, LinesLost, LogDeleted, LogGone, LogLost, RecordsLapsed
from broker.ids import StreamPosition

REMEMBERED_APPENDS = 64
"""An ingest remembers where its newest appends ended, to tell which of its lines a
failover lost when no line record can (without an Idempotency-Key, or past the window;
some 6 KB; a failover loses what the replica had not received yet, mostly milliseconds
of appends; at one append a token, 64 are a second or more of them)."""


class StoredSoFar(Protocol):
    """What the ingest stored so far (``api.ingest.IngestResult``)."""

    count: int
    first: EventId | None
    last: EventId | None


class LossTelling:
    """The part of an ``Ingest`` that tells its producer what was lost, and remembers
    where its newest appends ended to tell it. A mixin: the ingest's state it reads is
    declared here, and set by ``Ingest.__init__`` and its appends."""

    broker: Broker
    topic: str
    result: StoredSoFar
    log_epoch: str | None
    _key: str | None
    _append_timeout: float
    _body_ended: bool
    _last_line: int
    _appends_ended: deque[tuple[StreamPosition, int]]
    _forgotten_through: int

    def _remember_append(self, last_entry: StreamPosition, last_line: int) -> None:
        ended = self._appends_ended
        if len(ended) == ended.maxlen:
            self._forgotten_through = ended[0][1]
        ended.append((last_entry, last_line))

    async def _told_lost(self, lost: LogGone) -> LogGone:
        if isinstance(lost, LinesLost) and (self._key is None or not lost.replayable):
            return await self._lines_lost_unrecorded(lost.kept_through)
        return self._lost(lost)

    async def _lines_lost_unrecorded(self, kept_through: StreamPosition | None) -> LinesLost:
        """Lines a failover lost, told to a producer whose resend of the whole stream would
        store the lines kept twice: it has no Idempotency-Key, or its lines' records were
        past the window (``LinesLost.replayable``). So it is told after which line they
        were lost, to send the rest again (``kept``: a 409 without Retry-After, which no
        producer takes for a resend of the whole stream, ``api.problems``); with none of
        them kept, the whole stream (``_none_kept``). ``kept_through``: where the store
        told which of its entries were kept (``LinesLost.kept_through``)."""
        head = (
            "lines of this ingest were lost from the topic's log (a failover to a replica "
            f"that had not received them yet): {self.result.count} line(s) were stored before"
        )
        if self._key is None:
            resend = (
                "no later line was stored; send the lost lines again (without an "
                "Idempotency-Key, the whole stream sent again stores the lines kept twice)"
            )
        else:
            resend = (
                "no later line was stored; send the stream again from its first line lost "
                "on, as a stream of its own (under its Idempotency-Key or another): the "
                "lines kept are no longer recorded under the key (they went with the lines "
                "lost, or lapsed: the store out of reach while this ingest paused past "
                "BROKER_IDEMPOTENCY_SECONDS), so the whole stream sent again would store "
                "them twice"
            )
        mid_body = not self._body_ended
        try:
            async with asyncio.timeout(self._append_timeout):  # (a read each: bounded whole)
                kept, exact, entry = await self._last_line_kept(kept_through)
        except (StoreUnavailable, TimeoutError):
            if self._last_line == 1:  # (line 1 lost: none before it, none kept)
                return self._none_kept(head, mid_body)
            lost = f"line {self._last_line}, the last of them, is lost, and perhaps lines before it"
            detail = f"{head}; {lost} (the log could not be read to tell); {resend}"
            at_most = LinesKept(self._last_line - 1, exact=False)
            return LinesLost(detail, mid_body=mid_body, kept=at_most)
        if exact and kept == 0:
            return self._none_kept(head, mid_body)
        maybe = ""
        if not exact:
            maybe = (
                " (and perhaps lines before it: this ingest knows where only its last "
                f"{REMEMBERED_APPENDS} appends ended)"
            )
        detail = f"{head}; the lines after line {kept} are lost{maybe}; {resend}"
        return LinesLost(detail, mid_body=mid_body, kept=self._lines_kept(kept, exact, entry))

    def _none_kept(self, head: str, mid_body: bool) -> LinesLost:
        """Every line of the ingest lost, told to a producer whose lines are not (or no
        longer) recorded: the whole stream is the rest, and resent whole (with its key: a
        key whose records went, or lapsed, begins a new ingest of it) stores each line
        once. So it is told ``resend: whole``, a 503 with Retry-After, as a replayable
        loss is (``kept`` None: ``api.problems``); a loss with lines kept is a 409."""
        detail = (
            f"{head}; the lines after line 0 are lost, every line of it; no later line was "
            "stored; send the whole stream again: none of it is kept, so none is stored twice"
        )
        return LinesLost(detail, mid_body=mid_body)

    def _lines_kept(self, through: int, exact: bool, entry: StreamPosition | None) -> LinesKept:
        """Lines 1..``through`` kept, the last one's entry ``entry`` (None: no line, or
        not known): with their first and last ids when known (the first line's entry is
        kept with any later one: a failover loses the newest)."""
        if not exact or entry is None or self.log_epoch is None or self.result.first is None:
            return LinesKept(through, exact)
        last = EventId(self.log_epoch, entry)
        return LinesKept(through, first_id=str(self.result.first), last_id=str(last))

    async def _last_line_kept(
        self, kept_through: StreamPosition | None
    ) -> tuple[int, bool, StreamPosition | None]:
        """The last line of the newest append the log still holds, whether that is known
        exactly (not when even the oldest append remembered is lost, and earlier ones
        were forgotten), and its entry (None: none remembered kept). A failover loses the
        newest appends, so those kept are the first ones: found by bisection, a read
        each; or, where the store told which were kept (``kept_through``: the log's
        trimming cannot tell a lost entry from one trimmed), by that."""
        if kept_through == (0, 0):  # (none kept: no read)
            return 0, True, None
        ended = list(self._appends_ended)
        kept, lost = 0, len(ended)  # (ended[:kept] are held, ended[lost:] lost)
        while kept < lost:
            middle = (kept + lost) // 2
            entry = ended[middle][0]
            if kept_through is not None:
                held = entry <= kept_through
            else:
                held = await self._still_held(entry)
            if held:
                kept = middle + 1
            else:
                lost = middle
        if kept:
            return ended[kept - 1][1], True, ended[kept - 1][0]
        return self._forgotten_through, self._forgotten_through == 0, None

    async def _still_held(self, entry: StreamPosition) -> bool:
        """Whether the log holds the entry, or retention removed it (no loss)."""
        page = await self.broker.store.read_range(self.topic, entry, 1)
        return page.epoch == self.log_epoch and (page.after_found or entry <= page.trimmed_through)

    def _records_lapsed(self) -> RecordsLapsed:
        """Its lines stored, none lost, but no longer recorded under its key: the truth,
        and the one resend that stores each line once (the rest, as a stream of its own:
        a new stream under the key, its records lapsed, is a new ingest of it)."""
        last = self._last_line
        detail = (
            "this ingest's line records lapsed (past BROKER_IDEMPOTENCY_SECONDS since its "
            "last write by Redis's clock: it paused while the store could not be reached to "
            "keep them, or the clock jumped forward, or a failover brought back an older "
            f"time of that write): {self.result.count} line(s) were stored, up to line "
            f"{last}, the last {self.result.last or 'none'}, and none was lost, but they are "
            "no longer recorded under its Idempotency-Key; no later line was stored; send the "
            f"lines after line {last} as a stream of their own (its line 1 the first of them, "
            "under this Idempotency-Key or another), not the whole stream again: that would "
            "store the lines stored already twice"
        )
        entry = None if self.result.last is None else self.result.last.position
        stored = self._lines_kept(last, True, entry)
        return RecordsLapsed(detail, mid_body=not self._body_ended, kept=stored)

    def _lost(self, lost: LogGone) -> LogGone:
        """The producer told what was lost, and whether its resend stores it again; the
        answer closes the connection if the body is still coming (``LogGone.mid_body``)."""
        stored, mid_body = self.result.count, not self._body_ended
        if isinstance(lost, RecordsLapsed):
            return self._records_lapsed()
        if isinstance(lost, LogDeleted):
            detail = (
                f"the topic was deleted while this ingest was writing to it: the {stored} "
                "line(s) of it stored before went with it, and no later line was stored "
                "(nor the topic closed); do not send it again: that would create the topic "
                "again"
            )
            return LogDeleted(detail, mid_body=mid_body)
        if isinstance(lost, LinesLost):
            detail = (
                f"lines of this ingest were lost from the topic's log (a failover to a "
                f"replica that had not received them yet): {stored} line(s) were stored "
                f"before, and the last of them, line {self._last_line}, is no longer there; "
                "no later line was stored; send the whole stream again (with its "
                "Idempotency-Key: the lines kept are replayed, the rest stored after them, "
                "in order)"
            )
            return LinesLost(detail, mid_body=mid_body)
        detail = (
            f"the topic's log was lost after {stored} line(s) of this ingest were stored in "
            "it (a Redis restarted without its data, or the topic deleted or expired): those "
            "lines went with it, and no later line was stored; send the whole stream again "
            "(with its Idempotency-Key: it is stored again, in order)"
        )
        return LogLost(detail, mid_body=mid_body)
