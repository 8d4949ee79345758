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
on, waits for every worker to drain, and exits 0. A worker whose application
cannot start stops the broker (exit 3, as one process) unless another serves;
while others serve, it is tried again less and less often. A dead worker's socket
is closed at once (the others take its connections) and a new one, bound for its
successor, listens only once that one serves.

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
import math
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from prometheus_client import multiprocess
from uvicorn.config import STARTUP_FAILURE

from api.lifecycle import drain_on_hangup, hangups_ignored

log = logging.getLogger(__name__)
RESTART_DELAY_SECONDS = 0.5
RESTART_DELAY_MAX_S = 30.0  # (for a worker whose every start fails while others serve)
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


def bind_reuseport(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A socket of the port's group; ``listen=False``: it joins the group (takes its
    share of connections) only once its worker's server listens, i.e. has started."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, telling the supervisor once its application has started."""

    def __init__(self, config: uvicorn.Config, started: Any) -> None:
        super().__init__(config)
        self._started = started  # a multiprocessing Event, this worker's own

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # (an application that cannot start exits here)
        self._started.set()


def run_worker(sock: socket.socket, config: dict[str, Any], supervisor: int, started: Any) -> None:
    """One worker: its own socket, one uvicorn server, exit 0 once drained."""
    # uvicorn re-raises SIGTERM after its shutdown; a no-op handler makes it a clean exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    drain_on_hangup()  # (a closed terminal hangs up the whole process group)
    _terminate_with_parent()
    if os.getppid() != supervisor:
        return  # the supervisor died before the kernel could be told: serve nothing
    _watch_parent(supervisor)
    _Server(uvicorn.Config(**config), started).run(sockets=[sock])


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


def _forget_files_of(pid: int | None) -> None:
    """A worker that never started counted nothing worth keeping, and left a file per
    metric kind: one that kept failing to start piled them up (thousands a day), and
    every scrape read them all."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if pid is not None and directory:
        for path in Path(directory).glob(f"*_{pid}.db"):
            path.unlink(missing_ok=True)


def _forget_metrics_of(pid: int | None) -> None:
    """A dead worker's live gauges (open streams) must stop counting in the sum."""
    if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class Supervisor:
    """Starts ``count`` workers, restarts any that dies, stops them all on a signal."""

    def __init__(self, count: int, host: str, port: int, config: dict[str, Any]) -> None:
        refuse_if_taken(host, port)
        first = bind_reuseport(host, port)
        # Port 0: the kernel's choice, once, for every worker (each chose its own).
        port = first.getsockname()[1]
        self._host, self._port = host, port
        self._sockets = [first, *(bind_reuseport(host, port) for _ in range(count - 1))]
        shown = f"[{host}]" if ":" in host else host
        log.info("broker: %d workers on http://%s:%d", count, shown, port)
        self._config = config
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[BaseProcess] = []
        self._count = count
        self._stopping = False
        self._exit_code = 0
        # Each worker's, set once its server has started (a new one for each spawn).
        self._started = [self._context.Event() for _ in range(count)]
        self._failures = [0] * count  # each worker's failed starts in a row
        self._restart_at: dict[int, float] = {}  # dead workers: when each starts again

    def run(self) -> int:
        """Serve until a signal (then 0), or until a worker cannot start (then uvicorn's
        startup failure, 3, as one process would)."""
        hangup = () if hangups_ignored() else (signal.SIGHUP,)  # (nohup: ignored still)
        for sig in (signal.SIGTERM, signal.SIGINT, *hangup):  # (HUP: nothing to reload)
            signal.signal(sig, self._stop)
        self._workers = [self._spawn(index) for index in range(self._count)]
        while not self._stopping:
            alive = [w.sentinel for w in self._workers if w.exitcode is None]
            wait(alive, timeout=RESTART_DELAY_SECONDS)
            self._replace_dead_workers()
        self._drain()
        return self._exit_code

    def _spawn(self, index: int) -> BaseProcess:
        if self._sockets[index].fileno() == -1:  # (closed while its worker was down)
            # Not listening until the worker's server does: connections meanwhile go to
            # the workers that serve, not into a backlog that a failed start resets.
            self._sockets[index] = bind_reuseport(self._host, self._port, listen=False)
        self._started[index] = self._context.Event()
        args = (self._sockets[index], self._config, os.getpid(), self._started[index])
        process = self._context.Process(target=run_worker, args=args, daemon=False)
        process.start()
        return process

    def _replace_dead_workers(self) -> None:
        now = time.monotonic()
        for index, worker in enumerate(self._workers):
            if self._stopping:
                return
            if worker.exitcode is not None and index not in self._restart_at:
                self._schedule_restart(index, worker, now)
            if self._restart_at.get(index, math.inf) <= now:
                del self._restart_at[index]
                self._workers[index] = self._spawn(index)

    def _schedule_restart(self, index: int, worker: BaseProcess, now: float) -> None:
        failed_start = worker.exitcode == STARTUP_FAILURE
        if failed_start:
            _forget_files_of(worker.pid)
        if failed_start and not self._others_serve(index):
            # No other worker serves (none could start: a setting, a Redis that may
            # evict, a right missing): each one more would fail alike, twice a second,
            # for good, and the port would be free (seen: the broker never stopped, never
            # served). Stop, as one process does.
            log.error("worker %s could not start; stopping the broker", worker.pid)
            self._stopping, self._exit_code = True, STARTUP_FAILURE
            return
        # Others serve: a worker that cannot start now (Redis failing over) is tried
        # again, less and less often, rather than the broker stopped with it. Its socket
        # would take connections (the kernel spreads them over every socket of the
        # port) that nobody answers until one starts, then resets them if it fails:
        # closed now, the others take them all, and a new one is bound for the worker.
        self._failures[index] = self._failures[index] + 1 if failed_start else 0
        delay = min(RESTART_DELAY_SECONDS * 2 ** self._failures[index], RESTART_DELAY_MAX_S)
        self._sockets[index].close()
        log.warning(
            "worker %s exited with %s; starting another in %.1f s",
            worker.pid,
            worker.exitcode,
            delay,
        )
        _forget_metrics_of(worker.pid)
        self._restart_at[index] = now + delay

    def _others_serve(self, index: int) -> bool:
        return any(
            other != index and worker.exitcode is None and self._started[other].is_set()
            for other, worker in enumerate(self._workers)
        )

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            log.warning("SIGHUP: draining the workers and stopping, as on SIGTERM")
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
