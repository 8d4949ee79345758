"""A TCP proxy before a broker whose event streams can die in silence.

What a phone's NAT mapping dropped, a laptop that slept or a middlebox that timed the
flow out do to a stream: nothing passes any more, either way, and nothing is closed.
Neither end hears of it: the broker writes on into its socket, and the client, which
sends nothing on a stream, waits. Only the streams open at the moment go silent (the
page's other connections, and those it opens later, pass as usual), so that a page
that notices comes back through the same proxy.

And what a proxy or a half-dead path does to a reconnect: it takes the connection and
the request, and answers nothing, ever (``hold_next_streams``); a later connection
passes. Or it holds the answer a while and then lets it through, as a broker whose
store is slow answers late (``delay_next_streams``). ``end_streams`` closes the
streams open (a FIN), as a broker that went does, so that an ``EventSource``
reconnects by itself.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time

from tests.support.tcp_proxy import TcpProxy

STREAM_REQUEST = re.compile(rb"^GET \S*/events(\?\S*)? HTTP/1\.[01]\r\n", re.MULTILINE)


class SilencingProxy(TcpProxy):
    """Forwards 127.0.0.1:``port`` to ``upstream_port``; ``silence_streams()`` kills the
    event streams open then, without a FIN or an RST."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self._streams: set[socket.socket] = set()  # upstream sockets a stream was asked on
        self._silenced: set[socket.socket] = set()
        self._to_hold = 0  # stream requests still to be taken and never answered
        self._held: set[socket.socket] = set()  # client sockets of the streams held
        self._ended: set[socket.socket] = set()  # client sockets whose pipe to the broker ended
        self._to_delay: tuple[int, float] = (0, 0.0)  # streams still to answer late, and how late
        self._answer_at: dict[socket.socket, float] = {}  # client socket: its answer's time

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
            clients = self._clients()
            for upstream in self._streams:
                self._silenced |= {upstream, clients[upstream]}
            return len(self._streams)

    def hold_next_streams(self, count: int) -> None:
        """The next ``count`` streams asked for are taken and never answered: their
        request reaches the broker, and nothing of its answer comes back (nor is the
        connection closed). The streams asked for after them pass."""
        with self._lock:
            self._to_hold = count

    def delay_next_streams(self, count: int, seconds: float) -> None:
        """The answers of the next ``count`` streams asked for reach the client
        ``seconds`` after their request reached the broker (all that came meanwhile at
        once), as a broker answers whose store is slow; the streams after them pass."""
        with self._lock:
            self._to_delay = (count, seconds)

    def streams_asked(self) -> int:
        """How many connections a stream was asked on, so far."""
        with self._lock:
            return len(self._streams)

    def held_still_open(self) -> int:
        """How many of the streams held the client has not closed (yet)."""
        with self._lock:
            return len(self._held - self._ended)

    def end_streams(self) -> int:
        """Close the streams open now (not those silenced or held), with a FIN to the
        client: its ``EventSource`` reconnects by itself. How many there were."""
        with self._lock:
            clients = self._clients()
            ending = [
                clients[upstream]
                for upstream in self._streams
                if upstream not in self._silenced and clients[upstream] not in self._ended
            ]
        for client in ending:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        return len(ending)

    def _clients(self) -> dict[socket.socket, socket.socket]:
        """Each upstream socket's client socket (under the lock)."""
        return dict(zip(self._sockets[1::2], self._sockets[0::2], strict=True))

    def __enter__(self) -> SilencingProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _passes(self, data: bytes, target: socket.socket, upstream: bool) -> bool:
        with self._lock:
            if upstream and target not in self._silenced and STREAM_REQUEST.search(data):
                self._streams.add(target)
                if self._to_hold:
                    self._hold(target)
                    return True  # (the broker serves it: no close of its to pass on)
                self._delay(target)
            answer_at = None if upstream else self._answer_at.get(target)
            passes = target not in self._silenced
        if answer_at is not None:  # (waited out of the lock: the other pipes go on)
            time.sleep(max(answer_at - time.monotonic(), 0))
        return passes

    def _delay(self, upstream: socket.socket) -> None:
        """This stream's answer waits, if streams are to be answered late (under the lock)."""
        count, seconds = self._to_delay
        if count:
            self._to_delay = (count - 1, seconds)
            self._answer_at[self._clients()[upstream]] = time.monotonic() + seconds

    def _hold(self, upstream: socket.socket) -> None:
        """From its request on, nothing passes on this stream's connection (under the lock)."""
        self._to_hold -= 1
        client = self._clients()[upstream]
        self._held.add(client)
        self._silenced |= {upstream, client}

    def _pipe(self, source: socket.socket, target: socket.socket, upstream: bool) -> None:
        super()._pipe(source, target, upstream)
        if upstream:  # (the client's side: read until it closed, or the proxy did)
            with self._lock:
                self._ended.add(source)
