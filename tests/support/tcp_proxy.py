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
        """Stop accepting, end every pipe, and wait for their threads. A socket is shut
        down before it is closed: closing alone does not wake a thread blocked reading it
        (Linux), and each such thread held close() for its 5 s join, for nothing: a test
        that closed its proxy a moment after its broker, before the pipes saw the broker
        go, waited 25-50 s on a loaded machine."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        if self._threads:  # (started) the first accepts: over, no pipe comes after it
            self._threads[0].join(timeout=5)  # (its accept times out each 0.1 s)
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in self._sockets:
            sock.close()

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
