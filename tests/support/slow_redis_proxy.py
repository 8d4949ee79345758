"""A TCP proxy before a redis-server that can make one kind of command slow.

A store that answers some commands at once and others late (a Redis busy with another
client's large reads, a network that stalls one connection): ``slow_down(marker,
seconds)`` holds each command whose bytes hold ``marker`` (a script's SHA, a command's
name) that long before passing it on, and what its connection sends after it with it;
``let_through()`` passes those held on at once.
"""

from __future__ import annotations

import socket
import threading

from tests.support.tcp_proxy import TcpProxy


class SlowRedisProxy(TcpProxy):
    """Forwards 127.0.0.1:``port`` to ``upstream_port``, each connection by two threads."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self._slow: tuple[bytes, float] | None = None
        self._let_through = threading.Event()  # (cuts the holds under way short)
        self.held = 0  # commands held so far

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def slow_down(self, marker: bytes, seconds: float) -> None:
        """From now on, hold each command holding ``marker`` for ``seconds`` (or until
        ``let_through()``)."""
        with self._lock:
            self._let_through.clear()
            self._slow = (marker, seconds)

    def normal(self) -> None:
        """From now on, pass every command on at once again."""
        with self._lock:
            self._slow = None

    def let_through(self) -> None:
        """Pass the commands held on now, and every command from now on at once."""
        self.normal()
        self._let_through.set()

    def __enter__(self) -> SlowRedisProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._let_through.set()
        super().close()

    def _passes(self, data: bytes, target: socket.socket, upstream: bool) -> bool:
        with self._lock:
            slow = self._slow
        if upstream and slow is not None and data.find(slow[0]) >= 0:
            self.held += 1
            self._let_through.wait(slow[1])  # (cut short when the proxy closes)
        return True
