"""Real nginx and HAProxy processes for tests, and a stand-in broker to put behind them.

The load balancers run the configs that `deploy.render` derives from the shipped
files. Every wait here is bounded in time; a balancer that does not come up
fails the test with its own log.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

import pytest

from deploy.render import render_haproxy, render_nginx
from tests.support.redis_server import free_port

Balancer = Literal["nginx", "haproxy"]
INSTALL_HINT = "run `apt-get install nginx haproxy` (or `make deploy-check`, which installs them)"
STREAM_HOLD_SECONDS = 10.0
# How much a stand-in writes to a subscriber that never reads, and how long one
# write may block before it counts as backpressure.
FLOOD_LIMIT_BYTES = 256 * 1024 * 1024
FLOOD_STALL_SECONDS = 1.0
FIRST_EVENT_DELAY_SECONDS = 0.3


def balancer_binary(name: Balancer) -> str:
    """The path of nginx or haproxy; fails the test (never skips) when it is missing."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}", pytrace=False)
    return found


def wait_until_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Block until the process accepts connections on the port; fail with its log if not."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode}:\n{read_log(log)}", pytrace=False)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"nothing listening on 127.0.0.1:{port} after 10 s:\n{read_log(log)}")


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def balancer_command(kind: Balancer, port: int, upstreams: Sequence[int], work: Path) -> list[str]:
    """The command line that runs the rendered config of `kind` in the foreground."""
    if kind == "nginx":
        conf = render_nginx(port, upstreams, work)
        return [balancer_binary("nginx"), "-c", str(conf), "-p", str(work)]
    return [balancer_binary("haproxy"), "-f", str(render_haproxy(port, upstreams, work))]


@contextmanager
def running_balancer(kind: Balancer, upstreams: Sequence[int], work: Path) -> Iterator[int]:
    """Run nginx or HAProxy in front of the upstream ports; yields the port it listens on."""
    port = free_port()
    log = work / f"{kind}.out"
    with log.open("wb") as out:
        process = subprocess.Popen(
            balancer_command(kind, port, upstreams, work), stdout=out, stderr=subprocess.STDOUT
        )
        try:
            wait_until_listening(port, process, log)
            yield port
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM is a fast stop for both nginx and HAProxy; SIGKILL if it lingers."""
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


class StandInBroker:
    """A stdlib HTTP server playing a broker, on a free loopback port.

    `GET /healthz` answers 200; `GET /readyz` answers 200 while `ready` is set and
    503 otherwise (a broker that drains), counting those 503s in
    `unready_checks`. `port` binds a given port (a broker restarted where it
    was); streams begun are counted in `streams`. `GET /flood` writes events until a
    write blocks for FLOOD_STALL_SECONDS, counting the bytes. Any other GET is an
    SSE stream: a comment echoing the Last-Event-ID it received, a moment later
    one event, then it holds the response open until `release` is set (or
    STREAM_HOLD_SECONDS pass), writes a last event and ends. It deliberately sends
    no `X-Accel-Buffering` header, so a stream that flows proves the proxy's own
    settings. A POST is counted and its connection dropped without an answer, as
    a broker dying mid-request would.
    """

    def __init__(self, port: int = 0) -> None:
        self.ready = threading.Event()
        self.ready.set()
        self.unready_checks = 0
        self.streams = 0
        self.release = threading.Event()
        self.finished = threading.Event()
        self.flooded = threading.Event()
        self.flood_bytes = 0
        self.posts = 0
        self._lock = threading.Lock()
        self._server = _StandInServer(self, port)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StandInBroker:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def count_post(self) -> None:
        with self._lock:
            self.posts += 1

    def count_unready_check(self) -> None:
        with self._lock:
            self.unready_checks += 1

    def count_stream(self) -> None:
        with self._lock:
            self.streams += 1


class _StandInServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, broker: StandInBroker, port: int) -> None:
        super().__init__(("127.0.0.1", port), _StandInHandler)
        self.broker = broker

    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet about peers that hang up (HAProxy resets a check once it has the status)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class _StandInHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _StandInServer

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests read what they need from the StandInBroker's fields."""

    def do_GET(self) -> None:
        if self.path.partition("?")[0] == "/healthz":
            self._send_small(b"ok")
        elif self.path == "/readyz":
            if self.server.broker.ready.is_set():
                self._send_small(b"ok")
            else:
                self.server.broker.count_unready_check()
                self._send_small(b"draining", status=503)
        elif self.path.startswith("/flood"):
            self._flood()
        else:
            self._stream()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.broker.count_post()
        self.close_connection = True

    def _send_small(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Broker-Heartbeat", "15")  # (the broker's: how long it may be silent)
        self.send_header("Transfer-Encoding", "chunked")
        # Said, since the stream's connection closes after it: unsaid, a proxy kept it
        # for the next request, which found it closed and, with the other broker of
        # the test dead, got a 502 (a CI rehearsal under load).
        self.send_header("Connection", "close")
        self.end_headers()

    def _stream(self) -> None:
        broker = self.server.broker
        broker.count_stream()
        self._start_stream()
        last_event_id = self.headers.get("Last-Event-ID", "")
        self._chunk(f": last-event-id={last_event_id}\n\n".encode())
        # A proxy forwards the bytes read together with the header even when it
        # buffers; the first event comes in a later read, as a live event would.
        time.sleep(FIRST_EVENT_DELAY_SECONDS)
        self._chunk(b"id: 1\ndata: first\n\n")
        broker.release.wait(timeout=STREAM_HOLD_SECONDS)
        self._chunk(b"id: 2\ndata: last\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        broker.finished.set()
        self.close_connection = True

    def _flood(self) -> None:
        """Write events until a write blocks (backpressure) or the limit is reached."""
        broker = self.server.broker
        self._start_stream()
        frame = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
        self.connection.settimeout(FLOOD_STALL_SECONDS)
        try:
            while broker.flood_bytes < FLOOD_LIMIT_BYTES:
                self._chunk(frame)
                broker.flood_bytes += len(frame)
        except OSError:
            pass  # blocked: the proxy passed the client's backpressure on
        finally:
            broker.flooded.set()
            self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def read_until(sock: socket.socket, marker: bytes, timeout: float) -> bytes:
    """Read from the socket until `marker` arrives or `timeout` passes; returns what came."""
    received = b""
    deadline = time.monotonic() + timeout
    while marker not in received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        if not data:
            break
        received += data
    return received


def request(
    port: int, head: str, body: bytes = b"", *, until: bytes = b"\x00", timeout: float = 5.0
) -> bytes:
    """Send a raw HTTP/1.1 request (`head` without Host or the blank line); return the reply.

    Reads until the connection closes, or until `until` arrives when it is given.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"{head}\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode() + body)
        return read_until(sock, until, timeout)


def status_of(reply: bytes) -> int:
    """The status code of a raw HTTP reply (0 when there is none)."""
    parts = reply.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
