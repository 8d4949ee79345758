"""Upstreams for the retry tests: one that hangs up unanswered, one that answers.

A broker that drains closes the connections it had accepted but not yet read a
request from; the load balancer has sent a request there and gets no answer.
`RecordingUpstream(answers=False)` plays that broker: it closes every request's
connection without a byte of answer, either reading nothing of it (`reads="nothing"`:
the request stays unread in the socket, so the kernel resets the connection) or
after reading its head (`reads="head"`: a plain close). `answers=True` is the
healthy broker beside it: 200 to a GET, 201 to a POST. Both answer HAProxy's
health checks (Host `haproxy-check`), so the closing one stays "up", as a broker
does in the moment before the load balancer sees it drain; those checks are not
recorded. Every request is recorded as `(method, path)` before it is dropped or
answered, so a test sees exactly who got what.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from typing import Literal

HEAD_END = b"\r\n\r\n"
HEALTH_CHECK_HOST = b"host: haproxy-check"
HEAD_WAIT_SECONDS = 2.0
HEAD_LIMIT_BYTES = 16 * 1024
Reads = Literal["nothing", "head"]


class RecordingUpstream:
    """A loopback HTTP upstream that records each request and answers it or hangs up."""

    def __init__(self, *, answers: bool, reads: Reads = "head") -> None:
        self.answers = answers
        self.reads = reads
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = _Server(self)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def seen(self, method: str) -> int:
        """How many requests of `method` reached this upstream."""
        with self._lock:
            return sum(1 for seen_method, _ in self.requests if seen_method == method)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: RecordingUpstream) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream


class _Handler(socketserver.BaseRequestHandler):
    request: socket.socket
    server: _Server

    def handle(self) -> None:
        upstream = self.server.upstream
        head = peek_head(self.request)
        if not head:
            return  # a peer that connected and sent nothing (or too slowly): just close
        if HEALTH_CHECK_HOST in head.lower():
            consume(self.request, len(head))
            self.request.sendall(reply(200, b"text/plain", b"ok"))
            return
        method, path = head.split(b" ", 2)[:2]
        upstream.record(method.decode(), path.decode())
        if upstream.answers:
            consume(self.request, len(head) + content_length(head))
            self.request.sendall(answer_to(method))
        elif upstream.reads == "head":
            consume(self.request, len(head))
        # Leaving here closes the connection: unanswered.


def peek_head(sock: socket.socket) -> bytes:
    """The request head (through the blank line) without taking it off the socket.

    Peeking lets the `reads="nothing"` upstream tell a request from a health check
    and still close with the request unread. Returns b"" if no head arrives in
    HEAD_WAIT_SECONDS or the peer closes first.
    """
    deadline = time.monotonic() + HEAD_WAIT_SECONDS
    sock.settimeout(HEAD_WAIT_SECONDS)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(HEAD_LIMIT_BYTES, socket.MSG_PEEK)
        except OSError:
            return b""
        if not data:
            return b""
        if HEAD_END in data:
            return data[: data.index(HEAD_END) + len(HEAD_END)]
        time.sleep(0.01)  # part of a head: peeking again at once would spin
    return b""


def consume(sock: socket.socket, size: int) -> None:
    """Read `size` bytes off the socket (less if the peer closes first)."""
    remaining = size
    while remaining > 0:
        data = sock.recv(min(remaining, 65536))
        if not data:
            return
        remaining -= len(data)


def content_length(head: bytes) -> int:
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def answer_to(method: bytes) -> bytes:
    if method == b"POST":
        return reply(201, b"application/json", b'{"id": "1-1"}')
    return reply(200, b"text/event-stream", b"id: 1\ndata: served\n\n")


def reply(status: int, content_type: bytes, body: bytes) -> bytes:
    reason = {200: b"OK", 201: b"Created"}[status]
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (status, reason, content_type, len(body), body)
    )
