"""Streaming ingest: ``POST /topics/{t}/events`` with ``Content-Type: application/x-ndjson``.

A producer pipes a token stream through one request: each line is one JSON
event object, stored and delivered as it arrives, not when the body ends.

- Order and pipelining: the lines of what arrived are appended, in order, as
  one atomic batch; while that append is in flight what arrives next waits in
  the connection's buffer, and goes in the next batch. One append is in flight
  per request at a time (on two pooled connections Redis could run two in either
  order), a line never waits for more than the append before it, and under load
  each Redis round trip carries many lines. One task does it all: measured, a
  separate sender task and its queue cost a task switch per line.
- Idempotency: with ``Idempotency-Key: K``, line n is stored under ``K:n``
  (n counts from 1, blank lines included), so a producer whose connection
  broke sends the whole stream again and no line is stored twice, however long
  the ingest stayed open: the records answer for the window after its last line,
  and while it is open its watch keeps them answering (``api.ingest_records``:
  the body's timeout runs from each read, so blank lines, or a line sent in slow
  pieces, kept it open past the window, and its records lapsed). The same
  stream: a resent line that is not the one stored under its number is a bad
  line (400), the store refusing it before anything of its batch is stored.
- Two streams under one Idempotency-Key may be open at once (a retry while the
  first connection is still alive, on this instance or another): no lease locks
  the resend out. Each line is stored once, by whichever stream brings it first,
  after the line before it in that stream, so the log holds one stream's lines in
  order; the same stream twice is answered twice with the same ids, and a stream
  out of step with the lines recorded (they differ, if only by a blank line) is
  refused 400 at its first line that differs (``out_of_step`` in the append script,
  ``broker/lua/ingest_lines.lua``; the README's streaming ingest), the answer saying what
  the request stored before it (its lines before it in the same append were refused
  with it: the line's number did not tell).
- Memory is bounded whatever the body's length: one line at most
  ``max_event_bytes`` plus its envelope, and what one read of the body brings
  (the edge stops reading the socket while the ingest is not reading the body).
- Two edges feed it: the ASGI route (``api.publish``, the body from ``receive``,
  ``AsgiBody``) and the connection itself (``api.lean_ingest``, the body decoded
  where it arrives). Both read the body through ``IngestBody``, so lines, keys,
  batching, limits and the idle deadline are decided here only.
- One log: once a line is stored, every later append must find the topic's log
  it went to (``log_epoch``). A log lost mid-ingest (a Redis restarted without its
  data, the topic deleted or expired) ends the ingest with 503, nothing stored in a
  new log: there the later lines, recorded, made the resend store the lost ones
  after them, out of order. Resent whole, the stream is stored again, in order.
  So does a log that lost the ingest's newest lines (a failover to a replica that
  had not received them: the same log, its epoch unchanged): each append names the
  line the request stored last (``IngestLines.after``), which must still be recorded,
  and its entry, which must still be in the log where the records cannot tell (the
  ingest past its window, or every line of it lost), whatever the window. Without an
  Idempotency-Key (no line records) the entry tells; such a producer cannot resend
  exactly, so it is told the last line the log kept. So is one whose records were past
  the window (they are kept answering while it is open: so, they went with every line
  of it, or lapsed, the store out of reach for most of the window): its lines kept
  answer no more, and its resend stored them twice. Records that lapsed with nothing
  lost (the entry still in the log) end it too, with 409 ingest-records-lapsed: gone
  on, its next lines were recorded anew under its key, and the whole stream resent with
  it stored its early lines twice; it is told to send the rest as a stream of its own.
  But a log deleted on purpose (DELETE, while the store knows of it) ends the ingest
  with 409 topic-deleted, not to be resent: a resend created the topic again. What each
  is told, and how a failover's lines kept are found: ``api.ingest_lost``.
- A bad line stops the ingest with 400 naming it; the lines before it stay
  stored. So does a token that expires while the stream goes on (401): a publish
  right ends with its token, however long the request. A key set (JWKS) not fetched
  again within its max stale is no verdict on the token: 503, told as a store failure
  is. ``?close=true`` closes the topic when the body ends, never when it breaks off.
"""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from starlette.types import Receive

from api.auth import OPEN, Grant
from api.ingest_lost import REMEMBERED_APPENDS, LossTelling
from api.ingest_records import LineRecordsKeeper
from api.ingest_watch import BODY, DRAIN, STORE, IngestWatch
from api.problems import (
    DrainedMidBody,
    HttpProblem,
    KeysUnavailable,
    StoreLostMidBody,
    TokenLapsedMidIngest,
)
from broker import (
    AppendResult,
    Broker,
    EventId,
    InvalidInput,
    NewEvent,
    StoreUnavailable,
    TooLarge,
    TopicClosed,
)
from broker.errors import LogGone, StoreMisconfigured
from broker.ids import StreamPosition
from broker.model import IngestAppendResult, IngestLines
from broker.validation import event_from_json, loads_exactly

LINE_ENVELOPE_BYTES = 4096
"""A line may exceed ``max_event_bytes`` by this much: the JSON around the data."""
JSON_WHITESPACE = b" \t\r"
"""All a blank line may hold (JSON's whitespace, less the line feed that ends it), and
it is skipped: ``bytes.strip()`` took a form feed or a vertical tab for blank too, and
a line of them, no JSON, was skipped where any other such line is a bad line (400)."""
CLIENT_GONE = "the client went away before the body ended"
TIMED_OUT = "the store did not confirm the write in time"


class IngestBody(Protocol):
    """A streaming request body, read as it arrives."""

    async def read(self) -> tuple[bytes, bool]:
        """What came since the last read (waiting for something), and whether more
        follows. Raises ``InvalidInput`` if the client went away before the end."""
        ...


class AsgiBody:
    """The body of an ASGI request (``receive``), as an ``IngestBody``."""

    __slots__ = ("_receive",)

    def __init__(self, receive: Receive) -> None:
        self._receive = receive

    async def read(self) -> tuple[bytes, bool]:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput(CLIENT_GONE)
        return bytes(message.get("body", b"")), message.get("more_body", False)


@dataclass
class IngestResult:
    """What one ingest stored: the ids (first ``keep`` of them), and their count."""

    keep: int
    ids: list[EventId] = field(default_factory=list)
    count: int = 0
    replayed: int = 0
    first: EventId | None = None
    last: EventId | None = None

    def add(self, ids: list[EventId]) -> None:
        if ids:
            self.first = self.first or ids[0]
            self.last = ids[-1]
        self.count += len(ids)
        room = self.keep - len(self.ids)
        self.ids += ids[: max(0, room)]

    def content(self) -> dict[str, Any]:
        if self.count <= self.keep:
            return {"ids": [str(event_id) for event_id in self.ids]}
        return {"count": self.count, "first_id": str(self.first), "last_id": str(self.last)}


class Ingest(LossTelling):
    """One streaming-ingest request: reads lines, appends them in order as they come."""

    result: IngestResult

    def __init__(
        self,
        broker: Broker,
        topic: str,
        *,
        key: str | None,
        max_event_bytes: int,
        max_batch: int,
        idle_timeout: float,
        append_timeout: float,
        grant: Grant = OPEN,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        """``draining``: whether the instance shuts down (the ingest then ends at its
        next wait for a line: ``DrainedMidBody``)."""
        self.broker = broker
        self._grant = grant  # until when, and while what, it may store
        self.topic = topic
        self._key = key
        self._max_line = max_event_bytes + LINE_ENVELOPE_BYTES
        self._max_event_bytes = max_event_bytes
        self._max_batch = max_batch
        self._idle_timeout = idle_timeout
        self._append_timeout = append_timeout
        self.result = IngestResult(keep=max_batch)
        self._draining = draining
        self._watch = IngestWatch(
            idle=idle_timeout, store=append_timeout, draining=draining, keeper=self._keeper()
        )
        self._body_ended = False
        self.log_epoch: str | None = None
        """The epoch of the log its lines went to, once one was stored (or replayed)."""
        self._last_line = 0
        """The number of the last line stored (or replayed): ``IngestLines.after``."""
        self._ingest_since = ""
        """With a key, the ingest under it its lines went to, as the store answered
        (``IngestLines.since``: "" until then). One for the request: an append whose lines
        would go to another (its own lapsed, or lost) is refused, and the ingest ends."""
        self._appends_ended: deque[tuple[StreamPosition, int]] = deque(maxlen=REMEMBERED_APPENDS)
        """The last entry and line of each of its newest appends."""
        self._forgotten_through = 0
        """The last line of the newest append no longer in ``_appends_ended``."""

    def _keeper(self) -> LineRecordsKeeper | None:
        """With an Idempotency-Key: what keeps its line records answering while it is
        open (``api.ingest_records``: its body's timeout runs from each read, and the
        records lapsed in a pause past the window)."""
        if self._key is None:
            return None
        window = self.broker.store.idempotency_seconds
        stored = self.result  # (read at the watch's looks, never per line)
        return LineRecordsKeeper(
            self._keep_lines, lambda: stored.count, window=window, timeout=self._append_timeout
        )

    async def _keep_lines(self) -> bool:
        if self._key is None or self.log_epoch is None:
            return False
        return await self.broker.store.keep_lines(self.topic, self._key, self.log_epoch)

    async def run(self, body: IngestBody) -> IngestResult:
        """Store every line of the body; raises on the first bad line, after storing
        the lines before it. The body must end normally for this to return. A store
        failure before the body's end is ``StoreLostMidBody`` (the connection closes)."""
        try:
            return await self._run(body)
        except StoreUnavailable as error:
            if isinstance(error, StoreLostMidBody):
                raise
            # What was stored before it, said (a producer without an Idempotency-Key
            # cannot tell otherwise, and sent the lines stored already again; audit).
            detail = f"{error.detail}; {self._stored_so_far()}"
            if self._body_ended:
                raise type(error)(detail, retry_after=error.retry_after) from error
            lost = StoreLostMidBody(detail, retry_after=error.retry_after)
            lost.title = error.title  # (a full store says so)
            raise lost from error

    async def _run(self, body: IngestBody) -> IngestResult:
        batch: list[tuple[int, NewEvent]] = []
        number = 0
        with self._watch:
            try:
                async for lines in self._reads(body):
                    for line in lines:
                        number += 1
                        if line.strip(JSON_WHITESPACE):
                            batch.append((number, self._parse(number, line)))
                            if len(batch) >= self._max_batch:
                                await self._append(batch)
                    if batch:  # what this read brought, stored before the next read
                        await self._append(batch)
                if number > self._last_line and self._key is not None:
                    await self._append(batch, blank_through=number)  # (its end: see _append)
            finally:  # a bad line or a broken body: the lines before it are stored all the same
                if batch:
                    await self._append(batch)
        return self.result

    def check_token(self) -> None:
        """Refuse to store more once the request's token has expired, or its key was
        removed from the key set (checked before each append of lines, and before
        ``?close=true`` closes the topic): 401. A key set past its max stale is no
        verdict on the token: ``KeysUnavailable`` (503), told as a store failure is
        (``run``: the lines stored so far, the connection closed mid-body), and the
        producer resends once the set is fetched again."""
        why = self._grant.lapsed()
        if why is not None:
            stored = f"{self.result.count} line(s) stored before it" if self.result.count else ""
            detail = f"{why} during the ingest" + (f": {stored}" if stored else "")
            raise TokenLapsedMidIngest(detail, token_given=True)

    async def close_topic(self) -> AppendResult:
        """Close the topic once the body ended (``?close=true``), in the log its lines
        went to: a log lost since is told as one lost mid-body, and no new one begun.
        Under the appends' deadline: the watch is over, and a store that stopped
        answering held the producer past it (until the connection's own reply timeout)."""
        self._checked_before_close()
        lines = None  # (its last line must be there still: see ``_append``)
        if self._key is not None and self._last_line:
            lines = IngestLines(self._key, [], self._last_line, since=self._ingest_since)
        try:
            async with asyncio.timeout(self._append_timeout):
                return await self.broker.publish(
                    self.topic,
                    [],
                    lines=lines,
                    close=True,
                    log_epoch=self.log_epoch,
                    after_entry=self._after_entry(),
                )
        except LogGone as gone:
            raise await self._told_lost(gone) from None
        except TimeoutError:
            raise self._close_unconfirmed(StoreUnavailable(TIMED_OUT)) from None
        except StoreUnavailable as error:
            raise self._close_unconfirmed(error) from error

    def _checked_before_close(self) -> None:
        """``check_token`` before the close is sent: a key set unavailable (503) told as a
        close not sent, with the lines stored, as the store's refusals are."""
        try:
            self.check_token()
        except KeysUnavailable as error:
            raise self._close_unconfirmed(error) from error

    def _close_unconfirmed(self, error: StoreUnavailable) -> StoreUnavailable:
        """The close failed, the lines stored: said, and how to close it (a close of a
        closed topic answers its end again, so it may have landed or not). A store that
        refuses writes as it may evict (``StoreMisconfigured``), or a key set past its max
        stale (``KeysUnavailable``), refused it before sending anything: the topic is
        open, and the answer says so. The error told is the store's, copied (its class,
        ``retry_after`` and any other field it carries), its detail saying the rest."""
        if isinstance(error, StoreMisconfigured | KeysUnavailable):
            close = "the topic was not closed (the close was not sent)"
        else:
            close = "the topic's close is not confirmed (it may have landed)"
        detail = (
            f"{error.detail}; {self._stored_so_far()}; {close}: send only the close again, "
            f"POST /topics/{self.topic}/close (a topic closed already answers its end again)"
        )
        told = copy.copy(error)
        told.detail, told.args = detail, (detail,)
        return told

    def _parse(self, number: int, line: bytes) -> NewEvent:
        try:
            document = loads_exactly(line)
        except orjson.JSONDecodeError as error:
            raise InvalidInput(f"line {number}: malformed JSON (or not UTF-8): {error}") from None
        try:
            return event_from_json(document, self._max_event_bytes)
        except InvalidInput as error:
            raise InvalidInput(f"line {number}: {error.detail}", field=error.field) from None
        except TooLarge as error:
            raise TooLarge(f"line {number}: {error}", limit=error.limit) from None

    async def _reads(self, body: IngestBody) -> AsyncIterator[list[bytes]]:
        """The whole lines of each read of the body, as they arrive; the last line
        may lack its line feed, a blank one too: ``{...}\\n  `` ends on a blank line 2,
        as ``{...}\\n  \\n`` does. It was not counted: under one key, a stream bringing a
        line 2 after the first was stored (201 both), where after the other it is refused
        (400). An empty rest after the last line feed is no line."""
        partial = b""
        whole = 0  # the lines yielded so far (numbered as ``run`` numbers them)
        limit = self._max_line
        while True:
            data, more = await self._read(body)
            received = partial + data
            lines = received.split(b"\n")
            partial = lines.pop()  # (not a starred unpacking: 1,100 instructions a read)
            # A line too long is refused however it arrived: whole in one read, or
            # still unfinished (held no further).
            too_long = len(partial) > limit
            if len(received) > limit:
                for index, whole_line in enumerate(lines):
                    if len(whole_line) > limit:
                        lines, too_long = lines[:index], True
                        break
            if too_long:
                yield lines  # (those before it are stored)
                number = whole + len(lines) + 1
                raise TooLarge(f"line {number}: longer than {limit} bytes", limit=limit)
            if not more:  # (its last line, blank or not, is a line without its line feed)
                yield [*lines, partial] if partial else lines
                return
            if lines:
                whole += len(lines)
                yield lines

    async def _read(self, body: IngestBody) -> tuple[bytes, bool]:
        if self._draining():
            raise self._drained()
        self._watch.waiting(BODY)
        try:
            read = await body.read()
        except asyncio.CancelledError:
            if self._watch.fired(DRAIN):
                raise self._drained() from None
            if not self._watch.fired(BODY):
                raise
            # On the ASGI route the guard's per-read deadline (api/guard.py) answers
            # 408 too when it fires first.
            detail = f"no line for {self._idle_timeout:g} s: ingest stopped"
            raise HttpProblem(408, "Request timeout", detail) from None
        self._watch.done()
        self._body_ended = not read[1]
        return read

    def _drained(self) -> DrainedMidBody:
        detail = (
            f"this instance is shutting down: {self._stored_so_far()}; send the rest to "
            "another instance (or the whole stream again with its Idempotency-Key: no "
            "line is stored twice)"
        )
        return DrainedMidBody(detail, retry_after=1)

    def _stored_so_far(self) -> str:
        return f"{self.result.count} line(s) stored, the last {self.result.last or 'none'}"

    async def _append(self, batch: list[tuple[int, NewEvent]], blank_through: int = 0) -> None:
        """Store the lines of ``batch``, emptying it first: a batch whose append failed
        (503) must not be sent again as the ingest unwinds (it was, and was stored
        twice once the store answered).

        ``blank_through``: a keyed body ended with blank lines after the last line stored
        (its last line's number, blanks counted; the batch empty): nothing is stored, but
        the store refuses it (400) if another stream under its key recorded a line where
        this one has a blank line, and else records its blank lines, so that a stream
        bringing a line there later is refused (``out_of_step``, lua/ingest_lines.lua). Asked once,
        at the end of a body that ends so; not refused for a token lapsed after the last
        line stored (every line was stored under it: answered as a body without those
        blank lines is, not 401)."""
        pending = batch.copy()
        batch.clear()
        if pending:  # (the end's check stores nothing: a token lapsed since refuses nothing)
            self.check_token()
        lines = None
        if self._key is not None:
            numbers = [n for n, _ in pending]
            lines = IngestLines(
                self._key, numbers, self._last_line, blank_through, self._ingest_since
            )
        self._watch.waiting(STORE)
        try:
            result = await self.broker.publish(
                self.topic,
                [event for _, event in pending],
                lines=lines,
                streaming=True,
                log_epoch=self.log_epoch,
                after_entry=self._after_entry(),
            )
        except LogGone as gone:
            # The store answered: what is read to tell the producer runs under a deadline
            # of its own (``_lines_lost_unrecorded``), not the append's: the append's, firing
            # meanwhile, cancelled it, and the producer got no answer at all.
            self._watch.done()
            raise await self._told_lost(gone) from None
        except asyncio.CancelledError:
            if not self._watch.fired(STORE):
                raise
            raise StoreUnavailable(TIMED_OUT) from None
        except TopicClosed as closed:  # (by another producer, mid-ingest: say what was kept)
            stored = self.result.count
            raise TopicClosed(closed.topic, closed.end_id, stored_before=stored) from None
        except InvalidInput as refused:  # (a line not the one stored under its number)
            # Nothing of this batch was stored, its lines before the one named either:
            # what this request stored is said, as a store failure's 503 says it.
            detail = f"{refused.detail}; {self._stored_so_far()}"
            raise InvalidInput(detail, field=refused.field) from None
        finally:
            self._watch.done()
        if pending:  # (the end's check stored nothing)
            self._stored(pending, result)

    def _stored(self, pending: list[tuple[int, NewEvent]], result: AppendResult) -> None:
        """What an append of ``pending`` stored (or replayed), added to the result."""
        self.result.add(result.ids)
        if result.ids:
            self.log_epoch = result.ids[0].epoch
        self._last_line = pending[-1][0]
        if result.replayed:
            self.result.replayed += len(result.ids)
        if not self._ingest_since and isinstance(result, IngestAppendResult):
            self._ingest_since = result.ingest_since  # (its one ingest: told once, kept)
        self._remember_append(result.ids[-1].position, pending[-1][0])

    def _after_entry(self) -> StreamPosition:
        """The entry the request stored last, which the log must still hold; (0, 0) before
        its first (``Store.append``: without a key, no line records, it is what tells a
        loss; with one, it tells when the line records cannot, past the window)."""
        return (0, 0) if self.result.last is None else self.result.last.position
