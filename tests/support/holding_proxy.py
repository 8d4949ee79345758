"""A TCP proxy before a broker that can hold what the broker sends, then let it through.

What a network does to a stream in an outage: nothing arrives for a while, then what
was sent meanwhile arrives at once (``release()``), or in quick succession, piece by
piece as the broker sent it (``release(spread=...)``: the heartbeats of the outage
come bunched, a few milliseconds apart).
"""

from __future__ import annotations

import contextlib
import socket
import time

from tests.support.tcp_proxy import TcpProxy


class HoldingProxy(TcpProxy):
    """Forwards 127.0.0.1:``port`` to ``upstream_port``; one client connection at a time
    is enough for these tests (each is served by its own threads)."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self._holding = False
        self._held: list[tuple[socket.socket, bytes]] = []  # (to whom, a piece sent)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HoldingProxy:
        super().start()
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

    def __enter__(self) -> HoldingProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _passes(self, data: bytes, target: socket.socket, upstream: bool) -> bool:
        with self._lock:
            if not upstream and self._holding:
                self._held.append((target, data))
                return False
        return True
