"""``broker publish TOPIC --lines``: stdin as a streaming ingest, one event a line.

Each line read is sent at once through ``Publisher.stream()`` (its idempotency key,
its resends after a broken connection, its "go on after line n" parts, its close):
nothing waits for stdin's end, so ``python gen.py | broker publish chat-42 --lines``
shows each token as the generator prints it. While stdin is silent for ``--keepalive``
seconds (10; 0: off), a space keeps the stream open (``stream()``'s ``keepalive_seconds``):
a generator that thinks longer than the broker's body timeout (30 s) goes on.

What a line is, chosen for a shell user:

- Without ``--text``, a JSON value: the event's data, as ``broker publish TOPIC DATA``
  takes it (``seq 3 |``, ``jq -c .token |``), its type ``--event``'s. Not the ingest's
  ``{"data": ...}`` object: a producer writing those POSTs its ndjson itself (curl);
  here such a line is stored as that object. A blank line is skipped, as the ingest
  skips one (a producer's keep-alive).
- With ``--text``, the line less its LF or CRLF, stored as a JSON string (the ingest
  stores JSON: a page reads ``JSON.parse(e.data)``, as for the LLM example's tokens;
  not a ``text/plain`` event, which no ingest carries). A blank line is an empty
  string event: in a text, a blank line is the text's own.

The key: ``--idempotency-key``, else one made up here, so that every failure can name
it (a rerun under it stores each line once). A line that is not JSON (or not UTF-8)
ends the stream before it, broken off: the lines before it are stored, the topic not
closed, and the rerun is the same input, fixed, under the same key (exit 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import stat
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from brokerclient.cli import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
    _emit,
    _token,
    _url,
)
from brokerclient.keepalive import KEEPALIVE_SECONDS

if TYPE_CHECKING:
    from brokerclient.errors import (
        BrokerClientError,
        StreamInterrupted,
        StreamKeyboardInterrupt,
    )
    from brokerclient.http import PublishResult

log = logging.getLogger("brokerclient.cli")
JSON_WHITESPACE = b" \t\r\n"
"""What a blank line may hold (the ingest's blank line: JSON's whitespace)."""


class BadLine(Exception):
    """A line of stdin that cannot be an event (not UTF-8, not JSON)."""


class StdinLines:
    """The events of stdin's lines, each read when the stream asks for it (never the
    whole input first); counts stdin's lines and where each event came from, so that
    a failure names stdin's line, not the stream's (blank lines skipped)."""

    def __init__(self, source: BinaryIO, *, text: bool, event: str | None) -> None:
        self._source, self._text, self._event = source, text, event
        self.line_number = 0
        """stdin's lines read so far (the one being sent, once the stream asked for it)."""
        self.event_lines: list[int] = []
        """stdin's line number of each event sent, in order."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while line := self._source.readline():
            self.line_number += 1
            data = self._data(line)
            if data is _SKIPPED:
                continue
            self.event_lines.append(self.line_number)
            yield {"data": data} | ({"event": self._event} if self._event else {})

    def _data(self, line: bytes) -> Any:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadLine(f"is not UTF-8 ({error})") from None
        if self._text:
            return text.removesuffix("\n").removesuffix("\r")
        if not line.strip(JSON_WHITESPACE):
            return _SKIPPED
        try:
            return json.loads(text)
        except ValueError as error:
            raise BadLine(f"is not JSON ({error}; --text sends lines as text)") from None

    def line_of_event(self, number: int) -> int:
        """stdin's line of the stream's event ``number`` (from 1), 0 for none."""
        return self.event_lines[number - 1] if number else 0


_SKIPPED = object()


def run_publish_lines(args: argparse.Namespace) -> int:
    from brokerclient.errors import (
        BrokerClientError,
        StreamInterrupted,
        StreamKeyboardInterrupt,
    )
    from brokerclient.http import idempotency_key_of
    from brokerclient.publisher import Publisher

    if args.data is not None:
        raise UsageError("--lines reads stdin: give no DATA")
    try:
        key = idempotency_key_of(args.idempotency_key)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if sys.stdin.isatty():
        log.info("sending each line of stdin as an event (end with Ctrl-D)")
    asked = KEEPALIVE_SECONDS if args.keepalive is None else args.keepalive
    keepalive = keepalive_for(asked, sys.stdin)
    source = _stdin_of_its_own() if keepalive else sys.stdin.buffer
    lines = StdinLines(source, text=args.text, event=args.event)
    result: PublishResult | None = None
    try:
        with Publisher(_url(args), token=_token(args)) as publisher:
            try:
                result = publisher.stream(
                    args.topic, lines, idempotency_key=key, close=args.close,
                    keepalive_seconds=keepalive,
                )  # fmt: skip
            except StreamInterrupted as stopped:
                return _interrupted(stopped, lines)
            except BrokerClientError as error:
                return _failed(error, key, lines)
            except StreamKeyboardInterrupt as stopped:
                return _ctrl_c(stopped, lines)
        if result.replayed:
            log.info("stored already under this idempotency key: nothing new was stored")
        _emit(_answer(result))
        return EXIT_OK
    except KeyboardInterrupt:
        if result is None:
            raise
        return _ctrl_c_once_done(result)


def keepalive_for(seconds: float, stdin: Any) -> float:
    """``--keepalive``, but 0 (off) where stdin is a file on disk: never silent, so its
    lines are read in the caller's thread, without the keep-alive's hand-off from a
    reader thread (some 30 us a line: a 10k-line file took 2.5 times as long)."""
    try:
        on_disk = stat.S_ISREG(os.fstat(stdin.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):  # (io.UnsupportedOperation is both)
        on_disk = False
    return 0.0 if on_disk else seconds


def _stdin_of_its_own() -> BinaryIO:
    """stdin's file, read through a buffer of its own: with a keep-alive, ``stream()``
    reads it in a daemon thread, which a Ctrl-C leaves blocked in its read. That thread
    holding ``sys.stdin.buffer``'s lock, the interpreter's exit, closing it, aborted
    ("could not acquire lock ... at interpreter shutdown, possibly due to daemon
    threads": exit 134, not 130). A stdin with no file (a test's) is read as it is."""
    try:
        descriptor = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # (io.UnsupportedOperation is both)
        return sys.stdin.buffer
    return open(descriptor, "rb", closefd=False)


def _answer(result: PublishResult) -> dict[str, Any]:
    """What a stream done prints: ``{"count", "first_id", "last_id"}`` (``end_id``: closed)."""
    answer = {"count": result.count, "first_id": result.first_id, "last_id": result.last_id}
    if result.end_id is not None:
        answer["end_id"] = result.end_id
    return answer


def _ctrl_c_once_done(result: PublishResult) -> int:
    """Ctrl-C in the client's last steps, once ``stream()`` had returned (every line
    stored, the topic closed if asked): exit 130, as for any Ctrl-C, saying the stream
    was done, with its answer, so that no one reruns it. It exited silent, and a user
    could not tell whether to send the input again."""
    closed = " and the topic closed" if result.end_id is not None else ""
    answer = json.dumps(_answer(result), ensure_ascii=False, separators=(",", ":"))
    print(
        f"broker publish: interrupted (Ctrl-C) once the stream was done: every line was "
        f"stored{closed} ({answer}); nothing needs sending again",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def _failed(error: BrokerClientError, key: str, lines: StdinLines) -> int:
    """The broker refused the stream, or could not be reached: said, with how to rerun
    it (but where no rerun stores the rest: a closed or deleted topic, or a stream the
    broker ended where the client cannot tell which lines to send, whose message says)."""
    from brokerclient.errors import StreamStopped, TopicClosed, TopicDeleted, Unreachable

    unreachable = isinstance(error, Unreachable)
    said = f"unreachable: {error}" if unreachable else str(error)
    print(f"broker publish: {said}", file=sys.stderr)
    if not isinstance(error, (StreamStopped, TopicClosed, TopicDeleted)):
        _tell_rerun(getattr(error, "idempotency_key", None) or key, error, lines)
    return EXIT_UNREACHABLE if unreachable else EXIT_ERROR


def _interrupted(stopped: StreamInterrupted, lines: StdinLines) -> int:
    """stdin's line ``lines.line_number`` cannot be sent (or reading stdin failed): the
    events before it were sent, the request broken off, the topic not closed (exit 2, as
    for DATA that is not JSON; 1 for an error not the line's)."""
    cause = stopped.__cause__
    where = f"stdin line {lines.line_number}"
    said = f"{where} {cause}" if isinstance(cause, BadLine) else f"{where}: {cause!r}"
    print(
        f"broker publish: {said}: stopped there; the {stopped.lines_sent} event(s) before it "
        "were sent, each that reached the broker stored (the topic not closed)",
        file=sys.stderr,
    )
    _tell_rerun(stopped.idempotency_key, stopped, lines)
    return EXIT_USAGE if isinstance(cause, (BadLine, ValueError)) else EXIT_ERROR


def _ctrl_c(stopped: StreamKeyboardInterrupt, lines: StdinLines) -> int:
    """Ctrl-C, wherever it landed (waiting for stdin, sending, a retry's wait): never the
    stream's success; its key and part, as a failure names them (exit 130). Said with
    the key given or made up alone, it sent the rerun of a stream gone on in parts (the
    rest under ``K+n``) whole under K, and that stored every line twice."""
    print(
        f"broker publish: interrupted (Ctrl-C) at stdin line {lines.line_number}, "
        f"{stopped.lines_sent} event(s) sent: each that reached the broker is stored",
        file=sys.stderr,
    )
    _tell_rerun(stopped.idempotency_key, stopped, lines)
    return EXIT_INTERRUPTED


def _tell_rerun(
    key: str, error: BrokerClientError | StreamKeyboardInterrupt | None, lines: StdinLines
) -> None:
    """How to finish the stream storing each line once: the same input under its key, or,
    once it went on after event n as a stream of its own (key ``K+n``), stdin's lines
    after the one of event n."""
    after = int(getattr(error, "after_line", 0) or 0)
    quoted = shlex.quote(key)
    if after == 0:
        print(
            f"broker publish: to finish it, send the same input again under "
            f"--idempotency-key {quoted} (the lines stored are stored no second time)",
            file=sys.stderr,
        )
        return
    line = lines.line_of_event(after)
    print(
        f"broker publish: to finish it, send stdin's lines after line {line} (tail -n "
        f"+{line + 1}) under --idempotency-key {quoted}; never the whole input again (its "
        f"first {after} event(s) were stored under another key)",
        file=sys.stderr,
    )
