"""A TCP proxy before a broker whose event streams can die in silence.

What a phone's NAT mapping dropped, a laptop that slept or a middlebox that timed the
flow out do to a stream: nothing passes any more, either way, and nothing is closed.
Neither end hears of it: the broker writes on into its socket, and the client, which
sends nothing on a stream, waits. Only the streams open at the moment go silent (the
page's other connections, and those it opens later, pass as usual), so that a page
that notices comes back through the same proxy.
"""

from __future__ import annotations

import re
import socket

from tests.support.tcp_proxy import TcpProxy

STREAM_REQUEST = re.compile(rb"^GET \S*/events(\?\S*)? HTTP/1\.[01]\r\n", re.MULTILINE)


class SilencingProxy(TcpProxy):
    """Forwards 127.0.0.1:``port`` to ``upstream_port``; ``silence_streams()`` kills the
    event streams open then, without a FIN or an RST."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self._streams: set[socket.socket] = set()  # upstream sockets a stream was asked on
        self._silenced: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SilencingProxy:
        super().start()
        return self

    def silence_streams(self) -> int:
        """From now on, nothing passes on the connections a stream was asked on so far:
        what either side sends there is dropped. How many there were."""
        with self._lock:
            clients = dict(zip(self._sockets[1::2], self._sockets[0::2], strict=True))
            for upstream in self._streams:
                self._silenced |= {upstream, clients[upstream]}
            return len(self._streams)

    def __enter__(self) -> SilencingProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _passes(self, data: bytes, target: socket.socket, upstream: bool) -> bool:
        with self._lock:
            if upstream and target not in self._silenced and STREAM_REQUEST.search(data):
                self._streams.add(target)
            return target not in self._silenced
