"""Errors as RFC 9457 problem+json: the one place a core error becomes an HTTP status."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from broker.errors import (
    BrokerError,
    InvalidInput,
    LogDeleted,
    LogGone,
    LogLost,
    StoreUnavailable,
    StreamOver,
    TooLarge,
    TopicClosed,
    TopicNotFound,
)

# Relative URIs (RFC 9457 allows them); the README lists every slug under "Errors".
PROBLEM_TYPE_BASE = "/problems#"
NOT_SNIFFED = {"X-Content-Type-Options": "nosniff"}
"""On every answer with a body: a browser never takes one for another type than its
own (JSON holding an event's data, or a problem's detail naming a topic, sniffed as a
page or a script of the broker's origin)."""


class HttpProblem(Exception):
    """A problem raised by the edge itself (content type, method, body framing)."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


class Unauthorized(HttpProblem):
    """No token, or one that is expired or invalid (401 with ``WWW-Authenticate``)."""

    def __init__(self, detail: str, *, token_given: bool) -> None:
        super().__init__(401, "Unauthorized", detail)
        self.token_given = token_given


class TokenLapsedMidIngest(Unauthorized):
    """A streaming ingest's token expired (or its key left the key set) while its body
    was still coming: answered 401 and the connection closed, as a 503 is
    (``StoreLostMidBody``). Had the rest been read and dropped, a producer still sending
    learnt of it only at its body's end (most clients read the answer only then), its
    viewers getting nothing meanwhile (review: a generation's tokens held until it
    ended); now its next write fails, and it resends under its key with a fresh token."""


class Forbidden(HttpProblem):
    """A valid token (or an origin) without the right to this topic or request (403)."""

    def __init__(self, detail: str) -> None:
        super().__init__(403, "Forbidden", detail)


class KeysUnavailable(StoreUnavailable):
    """The key set (JWKS) has not been fetched yet: whether a token is valid cannot be
    told. 503 (a publisher retries), and a stream is told to come back, as when the
    store is down: a 401 stops an EventSource for good, and a producer's retries."""

    title = "Key set unavailable"


class StoreLostMidBody(StoreUnavailable):
    """The store failed while a streaming ingest's body was still coming: answered
    503 and the connection closed (lingering, ``api.lingering``: the answer read, not
    reset). A producer still sending learns it within 2 s (most clients read the
    answer only once their body is sent, or their writes fail: had the rest been read and
    dropped, the rest of a token stream went nowhere, its viewers waiting for the
    end of the generation, until the producer resent it)."""


class DrainedMidBody(StoreLostMidBody):
    """The instance began to shut down while a streaming ingest's body was still coming:
    answered at once (503, ``Connection: close``, how many lines were stored), so that
    its producer sends the rest to another instance; it was left unanswered until the
    grace ended, the connection then closed, and a producer without an Idempotency-Key
    could not tell which lines were stored."""

    title = "Instance shutting down"


def problem(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    slug = title.lower().replace(" ", "-")
    body = {"type": PROBLEM_TYPE_BASE + slug, "title": title, "status": status, "detail": detail}
    return Response(
        orjson.dumps(body | extra),
        status_code=status,
        media_type="application/problem+json",
        headers=NOT_SNIFFED | headers if headers else NOT_SNIFFED,
    )


def _closing(closes: bool) -> dict[str, str]:
    """``Connection: close`` for an answer after which the connection closes (one told
    before the request's body ended): uvicorn closes after it, as the lean route does."""
    return {"Connection": "close"} if closes else {}


def _unauthorized(error: Unauthorized) -> Response:
    headers = {"WWW-Authenticate": _challenge(error)}
    headers |= _closing(isinstance(error, TokenLapsedMidIngest))
    return problem(401, error.title, error.detail, headers)


def _unavailable(error: StoreUnavailable) -> Response:
    headers = {"Retry-After": str(error.retry_after)}
    headers |= _closing(isinstance(error, StoreLostMidBody))
    return problem(503, error.title, error.detail, headers=headers)


def _log_gone(error: LogGone) -> Response:
    """A streaming ingest's log lost, or its newest lines, the whole stream to be resent
    (503 with ``Retry-After``: ``resend: whole``); deleted (409: not to be resent, nor
    retried); or its lines kept no longer recorded under its key, or never were (its
    records lapsed, or lines lost once they had or without a key: 409, no
    ``Retry-After``). A producer retrying a 503 resends the whole stream under its key,
    which would store the lines kept twice: any HTTP client's retry, and the Python
    client's did; so a 503 is exactly a ``resend: whole``, and the rest goes as a stream
    of its own. Told before the body ended as a store failure is: the connection closes
    (``StoreLostMidBody``), and a producer still sending learns at once."""
    headers = _closing(error.mid_body)
    resend = _resend(error)
    if resend.get("resend") == "whole" and isinstance(error, LogLost):  # (only it is)
        headers["Retry-After"] = str(error.retry_after)
        return problem(503, error.title, error.detail, headers, **resend)
    return problem(409, error.title, error.detail, headers, **resend)


def _resend(error: LogGone) -> dict[str, Any]:
    """What to send again, in members a client reads (RFC 9457 extensions; the detail
    says the same in words): ``resend`` ``whole`` (the whole stream, with its
    Idempotency-Key), ``after_line`` (the lines after ``last_line_kept``, as a stream of
    their own: the whole stream would store the lines kept twice; ``first_id`` and
    ``last_id`` of those kept, when any) or ``unknown`` (the lines kept cannot be told
    exactly: ``last_line_kept_at_most``). Nothing for a deleted topic: not to be resent."""
    if isinstance(error, LogDeleted):
        return {}
    kept = error.kept
    if kept is None:
        return {"resend": "whole"} if isinstance(error, LogLost) else {}
    if not kept.exact:
        return {"resend": "unknown", "last_line_kept_at_most": kept.through}
    ids = {"first_id": kept.first_id, "last_id": kept.last_id} if kept.first_id else {}
    return {"resend": "after_line", "last_line_kept": kept.through} | ids


def closes_connection(answer: Response) -> bool:
    """Whether the connection closes after this answer (said in its headers here)."""
    return answer.headers.get("connection") == "close"


def problem_for(error: BrokerError | HttpProblem) -> Response:
    """Map an error to its response; the status of each error class is decided here only."""
    if isinstance(error, Unauthorized):
        return _unauthorized(error)
    if isinstance(error, HttpProblem):
        # A 408 closes the connection after it (the ingest's idle client): said so.
        return problem(error.status, error.title, error.detail, _closing(error.status == 408))
    if isinstance(error, InvalidInput):
        return problem(400, "Invalid request", error.detail)
    if isinstance(error, TooLarge):
        return problem(413, "Content too large", error.detail, limit=error.limit)
    if isinstance(error, TopicNotFound):
        return problem(404, "Topic not found", str(error))
    if isinstance(error, TopicClosed):
        return problem(409, "Topic closed", str(error), end_id=error.end_id)
    if isinstance(error, StreamOver):
        # Not a problem: the spec's way to tell an EventSource to stop reconnecting.
        return Response(status_code=204)
    if isinstance(error, LogGone):
        return _log_gone(error)
    if isinstance(error, StoreUnavailable):
        return _unavailable(error)
    return problem(500, "Internal error", "the broker could not handle this request")


# -- answers to clients the connection guard (api.guard) stops before the app -------------


def head_too_large(limit: int) -> Response:
    return problem(
        431,
        "Request header fields too large",
        f"the request line and headers are over {limit} bytes",
        limit=limit,
    )


def body_too_slow(seconds: float) -> Response:
    return problem(408, "Request timeout", f"the request body did not arrive within {seconds:g} s")


def too_many_connections(retry_after: int) -> Response:
    """A publish past the process's connection limit: retry it (with its Idempotency-Key)."""
    headers = {"Retry-After": str(retry_after)}
    detail = "this instance holds as many connections as it may; retry shortly"
    return problem(503, "Too many connections", detail, headers=headers)


def _challenge(error: Unauthorized) -> str:
    """RFC 6750 3: an ``error`` only when a token was sent (none: just the scheme)."""
    if not error.token_given:
        return 'Bearer realm="broker"'
    return 'Bearer realm="broker", error="invalid_token"'
