"""`--floor`: the least a Python server can spend on a publish, measured beside the broker.

The same stack as the broker's edge (uvloop, httptools, 2 worker processes on one
SO_REUSEPORT port) doing the least a publish needs: parse the request, send one
``XADD`` to Redis, answer 201 when Redis confirms. No validation, no routing, no
idempotency, no metrics. Its server CPU per publish in `publish-single`, beside the
broker's in the same run, tells how much of the broker's cost is the runtime
(CPython, uvloop, the sockets) and how much is the broker's own work per request.
In the JSON under the target `floor`; run as ``python -m bench.floor PORT REDIS_PORT``.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import hiredis
import httptools
import uvloop

from bench.servers import HOST, WORKERS, Target

SCENARIOS = frozenset({"publish-single"})
"""What the floor runs: it only publishes."""

_BODY = b'{"id":"1-0"}'
CREATED = (
    b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    % (
        len(_BODY),
        _BODY,
    )
)
READY = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@dataclass(frozen=True)
class FloorTarget(Target):
    def command(self, port: int, redis_url: str) -> list[str]:
        redis_port = urlsplit(redis_url).port or 6379
        return [sys.executable, "-m", "bench.floor", str(port), str(redis_port)]


FLOOR = FloorTarget("floor", "floor (uvloop + httptools, one XADD a publish)")


class RedisLink(asyncio.Protocol):
    """One connection to Redis; replies come back in order, each to its waiter."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiting: collections.deque[Callable[[], None]] = collections.deque()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while self._reader.gets() is not False:
            self._waiting.popleft()()

    def xadd(self, data: bytes, done: Callable[[], None]) -> None:
        assert self._transport is not None
        self._waiting.append(done)
        self._transport.write(hiredis.pack_command((b"XADD", b"floor", b"*", b"d", data)))


class PublishProtocol(asyncio.Protocol):
    """Any POST is stored (its body, as one XADD) and answered 201; any other request 200."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self._parser = httptools.HttpRequestParser(self)
        self._body = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        assert self._transport is not None
        body, self._body = bytes(self._body), bytearray()
        if self._parser.get_method() == b"POST":
            self._link.xadd(body, self._created)
        else:
            self._transport.write(READY)

    def _created(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(CREATED)


async def _serve(sock: socket.socket, redis_port: int) -> None:
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(RedisLink, HOST, redis_port)
    server = await loop.create_server(lambda: PublishProtocol(link), sock=sock)
    await server.serve_forever()


def _worker(port: int, redis_port: int) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((HOST, port))
    sock.listen(1024)
    uvloop.run(_serve(sock, redis_port))


def main() -> None:
    port, redis_port = int(sys.argv[1]), int(sys.argv[2])
    workers = [
        multiprocessing.Process(target=_worker, args=(port, redis_port)) for _ in range(WORKERS)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main()
