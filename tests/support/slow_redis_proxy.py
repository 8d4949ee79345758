"""A TCP proxy before a redis-server that can make one kind of command slow.

A store that answers some commands at once and others late (a Redis busy with another
client's large reads, a network that stalls one connection): ``slow_down(marker,
seconds)`` holds each command whose bytes hold ``marker`` (a script's SHA, a command's
name) that long before passing it on, and what its connection sends after it with it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


class SlowRedisProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream_port``, each connection by two threads."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._slow: tuple[bytes, float] | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
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
        thread = threading.Thread(target=self._accept, daemon=True)
        self._threads.append(thread)
        thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client = self._listener.accept()[0]
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port), timeout=5)
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for source, target, to_redis in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(
                    target=self._pipe, args=(source, target, to_redis), daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def _pipe(self, source: socket.socket, target: socket.socket, to_redis: bool) -> None:
        for _ in _until_closed(source):
            try:
                data = source.recv(65536)
            except OSError:
                break
            if not data:
                break
            if to_redis:
                self._hold_if_slow(data)
            try:
                target.sendall(data)
            except OSError:
                break
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _hold_if_slow(self, data: bytes) -> None:
        with self._lock:
            slow = self._slow
        if slow is not None and data.find(slow[0]) >= 0:
            self.held += 1
            self._stop.wait(slow[1])  # (cut short when the proxy closes)


def _until_closed(source: socket.socket) -> Iterator[None]:
    """Each read of a pipe (bounded by its socket: a closed one ends the loop)."""
    while source.fileno() != -1:
        yield
