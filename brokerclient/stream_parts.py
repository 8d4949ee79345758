"""A stream the broker told to send its rest as a stream of its own (``resend``:
``after_line``: its newest lines lost by a failover with its line records lapsed, or
those records lapsed; ``ingest-lines-lost``, ``ingest-records-lapsed``), for
``brokerclient.publisher``: the lines after the last one kept go on under the key
``K+n`` (n: that line), ``StreamStopped`` where it cannot tell which were kept, and
the result of a stream gone on in parts is the whole stream's, its refusal told with
its parts, as is an error not the broker's raised after it (``failed_in_parts``), and a
Ctrl-C says where the stream stood (``ctrl_c_in``). A
stream whose own iterator raised once the broker had answered raises what that answer
says (``answered``).
"""

from __future__ import annotations

import logging

import httpx

from brokerclient.attempts import Attempts
from brokerclient.errors import (
    BrokerClientError,
    RequestFailed,
    StreamInterrupted,
    StreamKeyboardInterrupt,
    StreamPartFailed,
    StreamStopped,
)
from brokerclient.http import (
    RETRY_STATUSES,
    KeptLines,
    PublishResult,
    failure,
    kept_lines,
    log_lost,
    problem_of,
    publish_result,
    retry_after,
)
from brokerclient.publish_body import _Interrupted, _Lines

log = logging.getLogger(__name__)


def go_on_alone(
    body: _Lines, kept: KeptLines, response: httpx.Response, attempts: Attempts
) -> float:
    """The broker kept the lines of this request up to ``kept.through`` and said the
    whole stream again would store them twice (what the retry of any other 503 does):
    the rest goes on as a stream of its own, under a key of its own (``_Lines.go_on_after``);
    the delay before it. Gone on with no line kept, it counts as a failed attempt (a
    part lost whole, time and again, is not tried for ever). ``StreamStopped`` where
    it cannot go on exactly."""
    through = body.after_line + kept.through  # (the stream's line: parts count from 1)
    if not kept.exact or not body.go_on_after(kept.through, kept.first_id):
        raise _stopped(response, body, through, kept.exact)
    attempts.key, attempts.after_line = body.key, body.after_line
    log.info("%s: lines after line %d kept sent as a stream of their own", attempts.what, through)
    if kept.through:
        return 0.0  # (at once: the broker answered, from the store it writes to now)
    why = f"{response.status_code}: none of its lines kept"
    return attempts.failed(why, retry_after(response), body.count(), answered=True)


def start_over_if_log_lost(body: _Lines, response: httpx.Response, attempts: Attempts) -> None:
    """A stream gone on in parts whose log was lost whole (``ingest-log-lost``) is sent
    again whole, under the caller's key (``_Lines.start_over``), not its part alone: the
    lines of its earlier parts went with the log, and the part resent alone stored the
    stream without them, its result saying every line stored."""
    if not body.after_line or not log_lost(response):
        return
    lost = body.after_line
    body.start_over()
    attempts.key, attempts.after_line = body.key, 0
    log.info(
        "%s: its log was lost, lines 1..%d with it: the whole stream sent again",
        attempts.what,
        lost,
    )


UNREAD = (
    "no answer of the broker's could be read (it may have refused the stream: a resend "
    "it refuses raises what it says)"
)
"""Said where the iterator raised and no answer could be read (HTTP/2; a transport that
is not httpx's own), the advice given as if the broker had not refused the stream."""


def unanswered(stopped: _Interrupted, error: Exception) -> StreamInterrupted:
    """The caller's iterator raised, and no answer came (``error``): within
    ``ANSWER_WAIT_S`` (a read timeout: none was coming; the advice holds as it is), or
    none could be read."""
    return stopped.public("" if isinstance(error, httpx.ReadTimeout) else UNREAD)


def answered(response: httpx.Response, body: _Lines, stopped: _Interrupted) -> BrokerClientError:
    """The caller's iterator raised (``stopped``) once the broker had answered the request
    (``response``): what that answer says. Lines kept, the rest to go as a stream of
    their own: the advice names ``K+n`` (or ``StreamStopped``); a 502/503/504 or a 401
    leaves the advice as it is (the same events, under the same key); any other
    refusal is raised (a closed topic: ``TopicClosed``)."""
    heard = f"the broker had answered {response.status_code} {_detail(response)}"
    if body.after_line and log_lost(response):  # (its earlier parts went with the log)
        body.start_over()
        whole = _Interrupted(stopped.error, body.key, stopped.lines_sent, 0)
        return whole.public(f"{heard}; the lines of the stream's earlier parts went with it")
    kept = kept_lines(response)
    if kept is not None:
        if not kept.exact or not body.go_on_after(kept.through, kept.first_id):
            return _stopped(response, body, body.after_line + kept.through, kept.exact)
        gone_on = _Interrupted(stopped.error, body.key, stopped.lines_sent, body.after_line)
        return gone_on.public(f"{heard}; its lines up to line {body.after_line} were kept")
    if response.status_code in RETRY_STATUSES or response.status_code in (200, 201, 401):
        return stopped.public(heard)
    refusal = failure(response)
    return refused_in_parts(refusal, body) if body.after_line else refusal


def _detail(response: httpx.Response) -> str:
    problem = problem_of(response) or {}
    return str(problem.get("detail") or problem.get("title") or response.text[:200])


def _stopped(response: httpx.Response, body: _Lines, through: int, exact: bool) -> StreamStopped:
    problem = problem_of(response)
    detail = _detail(response)
    which = f"up to line {through}" if exact else f"at most up to line {through}"
    message = (
        f"{response.request.method} {response.request.url.path}: {response.status_code} "
        f"{detail}; the stream's lines {which} were kept: the client cannot go on exactly "
        "(send the lines after the last one kept as a stream of their own; the whole "
        f"stream again would store the lines kept twice){_parts_of(body)}"
    )
    return StreamStopped(
        response.status_code,
        problem,
        message,
        last_line_kept=through,
        exact=exact,
        idempotency_key=body.key,
        after_line=body.after_line,
    )


def stream_result(response: httpx.Response, key: str, body: bytes | _Lines) -> PublishResult:
    """A publish's result, or its refusal raised (``publish_result``). A stream gone on in
    parts has the whole stream's result (``whole_stream``), and its refusal says so, with
    its part's key and ``after_line``: a plain 400 or 409 of the part ``K+n`` read as
    the whole stream's refusal, and a caller who resent the whole stream under K stored
    its lines 1..n twice."""
    if isinstance(body, bytes) or body.after_line == 0:
        return publish_result(response, key)
    try:
        return whole_stream(publish_result(response, key), body)
    except RequestFailed as refused:
        raise refused_in_parts(refused, body) from None  # (the same refusal, told whole)


def refused_in_parts(refused: RequestFailed, body: _Lines) -> RequestFailed:
    """``refused`` (the refusal of a stream's part, not a ``StreamStopped``), of its own
    kind, with the stream's parts said."""
    return type(refused)(
        refused.status,
        refused.problem,
        f"{refused}{_parts_of(body)}",
        idempotency_key=body.key,
        after_line=body.after_line,
    )


def failed_in_parts(error: Exception, body: bytes | _Lines) -> StreamPartFailed | None:
    """``error`` (not the broker's: the token callable's, an httpx error that is no
    transport's) told with the stream's parts, once it went on in parts; None before
    (or for an error of the client's own, which says them already): raised as it is."""
    if isinstance(body, bytes) or body.after_line == 0 or isinstance(error, BrokerClientError):
        return None
    return StreamPartFailed(
        f"the stream failed on {error!r}, not on an answer of the broker's{_parts_of(body)}",
        idempotency_key=body.key,
        lines_sent=body.count(),
        after_line=body.after_line,
    )


def ctrl_c_in(body: _Lines) -> StreamKeyboardInterrupt:
    """A Ctrl-C during the stream, wherever it landed, saying where the stream stood: the
    key of its part under way and the line that part goes on after (0: sent whole)."""
    return StreamKeyboardInterrupt(
        idempotency_key=body.key, lines_sent=body.count(), after_line=body.after_line
    )


def _parts_of(body: _Lines) -> str:
    """What a stream gone on in parts must say of them, or "" (sent whole)."""
    if body.after_line == 0:
        return ""
    n, first_key = body.after_line, body.earlier_keys[0]
    return (
        f"; the stream went on in parts: its lines 1..{n} were stored under "
        f"{', '.join(body.earlier_keys)}, the rest sent under {body.key}: a resend sends the "
        f"events after line {n} under {body.key}, never the whole stream under {first_key} "
        f"(that stores lines 1..{n} twice); the broker's line numbers count from the "
        f"stream's line {n + 1}"
    )


def whole_stream(result: PublishResult, body: _Lines) -> PublishResult:
    """A stream's result: the whole stream's, gone on in parts (``PublishResult``: its
    count, first and last ids; the ids between are not known). Never ``replayed``: the
    answer to each part but the last was the refusal that had it go on (which says what
    was kept, not that nothing was new), and the last one's replay (its answer lost, it
    was sent again) says nothing of the lines before it."""
    return PublishResult(
        ids=[],
        replayed=False,
        count=body.after_line + result.count,
        first_id=body.first_id,
        last_id=result.last_id,
        idempotency_key=result.idempotency_key,
        end_id=result.end_id,
        after_line=body.after_line,
    )
