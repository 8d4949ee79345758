"""A TCP proxy before a redis-server that can make one kind of command slow.

A store that answers some commands at once and others late (a Redis busy with another
client's large reads, a network that stalls one connection): ``slow_down(marker,
seconds)`` holds each command whose bytes hold ``marker`` (a script's SHA, a command's
name) that long before passing it on, and what its connection sends after it with it.
"""

from __future__ import annotations

import socket

from tests.support.tcp_proxy import TcpProxy


class SlowRedisProxy(TcpProxy):
    """Forwards 127.0.0.1:``port`` to ``upstream_port``, each connection by two threads."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self._slow: tuple[bytes, float] | None = None
        self.held = 0  # commands held so far

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def slow_down(self, marker: bytes, seconds: float) -> None:
        """From now on, hold each command holding ``marker`` for ``seconds``."""
        with self._lock:
            self._slow = (marker, seconds)

    def normal(self) -> None:
        """From now on, pass every command on at once again."""
        with self._lock:
            self._slow = None

    def __enter__(self) -> SlowRedisProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _passes(self, data: bytes, target: socket.socket, upstream: bool) -> bool:
        with self._lock:
            slow = self._slow
        if upstream and slow is not None and data.find(slow[0]) >= 0:
            self.held += 1
            self._stop.wait(slow[1])  # (cut short when the proxy closes)
        return True
