"""Several worker processes, each with its own listening socket (SO_REUSEPORT).

uvicorn's own ``--workers`` share one listening socket, and the kernel hands
most new connections to whichever worker wakes first: the benchmark measured
10:5 and 12:3 splits of keep-alive connections over two workers, so one worker
capped the publish rate. With a socket per worker bound with SO_REUSEPORT, the
kernel spreads connections over the workers evenly (by a hash of each one).

The supervisor binds every worker's socket before any worker starts (a client
that connects while a worker is still importing waits in that socket's backlog,
rather than all early connections going to the first worker up), restarts a
worker that dies on the same socket, and on SIGTERM/SIGINT passes the signal
on, waits for every worker to drain, and exits 0.

A worker never outlives its supervisor: a supervisor killed with SIGKILL runs
no handler, and its orphaned workers would keep serving the port beside the
next broker started there (SO_REUSEPORT lets both bind it), with the old code.
So each worker asks the kernel for SIGTERM when its parent dies (Linux
``PR_SET_PDEATHSIG``) and also watches its parent pid, once a second, where
that is unavailable; either way it drains as on any SIGTERM and exits.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import uvicorn
from prometheus_client import multiprocess
from uvicorn.config import STARTUP_FAILURE

log = logging.getLogger(__name__)
RESTART_DELAY_SECONDS = 0.5
# How often a worker checks that its supervisor is still its parent.
PARENT_CHECK_SECONDS = 1.0
DRAIN_MARGIN_SECONDS = 5.0
"""On a stop, the workers get their own grace (BROKER_SHUTDOWN_GRACE_SECONDS) and this
much more, all together, before they are killed."""
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class PortTaken(Exception):
    """Another process listens on the port: SO_REUSEPORT would have joined it silently."""


def refuse_if_taken(host: str, port: int) -> None:
    """Bind the port once without SO_REUSEPORT: a second ``--workers N`` broker on a
    port already served (a double start, an overlapping restart) joined the first
    one's listeners with no error, and clients were split between the two."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (not TIME_WAIT's)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise PortTaken(f"{host}:{port} is in use: {error.strerror}") from error


def bind_reuseport(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_worker(sock: socket.socket, config: dict[str, Any], supervisor: int) -> None:
    """One worker: its own socket, one uvicorn server, exit 0 once drained."""
    # uvicorn re-raises SIGTERM after its shutdown; a no-op handler makes it a clean exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    _terminate_with_parent()
    if os.getppid() != supervisor:
        return  # the supervisor died before the kernel could be told: serve nothing
    _watch_parent(supervisor)
    uvicorn.Server(uvicorn.Config(**config)).run(sockets=[sock])


def _terminate_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent dies; elsewhere the watch thread does it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):  # not Linux, or no prctl in this libc
        log.info("no PR_SET_PDEATHSIG here; watching the supervisor's pid instead")


def _watch_parent(supervisor: int) -> None:
    """SIGTERM this worker, once a second, from the moment its supervisor is gone.

    Repeated because a SIGTERM that lands before uvicorn installs its own handler
    meets the no-op one above; uvicorn takes every later SIGTERM as "drain".
    """

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(PARENT_CHECK_SECONDS)
        log.warning("supervisor %d is gone; worker %d drains", supervisor, os.getpid())
        while True:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(PARENT_CHECK_SECONDS)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def _forget_metrics_of(pid: int | None) -> None:
    """A dead worker's live gauges (open streams) must stop counting in the sum."""
    if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class Supervisor:
    """Starts ``count`` workers, restarts any that dies, stops them all on a signal."""

    def __init__(self, count: int, host: str, port: int, config: dict[str, Any]) -> None:
        refuse_if_taken(host, port)
        self._sockets = [bind_reuseport(host, port) for _ in range(count)]
        self._config = config
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[BaseProcess] = []
        self._count = count
        self._stopping = False
        self._exit_code = 0

    def run(self) -> int:
        """Serve until a signal (then 0), or until a worker cannot start (then uvicorn's
        startup failure, 3, as one process would)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        self._workers = [self._spawn(index) for index in range(self._count)]
        while not self._stopping:
            wait([w.sentinel for w in self._workers], timeout=1.0)
            self._replace_dead_workers()
        self._drain()
        return self._exit_code

    def _spawn(self, index: int) -> BaseProcess:
        args = (self._sockets[index], self._config, os.getpid())
        process = self._context.Process(target=run_worker, args=args, daemon=False)
        process.start()
        return process

    def _replace_dead_workers(self) -> None:
        for index, worker in enumerate(self._workers):
            if worker.exitcode == STARTUP_FAILURE and not self._stopping:
                # Its application could not start (a setting, a Redis that may evict):
                # another would fail alike, twice a second, for good (seen with a Redis
                # refused at start: the broker never stopped, never served).
                log.error("worker %s could not start; stopping the broker", worker.pid)
                self._stopping, self._exit_code = True, STARTUP_FAILURE
            if worker.exitcode is not None and not self._stopping:
                log.warning(
                    "worker %s exited with %s; starting another", worker.pid, worker.exitcode
                )
                _forget_metrics_of(worker.pid)
                time.sleep(RESTART_DELAY_SECONDS)
                self._workers[index] = self._spawn(index)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _drain(self) -> None:
        # Our copies of the listening sockets first: a worker that drains closes its
        # own, but while ours stay open the kernel goes on accepting connections into
        # them, which nobody reads, and resets them when we exit (a publish a proxy
        # had sent there got 502, not a refused connect it retries elsewhere).
        for listener in self._sockets:
            listener.close()
        for worker in self._workers:
            if worker.exitcode is None:
                worker.terminate()  # SIGTERM: the worker ends its streams and exits
        grace = float(self._config.get("timeout_graceful_shutdown") or 0) + DRAIN_MARGIN_SECONDS
        deadline = time.monotonic() + grace  # (for all together: not one after another)
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.exitcode is None:
                worker.kill()
                worker.join()
            _forget_metrics_of(worker.pid)
