"""Single publishes served on the connection, without uvicorn's request cycle.

A publish is the hottest short request, and most of its server CPU went to
uvicorn's request/response cycle (the ASGI task, the cycle's events, the
proxy-headers middleware), not to Redis. So ``api.connections`` serves a
plain publish itself (HTTP/1.1, a Content-Length, JSON or text; a streaming
ingest, ``application/x-ndjson``, is ``api.lean_ingest``'s) with the
functions of ``api.publish``, so that both routes accept, refuse and answer
alike. This module decides which publishes those are, runs one, and writes
its answer as uvicorn would (same headers, same order).

Errors: whatever fails before the store (a bad body, 401, 415, ...) is
``NotValidated``: the connection hands the whole request to uvicorn, and the
app answers it, one place for statuses. Once the append is sent it is never
handed over (that would append twice): store errors are answered here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote

import httptools
from starlette.responses import Response
from uvicorn.server import ServerState

from api import routes
from api.auth import Authorizer
from api.cors import cors_headers, with_cors
from api.deadlines import Deadlines
from api.heads import RequestHead, parse_head, scope_of
from api.negotiation import media_type_of
from api.problems import HttpProblem, problem, problem_for
from api.publish import _close_requested, answer, events_of, idempotency_key
from api.settings import Settings
from broker import Broker, BrokerError, NewEvent, StoreUnavailable
from broker.validation import check_idempotency_key, check_topic

log = logging.getLogger(__name__)

LEAN_MEDIA_TYPES = ("application/json", "text/plain")
"""Bodies parsed whole; ``application/x-ndjson`` is a streaming ingest (``api.lean_ingest``)."""
CLOSE = (b"connection", b"close")
LEAN_BODY_BYTES = 65536
"""A longer body is the app's: a lean publish is authorized once its body is whole,
and 300 connections without a token, each sending 1 MiB slowly, held 300 MiB until
then; the app answers 401 on the head, and uvicorn holds at most this much of a body
meanwhile (its ``HIGH_WATER_LIMIT``). Publishes this long are rare, and cost their
bytes more than the route."""


TIMED_OUT = "the store did not confirm the write in time"


class LeanRequest(Protocol):
    """A request served on the connection, as its answer needs it."""

    @property
    def scope(self) -> dict[str, Any]: ...

    @property
    def keep_alive(self) -> bool: ...


class NotValidated(Exception):
    """The publish failed before anything reached the store: uvicorn may answer it."""


@dataclass(slots=True)
class PublishHead:
    """A plain publish's head: what serving it needs besides its body."""

    scope: dict[str, Any]
    body_size: int
    media_type: str
    charset: str | None
    keep_alive: bool


def publish_head_of(
    head: RequestHead, parser: httptools.HttpRequestParser, app: Any, scheme: str
) -> PublishHead | None:
    """The head of a publish served lean, or None for uvicorn to serve."""
    post = topic_post_of(head, parser)
    framing = _framing_of(head.headers)
    if post is None or framing is None:
        return None
    size, content_type = framing
    settings: Settings = app.state.settings
    media_type, charset = media_type_of(content_type.decode("latin-1"))
    if size > settings.max_body_bytes or media_type not in LEAN_MEDIA_TYPES:
        return None  # the app refuses these before the body (413, 415) or streams it
    if size > LEAN_BODY_BYTES:
        return None  # (authorized before its body is read: see LEAN_BODY_BYTES)
    scope = post.scope_for(app, scheme)
    return PublishHead(scope, size, media_type, charset, parser.should_keep_alive())


@dataclass(slots=True)
class TopicPost:
    """An HTTP/1.1 ``POST /topics/{topic}/events``: its path, parsed URL and topic."""

    path: str
    url: Any
    topic: str
    headers: list[tuple[bytes, bytes]]

    def scope_for(self, app: Any, scheme: str) -> dict[str, Any]:
        """The ASGI scope the app's functions read, as uvicorn and the router build it."""
        scope = scope_of("POST", self.path, self.url, self.headers, scheme)
        scope["app"], scope["path_params"] = app, {"topic": self.topic}  # (no merged copy)
        return scope


def topic_post_of(head: RequestHead, parser: httptools.HttpRequestParser) -> TopicPost | None:
    """The head's publish route, if it is an HTTP/1.1 POST of a topic's events."""
    if parser.get_method() != b"POST" or parser.get_http_version() != "1.1":
        return None
    try:
        url = httptools.parse_url(head.url)
        path = unquote(url.path.decode("ascii"))
    except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
        return None
    match = routes.TOPIC_EVENTS_PATH.fullmatch(path)
    return None if match is None else TopicPost(path, url, match.group(1), head.headers)


def _framing_of(headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes] | None:
    """The body's size and content type, if it is framed plainly: one Content-Length,
    no Transfer-Encoding, no ``Expect: 100-continue`` (uvicorn answers that)."""
    size: bytes | None = None
    content_type = b""
    for name, value in headers:
        if name == b"content-length":
            if size is not None:
                return None
            size = value
        elif name == b"content-type":
            content_type = value
        elif name in (b"transfer-encoding", b"expect"):
            return None
    if size is None or not size.isdigit():
        return None
    return int(size), content_type


def publish_request(data: bytes, app: Any, scheme: str = "http") -> PublishHead | None:
    """``publish_head_of`` the head at the start of ``data`` (for tests)."""
    parsed = parse_head(data)
    return None if parsed is None else publish_head_of(*parsed, app, scheme)


@dataclass(slots=True)
class Append:
    """A validated publish, ready for the store."""

    topic: str
    events: list[NewEvent]
    is_batch: bool
    key: str | None
    close: bool
    broker: Broker
    timeout: float
    """The store must confirm within it (``BROKER_PUBLISH_TIMEOUT_SECONDS``), else 503."""


async def validated(request: PublishHead, body: bytes) -> Append:
    """The publish, validated as ``api.publish`` does; else ``NotValidated``."""
    scope = request.scope
    state = scope["app"].state
    settings: Settings = state.settings
    try:
        topic = check_topic(scope["path_params"]["topic"])
        # ``authorize``, without its coroutine unless the key set may need a fetch first.
        authorizer: Authorizer = state.authorizer
        if authorizer.prepares:
            await authorizer.prepare(scope)
        authorizer.check(scope, "publish", [topic])
        key = idempotency_key(scope["headers"])
        check_idempotency_key(key)
        close = _close_requested(scope)
        events, is_batch = events_of(scope, request.media_type, request.charset, body, settings)
    except Exception as error:
        raise NotValidated from error
    return Append(
        topic, events, is_batch, key, close, state.broker, settings.publish_timeout_seconds
    )


def response_bytes(
    request: LeanRequest,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    server_state: ServerState,
) -> bytes:
    """The answer as uvicorn writes the ASGI route's: its date and server headers, the
    route's, content-length, CORS, and ``connection: close`` unless kept alive."""
    headers = [*headers, (b"content-length", b"%d" % len(body))]
    return _answer_bytes(request, status, headers, body, server_state)


def problem_bytes(request: LeanRequest, response: Response, server_state: ServerState) -> bytes:
    """A problem (the app's own response) as the ASGI route writes it."""
    return _answer_bytes(
        request, response.status_code, response.raw_headers, bytes(response.body), server_state
    )


def _answer_bytes(
    request: LeanRequest,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    server_state: ServerState,
) -> bytes:
    # Loops, not a list comprehension per group of headers (each a function of its own,
    # called per answer in Python 3.11).
    lines = [_STATUS_LINES[status]]
    add = lines.append
    for name, value in server_state.default_headers:
        add(name + b": " + value)
    closes = False
    for name, value in headers:
        add(name + b": " + value)
        closes = closes or name == b"connection"
    for name, value in cors_headers(request.scope):
        add(name + b": " + value)
    if not request.keep_alive and not closes:
        add(b"connection: close")
    add(b"")
    add(body)
    return b"\r\n".join(lines)


_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s" % (s.value, s.phrase.encode()) for s in HTTPStatus}


class PublishConnection(Protocol):
    """The connection a publish is served on (``api.connections.BrokerHttpProtocol``)."""

    def publish_answered(self, request: PublishHead, answer: bytes) -> None:
        """Write the whole answer; the connection serves on (unless asked to close)."""

    def publish_failed(self, request: PublishHead, response: Response) -> None:
        """The append failed: answer and close."""

    def publish_not_validated(self) -> None:
        """Nothing reached the store: hand the request, from its first byte, to uvicorn."""


class PublishExchange:
    """One lean publish, from its whole body to its answer; a deadline item of
    ``api.guard`` while the store has it (cheaper than an ``asyncio.timeout``)."""

    __slots__ = ("_connection", "_request", "_server_state", "_task", "_timed_out")

    def __init__(
        self, connection: PublishConnection, request: PublishHead, server_state: ServerState
    ) -> None:
        self._connection = connection
        self._request = request
        self._server_state = server_state
        self._task: asyncio.Task[None] | None = None
        self._timed_out = False

    def start(self, body: bytes, deadlines: Deadlines) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(body, deadlines))

    def expire(self) -> None:
        """The store did not confirm in time: 503 (the append may still land; the
        client retries with its Idempotency-Key)."""
        if self._task is not None and not self._timed_out:
            self._timed_out = True
            self._task.cancel()

    async def _run(self, body: bytes, deadlines: Deadlines) -> None:
        request, connection = self._request, self._connection
        try:
            append = await validated(request, body)
        except NotValidated as error:
            if not isinstance(error.__cause__, BrokerError | HttpProblem):
                log.error("unexpected error validating a publish", exc_info=error.__cause__)
            connection.publish_not_validated()
            return
        deadlines.set(self, append.timeout)
        try:
            # (``broker.publish`` awaited here, not in a method of ``Append``: a coroutine
            # less to make, resume and unwind)
            result = await append.broker.publish(
                append.topic, append.events, idempotency_key=append.key, close=append.close
            )
            status, headers, content = answer(result, append.is_batch)
        except asyncio.CancelledError:
            if not self._timed_out:
                raise
            connection.publish_failed(request, self._problem(StoreUnavailable(TIMED_OUT)))
        except StoreUnavailable as error:
            connection.publish_failed(request, self._problem(error))
        except (BrokerError, HttpProblem) as error:  # the store's answer (409): kept alive
            refusal = problem_bytes(request, problem_for(error), self._server_state)
            connection.publish_answered(request, refusal)
        except Exception:
            log.exception("unexpected error publishing on %s", request.scope["path"])
            failure = problem(500, "Internal error", "the broker could not publish")
            connection.publish_failed(request, with_cors(failure, request.scope))
        else:
            written = response_bytes(request, status, headers, content, self._server_state)
            connection.publish_answered(request, written)
        finally:
            deadlines.clear(self)

    def _problem(self, error: StoreUnavailable) -> Response:
        return with_cors(problem_for(error), self._request.scope)
