"""A TCP proxy before a broker that takes the ``Broker-Heartbeat`` header out of its
answers: the broker as a client sees one from before it said its heartbeat.

The subscriber then guesses how long a stream may stay silent (its ``read_timeout``,
grown by streams that timed out, set from the heartbeats it reads): the tests of that
guess run against a real broker through this.

Nor did such a broker know ``?heartbeat=event`` (it ignored it, and beat with comments):
the parameter is taken out of the requests, so that a page (/client.js) hears no beat.
"""

from __future__ import annotations

import contextlib
import re
import socket

from tests.support.tcp_proxy import TcpProxy

HEARTBEAT_HEADER_LINE = re.compile(rb"\r\nbroker-heartbeat:[^\r\n]*", re.IGNORECASE)
"""The header's line, with the line end before it. The broker writes a stream's head in
one write, which a loopback read takes whole: the line is never split across reads."""
BEATS_AS_EVENTS = re.compile(rb"([?&])heartbeat=event(&|(?= HTTP/))")
"""The parameter in a request line (a loopback read takes it whole), with what joins it
to the next one, if any."""


class OlderBrokerProxy(TcpProxy):
    """Forwards 127.0.0.1:``port`` to ``upstream_port``, the header taken out."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OlderBrokerProxy:
        super().start()
        return self

    def __enter__(self) -> OlderBrokerProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _passes(self, data: bytes, target: socket.socket, upstream: bool) -> bool:
        older, changed = _as_older_broker_sees(data) if upstream else _as_older_broker_says(data)
        if not changed:
            return True
        with contextlib.suppress(OSError):  # (as the pipe's own send: the other side went)
            target.sendall(older)
        return False


def _as_older_broker_says(answer: bytes) -> tuple[bytes, bool]:
    """The answer without its ``Broker-Heartbeat`` header."""
    older, count = HEARTBEAT_HEADER_LINE.subn(b"", answer)
    return older, count > 0


def _as_older_broker_sees(request: bytes) -> tuple[bytes, bool]:
    """The request without ``heartbeat=event`` (``?heartbeat=event&a`` is ``?a``)."""
    older, count = BEATS_AS_EVENTS.subn(lambda found: found[1] if found[2] else b"", request)
    return older, count > 0
