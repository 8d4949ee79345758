"""A TCP proxy before a broker that takes the ``Broker-Heartbeat`` header out of its
answers: the broker as a client sees one from before it said its heartbeat.

The subscriber then guesses how long a stream may stay silent (its ``read_timeout``,
grown by streams that timed out, set from the heartbeats it reads): the tests of that
guess run against a real broker through this.
"""

from __future__ import annotations

import contextlib
import re
import socket

from tests.support.tcp_proxy import TcpProxy

HEARTBEAT_HEADER_LINE = re.compile(rb"\r\nbroker-heartbeat:[^\r\n]*", re.IGNORECASE)
"""The header's line, with the line end before it. The broker writes a stream's head in
one write, which a loopback read takes whole: the line is never split across reads."""


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
        if upstream or HEARTBEAT_HEADER_LINE.search(data) is None:
            return True
        with contextlib.suppress(OSError):  # (as the pipe's own send: the client went)
            target.sendall(HEARTBEAT_HEADER_LINE.sub(b"", data))
        return False
