"""What a publish sends (internal to ``brokerclient.publisher``): an event as compact JSON,
a text as UTF-8, and a streaming ingest's ndjson lines.

A stream's lines are kept as they are sent, so that each retry sends them again (the
broker stores line n under key K:n: no line twice) and then goes on with the rest; what
the caller's iterator or events raise leaves httpx as ``_Interrupted``, which the
publisher raises as ``StreamInterrupted`` with the key to resend under.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

from brokerclient.errors import StreamInterrupted

EventObject = Mapping[str, Any]
"""An event as the JSON publish takes it: ``{"data": ..., "event"?: str, "retry"?: int}``."""
NDJSON = "application/x-ndjson"  # streaming ingest: one event per line


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
    """A stream's ndjson lines sent so far (a retry sends them again, then the rest)."""

    def __init__(self, key: str) -> None:
        self._key, self._sent = key, list[bytes]()

    def count(self) -> int:
        return len(self._sent)

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
            raise _Interrupted(error, self._key, len(self._sent)) from error

    def _line(self, item: object) -> bytes:
        line = _json_body(item) + b"\n"
        self._sent.append(line)
        return line


class _SentLines(_Lines):
    """The ndjson lines of a stream: those sent already (for a retry), then the rest."""

    def __init__(self, source: Iterator[EventObject], key: str) -> None:
        super().__init__(key)
        self._source = source

    def replay_then_rest(self) -> Iterator[bytes]:
        yield from list(self._sent)
        while True:
            with self._callers_part():
                item = next(self._source, _END)
                if item is _END:
                    return
                line = self._line(item)
            yield line


class _AsyncSentLines(_Lines):
    """``_SentLines`` over an async iterator."""

    def __init__(self, source: AsyncIterator[EventObject], key: str) -> None:
        super().__init__(key)
        self._source = source

    async def replay_then_rest(self) -> AsyncIterator[bytes]:
        for line in list(self._sent):
            yield line
        while True:
            with self._callers_part():
                item = await anext(self._source, _END)
                if item is _END:
                    return
                line = self._line(item)
            yield line


_END = object()  # (an iterator's end, told from any event it may yield)


class _Interrupted(Exception):
    """The caller's part of a stream raised ``error``: carried out of httpx in this, as
    httpcore re-raises what passes through it ``from None`` (a StreamInterrupted lost
    its cause so: the caller's own error, which the traceback then did not show)."""

    def __init__(self, error: Exception, key: str, lines_sent: int) -> None:
        super().__init__(error)
        self.error, self.key, self.lines_sent = error, key, lines_sent

    def public(self) -> StreamInterrupted:
        return StreamInterrupted(
            f"the stream's events raised {self.error!r} after {self.lines_sent} lines: "
            f"resend the same events, from the first, under idempotency key {self.key} "
            "to store each line once",
            idempotency_key=self.key,
            lines_sent=self.lines_sent,
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
