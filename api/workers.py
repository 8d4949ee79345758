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
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger(__name__)
RESTART_DELAY_SECONDS = 0.5


def bind_reuseport(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_worker(sock: socket.socket, config: dict[str, Any]) -> None:
    """One worker: its own socket, one uvicorn server, exit 0 once drained."""
    # uvicorn re-raises SIGTERM after its shutdown; a no-op handler makes it a clean exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(uvicorn.Config(**config)).run(sockets=[sock])


class Supervisor:
    """Starts ``count`` workers, restarts any that dies, stops them all on a signal."""

    def __init__(self, count: int, host: str, port: int, config: dict[str, Any]) -> None:
        self._sockets = [bind_reuseport(host, port) for _ in range(count)]
        self._config = config
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[BaseProcess] = []
        self._count = count
        self._stopping = False

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        self._workers = [self._spawn(index) for index in range(self._count)]
        while not self._stopping:
            wait([w.sentinel for w in self._workers], timeout=1.0)
            self._replace_dead_workers()
        self._drain()

    def _spawn(self, index: int) -> BaseProcess:
        args = (self._sockets[index], self._config)
        process = self._context.Process(target=run_worker, args=args, daemon=False)
        process.start()
        return process

    def _replace_dead_workers(self) -> None:
        for index, worker in enumerate(self._workers):
            if worker.exitcode is not None and not self._stopping:
                log.warning(
                    "worker %s exited with %s; starting another", worker.pid, worker.exitcode
                )
                time.sleep(RESTART_DELAY_SECONDS)
                self._workers[index] = self._spawn(index)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _drain(self) -> None:
        for worker in self._workers:
            if worker.exitcode is None:
                worker.terminate()  # SIGTERM: the worker ends its streams and exits
        for worker in self._workers:
            worker.join(timeout=30)
            if worker.exitcode is None:
                worker.kill()
                worker.join()
