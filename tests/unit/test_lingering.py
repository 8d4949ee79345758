"""api/lingering.py's close where the client reset the connection between the answer
and the half close: ``write_eof`` shuts the socket down, which then raises (ENOTCONN).
Not to be provoked through a real socket on time (the reset must land in that gap),
so here with a transport that raises as the socket does."""

from __future__ import annotations

import asyncio
import errno

from uvicorn.server import ServerState

from api.deadlines import Deadlines
from api.lingering import close_lingering


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
