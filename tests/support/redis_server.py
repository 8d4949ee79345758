"""Real redis-server processes for the suite: started on free loopback ports, stopped after.

The suite never depends on a Redis that is already running. Each server gets its
own directory (for AOF files), so a test can stop one and start it again with its
data (AOF on) or without it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
INSTALL_HINT = (
    "redis-server is missing: run `make test` (it installs it) or `apt-get install redis-server`"
)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1, and never handed out before
    in this run: the kernel may offer a port again once its socket is closed, and two
    servers of one test given the same port had one answer for both (seen in e2e).
    With ``TEST_PORT_RANGE=first-last`` set, only a port of that range (a machine
    shared by several runs, each given its own); under pytest-xdist, only this
    worker's slice of it."""
    ports = os.environ.get("TEST_PORT_RANGE")
    if ports:
        return _free_port_in(ports)
    for _ in range(10_000):  # bounded: the kernel has some 28,000 ephemeral ports
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no port not handed out before, after 10,000 tries ({len(_HANDED_OUT)})")


def _free_port_in(ports: str) -> int:
    first, _, last = ports.partition("-")
    for port in _this_workers_share(int(first), int(last or first)):
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no port left in TEST_PORT_RANGE={ports} ({len(_HANDED_OUT)} handed out)")


def _this_workers_share(first: int, last: int) -> range:
    """The range, or this pytest-xdist worker's slice of it: each worker is a process
    with its own record of the ports handed out, and scanning the whole range from its
    first port, two were handed the same one (their servers collided)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1...
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or workers <= 1:
        return range(first, last + 1)
    size = (last - first + 1) // workers
    if size == 0:
        raise RuntimeError(f"TEST_PORT_RANGE {first}-{last}: fewer ports than {workers} workers")
    start = first + int(worker.removeprefix("gw")) * size
    return range(start, start + size)


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on the port, or raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def redis_ping(port: int, timeout: float = 10.0) -> None:
    """Block until the server answers PING (it may accept connections while loading)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"redis on port {port} did not answer PING in {timeout}s")


@dataclass
class RedisServer:
    """One redis-server process on 127.0.0.1; `appendonly` keeps its data across restarts."""

    appendonly: bool = True
    port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="redis-")))
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if not Path(REDIS_SERVER).exists():
            raise RuntimeError(INSTALL_HINT)
        args = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--protected-mode", "no",
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.directory
        )
        redis_ping(self.port)
        return self

    def stop(self, *, kill: bool = False) -> None:
        """Stop the process: SIGTERM lets it flush its AOF; SIGKILL is a crash."""
        if self.process is None:
            return
        if kill:
            self.process.kill()
            self.process.wait(timeout=10)
        else:
            # Redis refuses a SIGTERM while it writes its first AOF after a sync
            # ("Writing initial AOF, can't exit"): ask again until it goes.
            deadline = time.monotonic() + 10
            while self.process.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis on port {self.port} did not stop")
                self.process.terminate()
                try:
                    self.process.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
        self.process = None

    def wipe(self) -> None:
        """Forget the data on disk, as a server restarted without its volume would."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)

    def restart(self, *, keep_data: bool = True) -> None:
        self.stop()
        if not keep_data:
            self.wipe()
        self.start()

    def close(self) -> None:
        self.stop(kill=True)
        shutil.rmtree(self.directory, ignore_errors=True)
