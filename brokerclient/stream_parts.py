"""A stream the broker told to send its rest as a stream of its own (``resend``:
``after_line``: its newest lines lost by a failover with its line records lapsed, or
those records lapsed; ``ingest-lines-lost``, ``ingest-records-lapsed``), for
``brokerclient.publisher``: the lines after the last one kept go on under the key
``K+n`` (n: that line), ``StreamStopped`` where it cannot tell which were kept, and
the result of a stream gone on in parts is the whole stream's.
"""

from __future__ import annotations

import logging

import httpx

from brokerclient.attempts import Attempts
from brokerclient.errors import RequestFailed, StreamStopped
from brokerclient.http import KeptLines, PublishResult, problem_of, publish_result, retry_after
from brokerclient.publish_body import _Lines

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


def _stopped(response: httpx.Response, body: _Lines, through: int, exact: bool) -> StreamStopped:
    problem = problem_of(response)
    detail = (problem or {}).get("detail") or response.text[:200]
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
    count, first and last ids; the ids between are not known)."""
    return PublishResult(
        ids=[],
        replayed=result.replayed,
        count=body.after_line + result.count,
        first_id=body.first_id,
        last_id=result.last_id,
        idempotency_key=result.idempotency_key,
        end_id=result.end_id,
        after_line=body.after_line,
    )
