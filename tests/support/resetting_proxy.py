"""A TCP proxy before a broker that resets a connection instead of passing on an answer.

What a middlebox (a balancer, a NAT, a TCP stack that drops what it had not handed up
when an RST comes) does to a request the broker answered before its body ended: the
broker writes its answer and closes; the client gets an RST, and never reads what the
broker said. ``reset_next_answer(b"409")`` does that once, to the next answer whose
status is 409; every other answer passes.
"""

from __future__ import annotations

import contextlib
import socket
import struct

from tests.support.tcp_proxy import TcpProxy


class ResettingProxy(TcpProxy):
    """Forwards 127.0.0.1:``port`` to ``upstream_port``; ``reset_next_answer`` arms it."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self._to_reset: bytes | None = None  # the status line's start of the answer to reset
        self.resets = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ResettingProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def reset_next_answer(self, status: bytes) -> None:
        """The next answer with this status (b"409") never reaches the client: its
        connection is reset (an RST, not a FIN) as the answer arrives."""
        with self._lock:
            self._to_reset = b"HTTP/1.1 " + status + b" "

    def _passes(self, data: bytes, target: socket.socket, upstream: bool) -> bool:
        with self._lock:
            resets = not upstream and self._to_reset is not None
            if resets and data.startswith(self._to_reset or b""):
                self._to_reset = None
                self.resets += 1
                _reset(target)
                return False
        return True


def _reset(client: socket.socket) -> None:
    """Close ``client`` with an RST: linger 0, and its reader (the other pipe) woken by
    shutting its reading side (that sends nothing), so that it does not end the
    connection with a FIN first."""
    with contextlib.suppress(OSError):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.shutdown(socket.SHUT_RD)
    client.close()
