"""A plain publish served on its connection: the connection's side of it.

``api.connections`` reads a connection's request head; one that is a plain publish
(``api.lean_publish`` says which are) has its body read here, into the bytes the
connection received, and is published once the body is whole (a
``PublishExchange``). Its answer is written here too: then the next request's head
decides again, or, the client asking to close or the instance draining, the
connection closes (lingering: a client that sent requests ahead reads the answer,
not a reset). A publish the store did not take goes to uvicorn, bytes and all.
"""

from __future__ import annotations

import asyncio

from starlette.responses import Response
from uvicorn.config import Config
from uvicorn.server import ServerState

from api.guard import Guard
from api.lean_publish import PublishExchange, PublishHead
from api.lingering import close_after_answer
from api.metrics import RouteClass, count_response
from api.proxy_headers import log_access


class PublishServing:
    """The part of ``BrokerHttpProtocol`` that serves a lean publish: an
    ``api.lean_publish.PublishConnection``.

    A mixin: the state it reads is the connection's, set by ``BrokerHttpProtocol``.
    """

    # (their types; ``BrokerHttpProtocol.__init__`` sets them)
    _config: Config
    _server_state: ServerState
    _transport: asyncio.Transport | None
    _lost: bool
    _guard: Guard
    _received: bytearray
    _publish: PublishHead | None
    _body_start: int
    _publishing: PublishExchange | None
    _closing: bool
    _client_ended: bool

    def _answer(self, response: Response, route: RouteClass) -> None:
        """A whole response, then the connection closes (``BrokerHttpProtocol``'s)."""
        raise NotImplementedError

    def _hand_to_uvicorn(self) -> None:
        """uvicorn's protocol takes the connection (``BrokerHttpProtocol``'s)."""
        raise NotImplementedError

    def _await_next_request(self) -> None:
        """The next head decides again (``BrokerHttpProtocol``'s)."""
        raise NotImplementedError

    def expire(self) -> None:
        """A deadline passed (``BrokerHttpProtocol``'s)."""
        raise NotImplementedError

    def _read_body(self) -> bool:
        """Publish once the body is whole; whether it is."""
        assert self._publish is not None and self._transport is not None
        body_end = self._body_start + self._publish.body_size
        if len(self._received) < body_end:
            return False
        self._guard.deadlines.clear(self)
        # The socket is still read meanwhile (what comes waits in _received): pausing and
        # resuming it around every publish cost two epoll changes (measured, io_uring
        # calls per publish), for the rare client that pipelines.
        body = bytes(self._received[self._body_start : body_end])
        self._publishing = PublishExchange(self, self._publish, self._server_state)
        self._publishing.start(body, self._guard.deadlines)
        return True

    def publish_failed(self, request: PublishHead, response: Response) -> None:
        """``PublishConnection``: the append failed; answer and close."""
        self._publishing = None
        if not self._lost:
            self._server_state.total_requests += 1
            assert self._transport is not None
            log_access(self._transport, self._config, request.scope, response.status_code)
        self._answer(response, "publish")

    def publish_not_validated(self) -> None:
        """``PublishConnection``: nothing was stored; the app answers the request."""
        self._publishing = None
        self._hand_to_uvicorn()

    def publish_answered(self, request: PublishHead, answer: bytes) -> None:
        """``PublishConnection``: write the answer; then read the next request, or close."""
        self._publishing = None
        self._publish = None
        if self._lost:
            return
        assert self._transport is not None
        self._server_state.total_requests += 1
        status = int(answer[9:12])
        count_response("publish", status)
        log_access(self._transport, self._config, request.scope, status)
        # (its client half-closed, nothing whole after it: this answer is its last)
        last = self._client_ended and len(self._received) == self._body_start + request.body_size
        if (self._closing or last) and request.keep_alive:
            answer = answer.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
        self._transport.write(answer)
        if not request.keep_alive or last or self._closing:
            # Lingering while requests sent ahead may still come: a drain closes a
            # kept-alive connection, or bytes came after this body (a client sending on
            # past its own ``Connection: close``). Not once its client half-closed.
            ahead = len(self._received) > self._body_start + request.body_size
            may_send = not self._client_ended and (ahead or (self._closing and request.keep_alive))
            if close_after_answer(
                self._transport,
                self._server_state,
                self._guard.deadlines,
                client_may_send=may_send,
            ):
                self._server_state.connections.discard(self)
            return
        del self._received[: self._body_start + request.body_size]
        self._await_next_request()
