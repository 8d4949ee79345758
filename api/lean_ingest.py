"""Streaming ingests served on the connection, without uvicorn's request cycle.

A streaming ingest (``application/x-ndjson``, usually chunked) is one request
that lasts as long as a token stream, and on the ASGI route every read of its
body cost httptools' ``on_body``, uvicorn's receive event, a task wake-up and an
ASGI message. So ``api.connections`` serves a plain one itself (HTTP/1.1,
chunked or a Content-Length, no ``Expect``): it decodes the body where it
arrives (``api.body_framing``) and hands it to the same ``Ingest``
the ASGI route runs (``api.ingest``), through ``ReceivedBody``; the answer is
``api.publish.run_ingest``'s, written with the bytes uvicorn would write.

Like a lean publish (``api.lean_publish``): whatever fails before the store
(401, 403, a bad topic, key or ``close``) hands the request, with every byte
received, to uvicorn, and the app answers it; once the ingest began it is never
handed over, and every later error is answered here as the ASGI route answers
it. Deliberate likenesses to uvicorn, so that a client sees one behaviour:

- An error answered before the body ended (a bad line, 409, 408) is followed
  by the rest of the body being read and dropped, then the next request:
  closing with unread bytes would reset the connection, and the client might
  lose the answer. But a 503 (the store failed) closes the connection on both
  routes (``Connection: close``): the producer, still sending, learns at once
  and resends (``api.problems.StoreLostMidBody``); so does a 401 for a token that
  expired meanwhile (``api.problems.TokenLapsedMidIngest``), and an ingest's log lost
  or deleted (``broker.errors.LogGone``): whatever ``problem_for`` answers with
  ``Connection: close``. A malformed chunked
  framing gets uvicorn's own ``400 Invalid HTTP request received.``, and the
  connection closes. Closed while the body is still coming, it closes lingering
  (``api.lingering``, on both routes): the client reads the answer, not a reset.
- Memory is bounded whatever the body's length: past ``BODY_BUFFER_BYTES``
  not yet taken by the ingest (an append in flight) the socket is not read.

One deviation: a client that goes away mid-body has every whole line it sent
stored, where uvicorn drops what the app had not read yet; either way nothing
is closed, and a resend with the same key stores each line once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import httptools
from uvicorn.server import ServerState

from api.auth import authorize
from api.body_framing import BadFraming, ChunkedBody, SizedBody
from api.cors import cors_headers
from api.heads import RequestHead, parse_head
from api.ingest import CLIENT_GONE, Ingest
from api.lean_publish import (
    NotValidated,
    problem_bytes,
    response_bytes,
    topic_post_of,
)
from api.negotiation import media_type_of
from api.problems import (
    HttpProblem,
    TokenLapsedMidIngest,
    closes_connection,
    problem,
    problem_for,
)
from api.publish import (
    NDJSON,
    _close_requested,
    idempotency_key,
    ingest_of,
    refuse_event_parameter,
    run_ingest,
)
from api.raw_answers import INVALID_REQUEST, invalid_request
from broker import BrokerError, InvalidInput
from broker.validation import check_topic

log = logging.getLogger(__name__)

BODY_BUFFER_BYTES = 65536
"""Body bytes held for the ingest before the socket stops being read (uvicorn's
``HIGH_WATER_LIMIT``, which bounded the ASGI route the same way)."""


@dataclass(slots=True)
class IngestHead:
    """A streaming ingest's head: what serving it needs besides its body."""

    scope: dict[str, Any]
    chunked: bool
    body_size: int
    """The Content-Length (when not chunked)."""
    keep_alive: bool


def ingest_head_of(
    head: RequestHead, parser: httptools.HttpRequestParser, app: Any, scheme: str
) -> IngestHead | None:
    """The head of a streaming ingest served lean, or None for uvicorn to serve."""
    post = topic_post_of(head, parser)
    framing = _framing_of(head.headers)
    if post is None or framing is None:
        return None
    chunked, size, content_type = framing
    if media_type_of(content_type.decode("latin-1")) not in ((NDJSON, None), (NDJSON, "utf-8")):
        return None  # (another charset: the app answers 415)
    return IngestHead(post.scope_for(app, scheme), chunked, size, parser.should_keep_alive())


def _framing_of(headers: list[tuple[bytes, bytes]]) -> tuple[bool, int, bytes] | None:
    """Chunked or not, the Content-Length, and the content type, if the body is framed
    plainly: one ``Transfer-Encoding: chunked`` or one Content-Length, no ``Expect``
    (uvicorn answers ``100 Continue``)."""
    size: bytes | None = None
    coding: bytes | None = None
    content_type = b""
    for name, value in headers:
        if name == b"content-type":
            content_type = value
        elif name == b"expect" or (name == b"content-length" and size is not None):
            return None
        elif name == b"transfer-encoding" and coding is not None:
            return None
        elif name == b"content-length":
            size = value
        elif name == b"transfer-encoding":
            coding = value
    if coding is not None:
        chunked = size is None and coding.strip().lower() == b"chunked"
        return (True, 0, content_type) if chunked else None
    if size is None or not size.isdigit():
        return None
    return False, int(size), content_type


def ingest_request(data: bytes, app: Any, scheme: str = "http") -> IngestHead | None:
    """``ingest_head_of`` the head at the start of ``data`` (for tests)."""
    parsed = parse_head(data)
    return None if parsed is None else ingest_head_of(*parsed, app, scheme)


# -- the body, as the ingest reads it -----------------------------------------------------------


class ReceivedBody:
    """What the connection decoded of the body and the ingest has not read yet: an
    ``api.ingest.IngestBody``. Past ``BODY_BUFFER_BYTES`` the socket is not read
    until the ingest takes it (while an append is in flight, what arrives waits
    here, and goes in the next batch)."""

    __slots__ = ("_buffer", "_gone", "_more", "_paused", "_transport", "_waiter")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._buffer = bytearray()
        self._more = True
        self._gone = False
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def add(self, data: bytes, more: bool) -> None:
        """Bytes of the body; ``more`` False once it ended."""
        self._buffer += data
        self._more = more
        if more and len(self._buffer) > BODY_BUFFER_BYTES and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def gone(self) -> None:
        """The client went away (or its framing broke) before the body's end."""
        self._gone = True
        self._wake()

    async def read(self) -> tuple[bytes, bool]:
        while not self._buffer and self._more and not self._gone:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._buffer:  # (what came whole before the client went is stored)
            data = bytes(self._buffer)
            self._buffer.clear()
            if self._paused and self._more and not self._gone:
                self._paused = False
                self._transport.resume_reading()
            return data, self._more
        if self._gone:
            raise InvalidInput(CLIENT_GONE)
        return b"", False

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


# -- one ingest on the connection ---------------------------------------------------------------


class IngestConnection(Protocol):
    """The connection an ingest is served on (``api.connections.BrokerHttpProtocol``)."""

    def ingest_started(self, body_start: int) -> None:
        """Validated: hand what was received after the head to ``received``, and read on."""

    def ingest_not_validated(self) -> None:
        """Nothing reached the store: hand the request, from its first byte, to uvicorn."""

    def ingest_answered(self, request: IngestHead, answer: bytes, close: bool) -> None:
        """Write the whole answer; close the connection if ``close``."""

    def ingest_over(self, request: IngestHead, rest: bytes) -> None:
        """Answered, and the body has ended: ``rest`` begins the next request."""


class IngestExchange:
    """One streaming ingest served on the connection, from its head to its answer and
    its body's end.

    States: validating (the task checks the request; the connection holds every
    byte, reading paused, for uvicorn should it be refused); ingesting (the body
    decoded as it arrives, its lines stored by the task); answered before the
    body's end (an error: the rest of the body is read and dropped); over (answered,
    and the body ended: the connection reads the next request).
    """

    __slots__ = (
        "_body",
        "_connection",
        "_framing",
        "_request",
        "_server_state",
        "_task",
        "answered",
        "body_ended",
    )

    def __init__(
        self, connection: IngestConnection, request: IngestHead, server_state: ServerState
    ) -> None:
        self._connection = connection
        self._request = request
        self._server_state = server_state
        self._framing = ChunkedBody() if request.chunked else SizedBody(request.body_size)
        self._body: ReceivedBody | None = None  # once validated
        self._task: asyncio.Task[None] | None = None
        self.answered = False
        self.body_ended = False  # its end was read (and given to the ingest)

    def start(self, transport: asyncio.Transport, body_start: int) -> None:
        """Validate (reading paused), then ingest; the task is one of uvicorn's, which
        waits for it at shutdown as for the ASGI route's."""
        transport.pause_reading()
        self._task = asyncio.get_running_loop().create_task(self._run(transport, body_start))
        self._server_state.tasks.add(self._task)
        self._task.add_done_callback(self._server_state.tasks.discard)

    @property
    def ingesting(self) -> bool:
        """Past validation: the body's bytes go to ``received``."""
        return self._body is not None

    def received(self, data: bytes) -> bool:
        """Bytes of the body (and, past its end, of the next request): whether the body
        ended with them. Malformed framing is answered here, and the connection closed."""
        body = self._framing.decode(data)
        ended = self.body_ended = self._framing.ended
        if self._body is not None and not self.answered:
            self._body.add(body, not ended)
        if self._framing.broken is not None:
            self._bad_framing(self._framing.broken)
            return False
        if ended and self.answered:
            self._connection.ingest_over(self._request, self._framing.rest)
        return ended

    @property
    def rest(self) -> bytes:
        """What followed the body's end in its last read: a request sent ahead."""
        return self._framing.rest

    def lost(self) -> None:
        """The connection was lost: the ingest stores what came whole, and stops."""
        if self._body is not None:
            self._body.gone()

    async def _run(self, transport: asyncio.Transport, body_start: int) -> None:
        try:
            await self._validate_and_ingest(transport, body_start)
        except BaseException:
            # (a cancellation: the instance's at shutdown, or a stray one out of the
            # validation or the ingest: no answer to give, but the connection must not
            # stay open, unanswered (its reading paused), its producer waiting for good)
            transport.close()
            raise

    async def _validate_and_ingest(self, transport: asyncio.Transport, body_start: int) -> None:
        try:
            ingest, close = await self._validated()
        except NotValidated as error:
            if not isinstance(error.__cause__, BrokerError | HttpProblem):
                log.error("unexpected error validating an ingest", exc_info=error.__cause__)
            self._connection.ingest_not_validated()
            return
        self._body = ReceivedBody(transport)
        self._connection.ingest_started(body_start)
        answer, close_after = await self._answer(ingest, close)
        if self.answered:  # (the framing broke: answered and closed already)
            return
        self.answered = True
        self._connection.ingest_answered(self._request, answer, close_after)
        if self.body_ended and not close_after:
            self._connection.ingest_over(self._request, self._framing.rest)

    async def _validated(self) -> tuple[Ingest, bool]:
        """The ingest, validated as ``api.publish`` does before the store; else
        ``NotValidated``."""
        scope = self._request.scope
        state = scope["app"].state
        try:
            topic = check_topic(scope["path_params"]["topic"])
            grant = await authorize(scope, "publish", [topic])
            key = idempotency_key(scope["headers"])
            close = _close_requested(scope)
            refuse_event_parameter(scope)
            return ingest_of(state.broker, state.settings, topic, key, grant, state.streams), close
        except Exception as error:
            raise NotValidated from error

    async def _answer(self, ingest: Ingest, close: bool) -> tuple[bytes, bool]:
        """The answer's bytes, and whether the connection closes after it."""
        assert self._body is not None
        request, server_state = self._request, self._server_state
        try:
            status, headers, content = await run_ingest(ingest, self._body, close)
        except HttpProblem as error:
            # A 408 (no line in time): the client is idle, so nothing is left unread;
            # on the ASGI route the guard closes such a connection a moment later.
            answer = problem_bytes(request, problem_for(error), server_state)
            return answer, error.status == 408 or isinstance(error, TokenLapsedMidIngest)
        except BrokerError as error:
            response = problem_for(error)  # (which says whether the connection closes)
            return problem_bytes(request, response, server_state), closes_connection(response)
        except Exception:
            log.exception("unexpected error in an ingest on %s", request.scope["path"])
            failure = problem(500, "Internal error", "the broker could not publish")
            return problem_bytes(request, failure, server_state), True  # (its CORS added there)
        return response_bytes(request, status, headers, content, server_state), False

    def _bad_framing(self, error: BadFraming) -> None:
        """uvicorn's answer to a request httptools cannot parse; what came whole is stored."""
        log.warning("%s (%s)", INVALID_REQUEST, error)
        if self._body is not None:
            self._body.gone()
        if self.answered:
            self._connection.ingest_answered(self._request, b"", True)
            return
        self.answered = True
        cors = cors_headers(self._request.scope)
        self._connection.ingest_answered(
            self._request, invalid_request(self._server_state, cors), True
        )
