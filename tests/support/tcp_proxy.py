"""A TCP proxy on 127.0.0.1 before a server, each connection piped by two threads.

The suite's proxies (``holding_proxy``, ``slow_redis_proxy``) differ only in what they do
with a piece on its way: each says so in ``_passes``; accepting, piping and closing are
here once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from tests.support.redis_server import free_port


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream_port``."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        # (a port of the run's TEST_PORT_RANGE, when one is set: the machine is shared)
        self._listener = socket.create_server(("127.0.0.1", free_port()))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self.connections = 0

    def start(self) -> TcpProxy:
        self._spawn(self._accept)
        return self

    def close(self) -> None:
        self._stop.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _passes(self, data: bytes, target: socket.socket, upstream: bool) -> bool:
        """Whether ``data`` (sent to the server if ``upstream``, else from it to
        ``target``) goes on now: a proxy may hold it (and return later) or keep it."""
        return True

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client = self._listener.accept()[0]
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port), timeout=5)
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            self.connections += 1
            self._spawn(self._pipe, client, upstream, True)
            self._spawn(self._pipe, upstream, client, False)

    def _pipe(self, source: socket.socket, target: socket.socket, upstream: bool) -> None:
        for _ in _until_closed(source):
            try:
                data = source.recv(65536)
            except OSError:
                break
            if not data:
                break
            if not self._passes(data, target, upstream):
                continue
            try:
                target.sendall(data)
            except OSError:
                break
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _until_closed(source: socket.socket) -> Iterator[None]:
    """Each read of a pipe (bounded by its socket: a closed one ends the loop)."""
    while source.fileno() != -1:
        yield
