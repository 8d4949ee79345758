"""api/lingering.py's close where the client reset the connection between the answer
and the half close: ``write_eof`` shuts the socket down, which then raises (ENOTCONN).
Not to be provoked through a real socket on time (the reset must land in that gap),
so here with a transport that raises as the socket does."""

from __future__ import annotations

import asyncio
import errno
import socket

from uvicorn.server import ServerState

from api.deadlines import Deadlines
from api.lingering import close_after_answer, close_lingering, unread_bytes
from tests.support.polling import await_until


class _ResetTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False
        self.protocol_set = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    def abort(self) -> None:
        self.aborted = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol_set = True


async def test_a_connection_reset_before_its_half_close_is_let_go_not_raised() -> None:
    """The OSError went up into the ingest's task (or uvicorn's app task) as an error
    of the request; the connection is aborted instead, and nothing lingers on it."""
    transport, state = _ResetTransport(), ServerState()
    close_lingering(transport, state, Deadlines())
    assert transport.aborted and not transport.protocol_set
    assert not state.connections


async def _pair() -> tuple[asyncio.Transport, socket.socket, asyncio.Server]:
    """A server transport (reading paused: what comes waits in its socket) and its client."""
    accepted: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()

    class Accepting(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()
            accepted.set_result(transport)

    server = await asyncio.get_running_loop().create_server(Accepting, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    return await asyncio.wait_for(accepted, 5), client, server


async def test_bytes_unread_in_the_socket_make_a_close_after_an_answer_linger() -> None:
    """Bytes of its client's waiting unread in the socket (a request sent ahead, reading
    paused): closed at once, the socket resets the connection; so the close lingers,
    though the caller knows of nothing more coming. With nothing unread: a plain close."""
    transport, client, server = await _pair()
    try:
        assert unread_bytes(transport) == 0
        deadlines, state = Deadlines(), ServerState()
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        await await_until(lambda: unread_bytes(transport) > 0, timeout=5, what="bytes unread")
        assert close_after_answer(transport, state, deadlines, client_may_send=False)
        assert not transport.is_closing() and state.connections  # (lingering)
        transport.abort()
        quiet, quiet_client, quiet_server = await _pair()
        try:
            assert not close_after_answer(quiet, state, deadlines, client_may_send=False)
            assert quiet.is_closing()
        finally:
            quiet_client.close()
            quiet_server.close()
    finally:
        client.close()
        server.close()
