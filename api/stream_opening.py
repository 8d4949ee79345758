"""How a connection opens a plain stream request: subscribe, then give the socket away.

``api.connections`` reads a connection's request head; one that is a plain stream
request (``api.lean_stream`` says which are) is opened here. Nothing more is read
meanwhile: should the stream not open, what came stays in the socket, for uvicorn.
Once subscribed, the socket's protocol becomes a ``StreamConnection`` for good, and
its response head is written (with the retry hint and the subscription's opening
beat). A store that does not answer, a stream already over, or an instance that
began to drain meanwhile is answered here; an unexpected failure goes to uvicorn,
which tries again.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope
from uvicorn.config import Config
from uvicorn.server import ServerState

from api import routes
from api.cors import cors_headers, with_cors
from api.lean_stream import StreamConnection, chunk_of, is_http_1_0
from api.metrics import RouteClass, count_response
from api.problems import problem_for
from api.proxy_headers import log_access
from api.raw_answers import response_head
from broker import StartFrom, StoreUnavailable, StreamOver
from broker.framing import retry_hint

log = logging.getLogger(__name__)

CLOSE = (b"connection", b"close")


class StreamOpening:
    """The part of ``BrokerHttpProtocol`` that opens a stream (``_open_stream``) and
    hands its socket to a ``StreamConnection``.

    A mixin: the state it reads is the connection's, set by ``BrokerHttpProtocol``.
    """

    # (their types; ``BrokerHttpProtocol.__init__`` sets them)
    _config: Config
    _server_state: ServerState
    _transport: asyncio.Transport | None
    _lost: bool
    _opening: asyncio.Task[None] | None
    _opening_scope: Scope

    def _answer(self, response: Response, route: RouteClass) -> None:
        """A whole response, then the connection closes (``BrokerHttpProtocol``'s)."""
        raise NotImplementedError

    def _hand_to_uvicorn(self) -> None:
        """uvicorn's protocol takes the connection (``BrokerHttpProtocol``'s)."""
        raise NotImplementedError

    def _open_stream(self, request: Request, starts: dict[str, StartFrom]) -> None:
        # Nothing more is read until it is known who serves the connection: what
        # comes meanwhile stays in the socket, for uvicorn should the stream not open.
        assert self._transport is not None  # data comes after connection_made
        self._transport.pause_reading()
        self._opening_scope = request.scope
        self._opening = asyncio.get_running_loop().create_task(self._open(request, starts))

    async def _open(self, request: Request, starts: dict[str, StartFrom]) -> None:
        """Subscribe, then hand the socket to a StreamConnection (or, failing, to uvicorn)."""
        app = request.app
        retry_ms = app.state.settings.retry_ms
        assert self._transport is not None
        chunked = not is_http_1_0(request)
        stream = StreamConnection(
            self._transport, app.state.streams, self._server_state, chunked=chunked
        )
        try:
            subscription = await routes.subscribe(request, starts, stream)
        except StoreUnavailable:
            # Answered here: through uvicorn it would wait for the store a second time.
            self._answer(
                routes.come_back_later(retry_ms, "store unavailable", request.scope), "stream"
            )
            return
        except StreamOver as over:
            # 204: the EventSource stops reconnecting; a cross-origin one only if the 204
            # passes CORS (else it is a network error to it, and it reconnects for ever).
            self._answer(with_cors(problem_for(over), request.scope), "stream")
            return
        except Exception:
            log.exception("unexpected error opening a stream")
            self._hand_to_uvicorn()  # it tries again, and answers 500 if that fails too
            return
        if self._lost or app.state.streams.draining or subscription.closed:
            subscription.close()
            self._answer(
                routes.come_back_later(retry_ms, "this instance is shutting down", request.scope),
                "stream",
            )
            return
        self._server_state.connections.discard(self)
        self._transport.set_protocol(stream)
        self._server_state.total_requests += 1
        count_response("stream", 200)
        log_access(self._transport, self._config, request.scope, 200)
        headers = [*app.state.stream_headers, *cors_headers(request.scope)]
        head = self._response_head(retry_ms, subscription.opening_beat, headers, chunked=chunked)
        stream.start(subscription, head)
        self._transport.resume_reading()  # to see the client go

    def _response_head(
        self,
        retry_ms: int,
        opening_beat: bytes,
        stream_headers: list[tuple[bytes, bytes]],
        *,
        chunked: bool,
    ) -> bytes:
        """``stream_headers``: the app's, and the request's CORS headers; ``opening_beat``:
        the subscription's, after the retry hint (nothing, unless its beats are events)."""
        # The connection ends with the stream (a StreamConnection serves no other
        # request): said up front, so that a client whose stream ended (broker.end,
        # a drain) does not send its next request down a socket that is closing.
        if not chunked:  # (HTTP/1.0: the body ends with the connection)
            head = response_head(200, [*stream_headers, CLOSE], self._server_state)
            return head + retry_hint(retry_ms) + opening_beat
        headers = [*stream_headers, (b"transfer-encoding", b"chunked"), CLOSE]
        opening = retry_hint(retry_ms) + opening_beat
        return response_head(200, headers, self._server_state) + chunk_of(opening)
