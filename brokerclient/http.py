"""What the HTTP publisher and subscriber share: URLs, headers, answers, retry timing."""

from __future__ import annotations

import functools
import inspect
import os
import re
import ssl
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from urllib.parse import quote

import httpx

from brokerclient.errors import RequestFailed, TopicClosed, TopicDeleted

DEFAULT_URL = "http://127.0.0.1:8000"
# Answers worth another try with the same Idempotency-Key: the broker's own
# "store unavailable" (503) and a load balancer's "no instance answered" (502, 504).
RETRY_STATUSES = frozenset({502, 503, 504})
USER_AGENT = "brokerclient/0.1"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a publish is tried: ``attempts`` in all (at least 1),
    waiting ``backoff`` seconds after the first failure, doubling up to ``max_backoff``
    (a ``Retry-After`` from the broker is honoured up to ``max_backoff``)."""

    attempts: int = 5
    backoff: float = 0.2
    max_backoff: float = 5.0

    def delay(self, failures: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        return min(self.backoff * doubled(failures), self.max_backoff)


def doubled(failures: int) -> float:
    """2 ** (failures - 1), bounded: a float power past 1023 overflows (an OverflowError
    after a thousand failed attempts, where the delay was long capped anyway)."""
    return 2.0 ** min(max(failures - 1, 0), 32)


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What the broker answered a publish: the ids stored, in order.

    ``replayed``: an earlier attempt with the same Idempotency-Key had stored them
    already (nothing new was stored); never for a stream gone on in parts (below). A
    streaming ingest past the broker's batch limit answers only ``count``, ``first_id``
    and ``last_id``; ``ids`` is then empty.

    So does a stream the client went on with after its line ``after_line`` as a stream
    of its own, under the key ``idempotency_key`` (``f"{key}+{after_line}"``, the
    caller's key and that line; the broker said its lines up to it were kept, and that
    the whole stream again would store them twice): ``count`` is every line of it
    stored, once each (those kept, and the rest), ``first_id`` its first line's,
    ``last_id`` its last's; the ids between are not known (its earlier request's answer
    was the refusal).
    """

    ids: list[str]
    replayed: bool = False
    count: int = 0
    first_id: str | None = None
    last_id: str | None = None
    idempotency_key: str = field(default="", compare=False)
    end_id: str | None = None
    """The id of the topic's ``broker.end``, when the publish closed it."""
    after_line: int = 0
    """A stream's lines up to this one were stored by an earlier request of it (0: none)."""

    @property
    def id(self) -> str:
        """The id of a single event's publish (the last one of a batch)."""
        if self.last_id is None:
            raise ValueError("nothing was stored")
        return self.last_id


IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,200}")
"""broker.constants.IDEMPOTENCY_KEY_PATTERN, copied: importing ``broker`` loads the whole
core (~190 ms more for each ``broker publish``). A test keeps the two the same."""


def new_idempotency_key() -> str:
    return f"bc-{uuid.uuid4().hex}"


def idempotency_key_of(key: str | None) -> str:
    """The caller's key, checked before anything is sent (a key the broker refuses,
    or httpx cannot send: a UnicodeEncodeError from deep inside), or a new one."""
    if key is None:
        return new_idempotency_key()
    if IDEMPOTENCY_KEY.fullmatch(key) is None:
        raise ValueError(f"an idempotency key is 1 to 200 printable ASCII characters: {key!r}")
    return key


Token: TypeAlias = str | Callable[[], str | None] | None
"""A sync client's ``token=``: a JWT, or a callable returning the current one (None or
"": no token), asked for each request, as its token may have expired meanwhile."""
AsyncToken: TypeAlias = str | Callable[[], str | Awaitable[str | None] | None] | None
"""An async client's ``token=``: ``Token``, or a callable returning an awaitable (an
``async def``)."""


def token_now(token: Token) -> str | None:
    """The token to send now: ``token`` itself, or what its callable returns."""
    if not callable(token):
        return token
    return _checked_token(token())


async def async_token_now(token: AsyncToken) -> str | None:
    """``token_now`` for an async client: a callable's awaitable is awaited."""
    if not callable(token):
        return token
    value = token()
    if inspect.isawaitable(value):
        value = await value
    return _checked_token(value)


def _checked_token(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"the token callable returned {type(value).__name__}, not a str or None")
    return value


def refreshes(token: object) -> bool:
    """Whether a 401 may be tried again: the token is a callable, which may give a new one."""
    return callable(token)


def base_headers(token: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def topic_path(topic: str, suffix: str = "/events") -> str:
    """The path of a topic's route. A topic named ``.`` or ``..`` (valid names) has its
    dots sent encoded: as they are, a URL's dot segments, httpx took ``/topics/..`` for
    ``/`` (the live page) and ``/topics/.`` for ``/topics`` (the listing)."""
    name = quote(topic, safe="")
    if topic in (".", ".."):
        name = name.replace(".", "%2E")
    return f"/topics/{name}{suffix}"


def stream_path(topics: Sequence[str]) -> tuple[str, httpx.QueryParams]:
    """One topic's stream path, or the multi-topic ``/events?topic=...``, and its query.

    The query goes to httpx as ``params``, not written into the path: a client passed
    in with query parameters of its own (an ``access_token``) has httpx put those in
    place of a path's query, which dropped ``from=earliest`` (the history skipped in
    silence) and a multi-topic stream's topics."""
    if len(topics) == 1:
        return topic_path(topics[0]), httpx.QueryParams()
    return "/events", httpx.QueryParams(tuple(("topic", t) for t in topics))


def retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


def shared_tls() -> ssl.SSLContext:
    """One TLS context for every client this library builds (httpx's default trust,
    ``SSL_CERT_FILE`` and all). Each ``httpx.Client`` made its own, loading the CA bundle
    on the caller's thread: 25-50 ms on the event loop for each subscriber or publisher
    an app opened (a quarter of a second on a loaded machine; soak test).

    Kept per value of what httpx reads to make it (``SSL_CERT_FILE``, ``SSL_CERT_DIR``):
    kept once per process, a program (or a test) that set another CA file later still
    got the first one's trust, and its broker's certificate was refused."""
    return _tls_trusting(os.environ.get("SSL_CERT_FILE", ""), os.environ.get("SSL_CERT_DIR", ""))


@functools.lru_cache(maxsize=4)  # (a few: a program switching back and forth)
def _tls_trusting(cert_file: str, cert_dir: str) -> ssl.SSLContext:
    """httpx's default context, which reads the same two variables: the arguments are
    the cache's key."""
    return httpx.create_ssl_context()


def checked_url(url: str) -> str:
    """The broker's URL, if it is one: without http:// or https:// httpx cannot send
    to it, and every attempt would be retried as if the broker were unreachable."""
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"the broker's URL {url!r}: give it with http:// or https://")
    return url


def json_of(response: httpx.Response) -> Any:
    """The answer's JSON; RequestFailed if it is not JSON (a proxy's page, say)."""
    try:
        return response.json()
    except ValueError:
        raise RequestFailed(response.status_code, None, "the answer is not JSON") from None


def publish_result(response: httpx.Response, key: str) -> PublishResult:
    """The result of a 200/201 publish answer; raises RequestFailed for any other."""
    if response.status_code not in (200, 201):
        raise failure(response)
    body: dict[str, Any] = json_of(response)
    ids = [str(i) for i in body.get("ids", [body["id"]] if "id" in body else [])]
    return PublishResult(
        ids=ids,
        replayed=response.headers.get("idempotent-replayed") == "true",
        count=int(body.get("count", len(ids))),
        first_id=body.get("first_id", ids[0] if ids else None),
        last_id=body.get("last_id", ids[-1] if ids else None),
        idempotency_key=key,
        end_id=body.get("end_id") or None,
    )


SENT_APART = frozenset({"/problems#ingest-lines-lost", "/problems#ingest-records-lapsed"})
"""The answers that may tell a stream to send its rest as a stream of its own."""
LOG_LOST = "/problems#ingest-log-lost"
"""The answer of a stream whose topic's log was lost whole under it (503, ``resend: whole``)."""


def log_lost(response: httpx.Response) -> bool:
    """Whether the answer says the stream's log was lost whole (every line stored in it)."""
    return (problem_of(response) or {}).get("type") == LOG_LOST


@dataclass(frozen=True, slots=True)
class KeptLines:
    """A stream's answer that told which of the lines its request sent were kept, the
    rest to be sent as a stream of their own (``resend``: ``after_line``; the whole
    stream again would store the lines kept twice): lines 1..``through``; or, not
    ``exact`` (``unknown``), at most those. ``first_id``: the first one's id, if any."""

    through: int
    exact: bool
    first_id: str | None


def kept_lines(response: httpx.Response) -> KeptLines | None:
    """What a stream's refusal says was kept, when its rest must go as a stream of its
    own; None for any other answer (a 503 that says ``resend: whole`` is retried whole;
    an older broker says nothing: its 503 retried whole too, as ever)."""
    problem = problem_of(response)
    if problem is None or problem.get("type") not in SENT_APART:
        return None
    resend, first_id = problem.get("resend"), problem.get("first_id")
    first = first_id if isinstance(first_id, str) else None
    if resend == "after_line" and _line_number(problem.get("last_line_kept")):
        return KeptLines(problem["last_line_kept"], True, first)
    if resend == "unknown" and _line_number(problem.get("last_line_kept_at_most")):
        return KeptLines(problem["last_line_kept_at_most"], False, None)
    return None


def _line_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def problem_of(response: httpx.Response) -> dict[str, Any] | None:
    """The answer's problem+json (an object), if it has one."""
    if "json" not in response.headers.get("content-type", ""):
        return None
    try:
        parsed = response.json()
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def failure(response: httpx.Response) -> RequestFailed:
    """The error for a broker's error answer, with its problem+json detail when it has one."""
    problem = problem_of(response)
    detail = (problem or {}).get("detail") or (problem or {}).get("title") or response.text[:200]
    message = (
        f"{response.request.method} {response.request.url.path}: {response.status_code} {detail}"
    )
    return _kind(response.status_code, problem)(response.status_code, problem, message)


def _kind(status: int, problem: dict[str, Any] | None) -> type[RequestFailed]:
    """Which error a refusal is: a 409 is a closed topic, but for an ingest whose topic
    was deleted under it (told by its problem type: it must not be resent either), or
    whose line records lapsed, or whose lines kept a failover's loss left unrecorded
    (the rest to be sent as a stream of its own; the topic is not closed): one of those
    that the client could not go on with (``kept_lines``: no usable ``resend``)."""
    if status != 409:
        return RequestFailed
    kind = (problem or {}).get("type")
    if kind == "/problems#topic-deleted":
        return TopicDeleted
    if kind in SENT_APART:
        return RequestFailed
    return TopicClosed
