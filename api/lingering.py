"""Closing a connection whose client may still be sending: lingering, as nginx does.

A socket closed with bytes it has not read resets its connection (Linux sends an
RST, not a FIN), and so does one that bytes reach once it is closed. An answer given
before its request's body ended (a refusal, an ingest told to stop: 409, 503, 401,
408, a 400 for its framing) and the connection closed after it would reach a client
still writing as "connection reset": its writes fail, and its system, or anything
between (a proxy, a balancer), may throw the answer away before the client reads it.
A producer that sees only the reset resends its stream whole, which stores again
the lines it was told were kept. The same holds for a client that sent requests ahead
(pipelined) of the answer after which the connection closes (RFC 9112 9.6: a server
closes in stages, its side first, then reads until the client's end).

So every close after an answer goes through ``close_after_answer``: lingering when the
client may still send (its request or body unfinished, a request sent ahead, bytes
received and not consumed, here or in the socket), plainly otherwise.

So such a connection closes lingering (nginx's ``lingering_close``): the answer
written, the process stops writing (a FIN after the answer), then reads and drops
what the client still sends until the client ends its side, for at most
``LINGER_SECONDS`` and ``LINGER_MAX_BYTES`` (nginx lingers 30 s at most, 5 s
between reads: scaled down here; a client that reads its answer only once its body
is sent has that long to send it, else its writes fail then and it reads the answer
where its system kept it, as Linux does), then closes. Dropped bytes are counted,
never held; nothing waits but a deadline. (Through nginx or HAProxy as deployed,
the balancer reads the answer and lingers towards the client itself.)
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
from collections.abc import Callable
from typing import Any

from uvicorn.server import ServerState

from api.deadlines import Deadlines
from api.metrics import LINGERING_CLOSES

LINGER_SECONDS = 2.0
"""How long a client may still send after its answer before the connection is cut."""
LINGER_MAX_BYTES = 1 << 20
"""A client still sending past this after its answer is cut."""


def close_after_answer(
    transport: asyncio.Transport,
    server_state: ServerState,
    deadlines: Deadlines,
    *,
    client_may_send: bool,
) -> bool:
    """The way the edge closes a connection after writing an answer: lingering if its
    client may still send (``client_may_send``: the caller's protocol is mid-message, or
    holds bytes of a request sent ahead) or bytes it sent wait unread in the socket;
    else plainly (nothing unread, nothing coming: a plain close sends the answer, then
    a FIN). Whether it lingers: the caller's protocol then gives the connection up (it
    is no longer told of it, nor counted among uvicorn's connections)."""
    if transport.is_closing():
        return False
    if client_may_send or unread_bytes(transport) > 0:
        close_lingering(transport, server_state, deadlines)
        return True
    transport.close()
    return False


def unread_bytes(transport: asyncio.BaseTransport) -> int:
    """What the client sent that waits unread in the socket (reading paused: a request
    sent ahead): closed with it there, the socket resets the connection. 0 if not known."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):  # (closed meanwhile, or no socket of this kind)
        return 0
    return int(struct.unpack("i", raw)[0])


def close_lingering(
    transport: asyncio.Transport, server_state: ServerState, deadlines: Deadlines
) -> None:
    """Close ``transport`` once what was written to it is sent, reading and dropping
    what its client still sends meanwhile (bounded); the caller's protocol gives the
    connection up (it is no longer told of it)."""
    if not transport.can_write_eof():  # (TLS: no half close; closed as before)
        transport.close()
        return
    try:
        transport.write_eof()  # (after what is buffered: the answer goes first)
    except OSError:  # (its client reset it since the answer: nothing to linger for)
        transport.abort()
        return
    lingering = Lingering(transport, server_state, deadlines)
    transport.set_protocol(lingering)
    lingering.start()


class Lingering(asyncio.Protocol):
    """An answered connection on its way out: reads and drops what the client still
    sends until it closes its side, for at most LINGER_SECONDS and LINGER_MAX_BYTES.
    Counted among uvicorn's connections, so that a shutdown waits for it (briefly)."""

    def __init__(
        self, transport: asyncio.Transport, server_state: ServerState, deadlines: Deadlines
    ) -> None:
        self._transport = transport
        self._server_state = server_state
        self._deadlines = deadlines
        self._dropped = 0
        self._ending = "reset"  # (lost unasked: the client reset it, or a write failed)
        self._unsent = transport.get_write_buffer_size()  # (of the answer, at the last check)

    def start(self) -> None:
        self._server_state.connections.add(self)  # type: ignore[arg-type]
        self._deadlines.set(self, LINGER_SECONDS)
        if not self._transport.is_reading():  # (a protocol before may have paused it)
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self._dropped += len(data)
        if self._dropped > LINGER_MAX_BYTES:
            self._ending = "bytes"
            self._transport.abort()

    def eof_received(self) -> bool:
        self._ending = "client_end"  # (its body sent, or given up)
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        LINGERING_CLOSES.labels(self._ending).inc()
        self._server_state.connections.discard(self)
        self._deadlines.clear(self)

    def expire(self) -> None:
        """LINGER_SECONDS passed: cut, unless the answer is still going out, its client
        reading it (less of it waits than at the last check). Cut from the answer's write,
        a long answer (a history page) to a client reading it slowly was cut short, as a
        plain close (no deadline) never cut it; a client reading none of it is cut."""
        unsent = self._transport.get_write_buffer_size()
        if 0 < unsent < self._unsent:
            self._unsent = unsent
            self._deadlines.set(self, LINGER_SECONDS)
            return
        self._ending = "time"
        self._transport.abort()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: the answer is out, and the connection ends by
        itself within LINGER_SECONDS, or once a client reading it slowly read it (cut
        now, a client still sending could lose it)."""


class ClosingDeferred:
    """A transport as uvicorn's request cycle (``RequestResponseCycle``) sees it: the
    ``close()`` it calls once it wrote an answer after which the connection closes goes
    to ``close`` (which may linger); all else is the transport's own."""

    __slots__ = ("_close", "_transport", "write")

    def __init__(self, transport: asyncio.Transport, close: Callable[[], None]) -> None:
        self._transport = transport
        self._close = close
        self.write = transport.write  # (each of the cycle's writes: no __getattr__)

    def close(self) -> None:
        self._close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
