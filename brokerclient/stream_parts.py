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
from brokerclient.errors import StreamStopped
from brokerclient.http import KeptLines, PublishResult, problem_of, retry_after
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
        "stream again would store the lines kept twice)"
    )
    return StreamStopped(
        response.status_code,
        problem,
        message,
        last_line_kept=through,
        exact=exact,
        idempotency_key=body.key,
    )


def whole_stream(result: PublishResult, body: bytes | _Lines) -> PublishResult:
    """A stream's result: the whole stream's, when it went on in parts (``PublishResult``:
    its count, first and last ids; the ids between are not known)."""
    if isinstance(body, bytes) or body.after_line == 0:
        return result
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
