"""A plain streaming ingest served on its connection: the connection's side of it.

``api.connections`` reads a connection's request head; one that is a plain
streaming ingest (``api.lean_ingest`` says which are) is an ``IngestExchange``,
and what the connection receives goes to it: its body, decoded as it arrives, and
past the body's end the next request, held until the ingest is answered. The
answer is written here; then the rest of the body is read and dropped (an error
answered early) and the next head decides again, or the connection closes:
lingering while its client may still be sending (the rest of the body, or, during
a drain, requests sent ahead), for it to read the answer rather than a reset
(``api.lingering``). An ingest the store did not take goes to uvicorn, bytes and all.
"""

from __future__ import annotations

import asyncio
from typing import cast

from uvicorn.config import Config
from uvicorn.server import ServerState

from api.guard import Guard
from api.lean_ingest import IngestExchange, IngestHead
from api.lingering import close_after_answer
from api.metrics import count_response
from api.proxy_headers import log_access


class IngestServing:
    """The part of ``BrokerHttpProtocol`` that serves a lean streaming ingest: an
    ``api.lean_ingest.IngestConnection``.

    A mixin: the state it reads is the connection's, set by ``BrokerHttpProtocol``.
    """

    # (their types; ``BrokerHttpProtocol.__init__`` sets them)
    _config: Config
    _server_state: ServerState
    _transport: asyncio.Transport | None
    _lost: bool
    _guard: Guard
    _received: bytearray
    _ingest: IngestExchange | None
    _closing: bool

    def _hand_to_uvicorn(self) -> None:
        """uvicorn's protocol takes the connection (``BrokerHttpProtocol``'s)."""
        raise NotImplementedError

    def _await_next_request(self) -> None:
        """The next head decides again (``BrokerHttpProtocol``'s)."""
        raise NotImplementedError

    def expire(self) -> None:
        """A deadline passed (``BrokerHttpProtocol``'s)."""
        raise NotImplementedError

    def _ingest_data(self, exchange: IngestExchange, data: bytes) -> None:
        if not exchange.ingesting or exchange.body_ended:
            self._received += data  # (read before the pause took effect)
            return
        # (the rest of a body answered early is dropped here, its deadline set once by
        # ingest_answered: set at each read, a client trickling a byte within each
        # deadline held the connection for ever)
        if exchange.received(data) and self._ingest is exchange and not self._lost:
            assert self._transport is not None
            self._transport.pause_reading()  # pipelined requests wait for its answer

    def ingest_started(self, body_start: int) -> None:
        """``IngestConnection``: validated; what came after the head is the body's."""
        assert self._ingest is not None and self._transport is not None
        held = bytes(self._received[body_start:])
        self._received.clear()
        if self._lost:
            self._ingest.lost()
            return
        self._transport.resume_reading()
        self._ingest_data(self._ingest, held)  # (even empty: a body may be over already)

    def ingest_not_validated(self) -> None:
        """``IngestConnection``: nothing was stored; the app answers the request."""
        self._ingest = None
        self._hand_to_uvicorn()

    def ingest_answered(self, request: IngestHead, answer: bytes, close: bool) -> None:
        """``IngestConnection``: write the answer; close, or read the body on to its end."""
        if self._lost:
            return
        assert self._transport is not None and self._ingest is not None
        if answer:
            self._server_state.total_requests += 1
            status = int(answer[9:12])
            count_response("ingest", status)
            log_access(self._transport, self._config, request.scope, status)
        if self._closing and request.keep_alive and not close:
            answer = answer.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
        self._transport.write(answer)
        if close or self._closing or not request.keep_alive:
            self._close_after_ingest(self._ingest, self._closing and request.keep_alive)
        elif not self._ingest.body_ended:  # (ReceivedBody may have paused it)
            # the whole rest, read and dropped, within the body timeout of the answer
            # (not refreshed by its reads); past it the connection closes lingering
            self._guard.deadlines.set(self, self._guard.limits.body_timeout)
            self._transport.resume_reading()

    def _close_after_ingest(self, exchange: IngestExchange, sent_ahead: bool = False) -> None:
        """Close after an ingest's answer: lingering while its body is still coming (a
        409 or 503 that ends it, a 400 for its framing), or while requests its client
        sent ahead may still come (``sent_ahead``: a drain closes a kept-alive
        connection; or bytes of one came after the body: a 401 for a token lapsing at
        the last line, a 503), for its producer to read the answer rather than a reset
        (``api.lingering``). Plainly once the body ended and nothing came after it."""
        assert self._transport is not None
        self._guard.deadlines.clear(self)
        ahead = sent_ahead or bool(exchange.rest) or bool(self._received)
        may_send = not exchange.body_ended or ahead
        if close_after_answer(
            self._transport, self._server_state, self._guard.deadlines, client_may_send=may_send
        ):
            self._server_state.connections.discard(self)

    def ingest_over(self, request: IngestHead, rest: bytes) -> None:
        """``IngestConnection``: answered and its body read: on to the next request."""
        self._ingest = None
        self._guard.deadlines.clear(self)
        if self._lost or self._transport is None or self._transport.is_closing():
            return
        if self._closing:  # (answered during the drain: its answer closed it, lingering)
            return
        if self._transport.get_protocol() is not cast(asyncio.BaseProtocol, self):
            # (its answer closed the connection, lingering: ``Connection: close`` with bytes
            # after its body. Read on here, the request sent ahead past the close was
            # carried out (a publish stored), and its answer never sent.)
            return
        self._received[:0] = rest
        self._await_next_request()
