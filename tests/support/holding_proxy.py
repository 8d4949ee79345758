"""A TCP proxy before a broker that can hold what the broker sends, then let it through.

What a network does to a stream in an outage: nothing arrives for a while, then what
was sent meanwhile arrives at once (``release()``), or in quick succession, piece by
piece as the broker sent it (``release(spread=...)``: the heartbeats of the outage
come bunched, a few milliseconds apart).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator


class HoldingProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream_port``; one client connection at a time
    is enough for these tests (each is served by its own threads)."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._holding = False
        self._held: list[tuple[socket.socket, bytes]] = []  # (to whom, a piece sent)
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HoldingProxy:
        self._spawn(self._accept)
        return self

    def hold(self) -> None:
        """From now on, keep what the broker sends instead of passing it on."""
        with self._lock:
            self._holding = True

    def held_count(self, piece: bytes) -> int:
        """How many times ``piece`` occurs in what is held."""
        with self._lock:
            return sum(data.count(piece) for _, data in self._held)

    def release(self, spread: float | None = None) -> None:
        """Pass on what was held: at once in one write, or (``spread``) each piece as the
        broker sent it, ``spread`` seconds apart. Then forward as usual again."""
        with self._lock:
            held, self._held = self._held, []
            if spread is None:
                self._send_joined(held)
            else:
                for n, (client, data) in enumerate(held):
                    if n:
                        time.sleep(spread)
                    with contextlib.suppress(OSError):
                        client.sendall(data)
            self._holding = False

    @staticmethod
    def _send_joined(held: list[tuple[socket.socket, bytes]]) -> None:
        by_client: dict[socket.socket, bytes] = {}
        for client, data in held:
            by_client[client] = by_client.get(client, b"") + data
        for client, data in by_client.items():
            with contextlib.suppress(OSError):
                client.sendall(data)

    def close(self) -> None:
        self._stop.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> HoldingProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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
            self._spawn(self._pipe, client, upstream, False)
            self._spawn(self._pipe, upstream, client, True)

    def _pipe(self, source: socket.socket, target: socket.socket, from_broker: bool) -> None:
        for _ in _until_closed(source):
            try:
                data = source.recv(65536)
            except OSError:
                break
            if not data:
                break
            with self._lock:
                if from_broker and self._holding:
                    self._held.append((target, data))
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
