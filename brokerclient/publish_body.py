"""What a publish sends (internal to ``brokerclient.publisher``): an event as compact JSON,
a text as UTF-8, and a streaming ingest's ndjson lines.

A stream's lines are kept as they are sent, so that each retry sends them again (the
broker stores line n under key K:n: no line twice) and then goes on with the rest; what
the caller's iterator or events raise leaves httpx as ``_Interrupted``, which the
publisher raises as ``StreamInterrupted`` with the key to resend under. A stream the
broker told to send its rest as a stream of its own (``go_on_after``) sends the rest
under a key of its own, and keeps the lines stored before apart: a log lost under a later
part took them with it, and the whole stream is sent again (``start_over``). While the
iterator is silent, a space keeps the request open (``keepalive_seconds``): not a line,
so nothing of it is kept for a retry (``brokerclient.keepalive``).

The broker may have answered the request before the iterator raised (it refused a
line: a closed topic, lapsed line records), its answer unread while the body was still
being sent; then what it said, not "resend the same events", is what a resend must
follow. So ``_Interrupted`` is an ``httpcore.WriteError``: httpcore reads the answer
after a write that failed (a server may answer before the body's end), here for
``ANSWER_WAIT_S`` at most (the request's read timeout, set then; httpcore 1.0 reads it
when it begins to read), and the publisher raises what the answer says. A transport
that is not httpcore's HTTP/1.1 (HTTP/2, a mock) reads nothing: the advice stays
"resend the same events", and says the broker may have refused them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import httpcore
import httpx

from brokerclient.errors import StreamInterrupted
from brokerclient.http import idempotency_key_of
from brokerclient.keepalive import (
    END,
    KEEPALIVE,
    KEEPALIVES_PER_LINE,
    SILENT,
    AsyncStep,
    ThreadedSource,
)

EventObject = Mapping[str, Any]
"""An event as the JSON publish takes it: ``{"data": ..., "event"?: str, "retry"?: int}``."""
NDJSON = "application/x-ndjson"  # streaming ingest: one event per line
ANSWER_WAIT_S = 0.5
"""How long a stream whose iterator raised waits for an answer the broker may have
sent already: on loopback or a LAN one written is in well before; one not written by
then was not coming (the broker answers a body broken off with nothing)."""


def _json_body(item: Any) -> bytes:
    """Compact JSON; a ValueError for a NaN or an infinity, which JSON has not (the
    broker refused the body as malformed JSON)."""
    try:
        text = json.dumps(item, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as error:
        raise ValueError(f"not JSON: {error} (NaN and infinities have no JSON form)") from None
    return _utf8(text)


def _utf8(text: str) -> bytes:
    """``text`` in UTF-8; a ValueError for what has none (a lone surrogate, as a JSON
    ``"\\ud800"`` reads): it was a UnicodeEncodeError from deep inside."""
    try:
        return text.encode()
    except UnicodeEncodeError as error:
        bad = error.object[error.start : error.end].encode("unicode_escape").decode()
        raise ValueError(f"not valid Unicode text: {bad} at {error.start}") from None


class _Lines:
    """A stream's ndjson lines sent so far (a retry sends them again, then the rest).

    Sent in parts when the broker says so: lines 1..``after_line`` were kept by an
    earlier request, and ``_sent`` holds those sent since, under ``key``."""

    def __init__(self, key: str) -> None:
        self._callers_key = key
        self.key, self._sent = key, list[bytes]()
        self._stored_before = list[bytes]()  # (lines 1..after_line: see ``start_over``)
        self.after_line = 0
        self.earlier_keys = list[str]()
        """The keys its earlier parts were sent under (the caller's first), once it went on."""
        self.first_id: str | None = None
        """The id of the stream's first line, once a part of it was kept (else unknown)."""
        self.interrupted: _Interrupted | None = None
        """What the caller's iterator or events raised, once they did: the stream ends."""
        self._timeouts: dict[str, Any] = {}  # (the request under way's, read by httpcore)

    def sent_as(self, request: httpx.Request) -> httpx.Request:
        """``request`` (this stream's, under way): its read timeout is shortened once the
        caller's iterator raises, to read an answer the broker sent already."""
        self._timeouts = request.extensions.setdefault("timeout", {})
        return request

    def count(self) -> int:
        """The lines taken from the caller's iterator so far (all parts)."""
        return self.after_line + len(self._sent)

    def go_on_after(self, kept: int, first_id: str | None) -> bool:
        """The broker kept lines 1..``kept`` of this part (``first_id``: the first one's
        id), and the rest must go as a stream of its own (the whole stream again would
        store those twice): whether it can, exactly. It goes on under the key
        ``f"{callers_key}+{line}"`` (the stream's last line kept): a key of its own, so
        its own retries replay it (a new stream under a key whose records lapsed is a
        new ingest of it), and one the caller can tell."""
        if kept > len(self._sent):  # (a line not sent said kept: not this stream's answer)
            return False
        try:
            key = idempotency_key_of(f"{self._callers_key}+{self.after_line + kept}")
        except ValueError:  # (the caller's key is too long to derive one from)
            return False
        if kept and self.first_id is None and self.after_line == 0:
            self.first_id = first_id
        self._stored_before += self._sent[:kept]  # (stored: not sent again, unless lost)
        del self._sent[:kept]
        self.earlier_keys.append(self.key)
        # (its line and key in one step, no call between: a Ctrl-C landing between them
        # named the part's line with the key before it)
        self.after_line, self.key = self.after_line + kept, key
        return True

    def start_over(self) -> None:
        """The topic's log was lost under a part after the first (``ingest-log-lost``): the
        lines of the earlier parts went with it. Resent as the broker says (``resend:
        whole``) the part alone stored the stream without them, and its result said the
        whole stream stored: so the whole stream goes again, under the caller's key
        (its records went with the log: each line is stored once, in order)."""
        self._sent[:0] = self._stored_before
        self._stored_before = []
        self.after_line, self.key, self.earlier_keys = 0, self._callers_key, []
        self.first_id = None

    @contextlib.contextmanager
    def _callers_part(self) -> Iterator[None]:
        """What the caller's iterator or event raises ends the stream, as
        ``StreamInterrupted`` (through ``_Interrupted``), with the key a resend must send:
        a key made up for the stream was the caller's to learn nowhere else, and a resend
        under a new one stored the lines sent twice. httpx breaks the request off,
        unended: the broker takes it for no complete stream (``close`` is not done)."""
        try:
            yield
        except Exception as error:
            self.interrupted = _Interrupted(error, self.key, self.count(), self.after_line)
            self._timeouts["read"] = ANSWER_WAIT_S  # (its answer now, if it gave one)
            raise self.interrupted from error

    def _line(self, item: object) -> bytes:
        line = _json_body(item) + b"\n"
        self._sent.append(line)
        return line


class _SentLines(_Lines):
    """The ndjson lines of a stream: those sent already (for a retry), then the rest.
    With ``keepalive`` seconds, the iterator is read in a worker thread, and a space
    goes each time it is silent that long (``brokerclient.keepalive``)."""

    def __init__(self, source: Iterator[EventObject], key: str, keepalive: float | None) -> None:
        super().__init__(key)
        self._source = source
        self._keepalive = keepalive
        self._threaded = ThreadedSource(source) if keepalive else None

    def replay_then_rest(self) -> Iterator[bytes]:
        yield from list(self._sent)
        if self._threaded is not None:
            yield from self._rest_kept_open(self._threaded)
            return
        while True:
            with self._callers_part():
                item = next(self._source, END)
                if item is END:
                    return
                line = self._line(item)
            yield line

    def close(self) -> None:
        """The call is over: a worker thread reading the iterator ends."""
        if self._threaded is not None:
            self._threaded.close()

    def _rest_kept_open(self, source: ThreadedSource) -> Iterator[bytes]:
        spaces = 0  # (before the line to come: the connection's own, lost with it)
        while True:
            wait = self._keepalive if spaces < KEEPALIVES_PER_LINE else None
            with self._callers_part():
                item = source.next_within(wait)
                if item is END:
                    return
                line = KEEPALIVE if item is SILENT else self._line(item)
            spaces = spaces + 1 if item is SILENT else 0
            yield line


class _AsyncSentLines(_Lines):
    """``_SentLines`` over an async iterator; ``keepalive`` seconds: one step of it
    pending at a time, waited on that long (``brokerclient.keepalive``)."""

    def __init__(
        self, source: AsyncIterator[EventObject], key: str, keepalive: float | None
    ) -> None:
        super().__init__(key)
        self._source = source
        self._keepalive = keepalive
        self._stepped = AsyncStep(source) if keepalive else None

    async def replay_then_rest(self) -> AsyncIterator[bytes]:
        for line in list(self._sent):
            yield line
        if self._stepped is not None:
            async for line in self._rest_kept_open(self._stepped):
                yield line
            return
        while True:
            with self._callers_part():
                item = await anext(self._source, END)
                if item is END:
                    return
                line = self._line(item)
            yield line

    def close(self) -> None:
        """The call is over: a step of the iterator still pending is cancelled."""
        if self._stepped is not None:
            self._stepped.close()

    async def _rest_kept_open(self, source: AsyncStep) -> AsyncIterator[bytes]:
        spaces = 0
        while True:
            wait = self._keepalive if spaces < KEEPALIVES_PER_LINE else None
            with self._callers_part():
                item = await source.next_within(wait)
                if item is END:
                    return
                line = KEEPALIVE if item is SILENT else self._line(item)
            spaces = spaces + 1 if item is SILENT else 0
            yield line


class _Interrupted(httpcore.WriteError):
    """The caller's part of a stream raised ``error``: carried out of httpx in this (and
    kept on the stream's ``_Lines``), as httpcore re-raises what passes through it
    ``from None`` (a StreamInterrupted lost its cause so: the caller's own error, which
    the traceback then did not show). A write error, so that httpcore reads the answer
    the broker may have sent already (see the module's docstring)."""

    def __init__(self, error: Exception, key: str, lines_sent: int, after_line: int) -> None:
        super().__init__(error)
        self.error, self.key, self.lines_sent = error, key, lines_sent
        self.after_line = after_line

    def public(self, heard: str = "") -> StreamInterrupted:
        """The error the caller gets; ``heard``: what is known of the broker's answer
        (its answer read, or that none could be), if anything."""
        which = "the same events, from the first,"
        if self.after_line:  # (sent on as a stream of its own: those before are stored)
            which = f"the events after the first {self.after_line}, as a stream of their own,"
        said = f"; {heard}" if heard else ""
        return StreamInterrupted(
            f"the stream's events raised {self.error!r} after {self.lines_sent} lines{said}: "
            f"resend {which} under idempotency key {self.key} to store each line once",
            idempotency_key=self.key,
            lines_sent=self.lines_sent,
            after_line=self.after_line,
        )


async def _aiter(
    events: Iterable[EventObject] | AsyncIterable[EventObject],
) -> AsyncIterator[EventObject]:
    if isinstance(events, AsyncIterable):
        async for item in events:
            yield item
    else:
        for item in events:
            yield item
