"""`python -m bench.publishing`: what one single-event POST costs a broker process.

The ``sessions`` bench's POST producer sends one ``{"data": "<token>"}`` per request on a
keep-alive connection, topic after topic, waiting for each answer. This measures that
request alone, reproducibly (no subscriber, so no delivery):

- a private redis-server and one broker process (``broker serve``, one worker) on the
  ports given (``--port``: Redis there, the broker on the next), with ``--jwt`` a
  ``BROKER_JWT_SECRET`` and every request carrying a bearer token, as deployments do;
- ``--connections`` keep-alive connections (raw sockets: a client's cost is not the
  broker's), each posting, then waiting for its answer, then posting again, each
  POST to the next of ``--topics`` topics; a round is one POST on every connection.

Measured over ``--rounds`` rounds after ``--warmup``: ``--callgrind`` runs the broker
under ``valgrind --tool=callgrind`` with its instrumentation switched on only for the
window (``bench.delivery``'s way): instructions per POST, user space only, which a
machine shared with other work does not move; the broker's CPU per POST (from /proc)
is given beside it, which it does. ``--broker-path`` (repeatable): the code the broker
runs, e.g. a git worktree of the base, so builds alternate against one driver:

``python -m bench.publishing --callgrind --runs 2 --broker-path /tmp/base --broker-path .``
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time
from pathlib import Path

import jwt

from bench.delivery import add_run_options, alternate, callgrind_control, counted_run, cpu_seconds

JWT_SECRET = "bench-publishing-secret-of-32-bytes-at-least"
ANSWER_END = b"\r\n\r\n"


def bearer_token() -> str:
    claims = {"exp": int(time.time()) + 86400, "broker": {"publish": ["*"]}}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def post_of(port: int, topic: str, token: str | None) -> bytes:
    """One POST as the sessions bench's producer (httpx) sends it, give or take a header."""
    body = b'{"data": "tok"}'
    auth = f"authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST /topics/{topic}/events HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        "accept: */*\r\naccept-encoding: gzip, deflate\r\nconnection: keep-alive\r\n"
        f"user-agent: python-httpx/0.28.1\r\n{auth}content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Producer(asyncio.Protocol):
    """A keep-alive connection that posts, waits for the answer (whole: its
    content-length read), and counts the 201s."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.created = 0
        self._buffer = b""
        self._answered: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(ANSWER_END)
        if end < 0 or self._answered is None:
            return
        head = self._buffer[:end].lower()
        at = head.find(b"content-length: ")
        size = int(head[at + 16 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
        whole = end + len(ANSWER_END) + size
        if len(self._buffer) >= whole:
            answer, self._buffer = self._buffer[:whole], self._buffer[whole:]
            self._answered.set_result(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._answered is not None and not self._answered.done():
            self._answered.set_exception(ConnectionError("the broker closed the connection"))

    async def post(self, request: bytes) -> None:
        assert self.transport is not None
        self._answered = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        answer = await self._answered
        if not answer.startswith(b"HTTP/1.1 201"):
            raise RuntimeError(f"not created: {answer[:600]!r}")
        self.created += 1


async def connect(port: int, count: int) -> list[Producer]:
    loop = asyncio.get_running_loop()
    producers = []
    for _ in range(count):
        _, producer = await loop.create_connection(Producer, "127.0.0.1", port)
        producers.append(producer)
    return producers


async def post_rounds(
    producers: list[Producer], requests: list[bytes], first: int, rounds: int
) -> None:
    """``rounds`` rounds: every producer posts its next request (topic) each round."""
    for number in range(first, first + rounds):
        await asyncio.gather(
            *(
                producer.post(requests[(number * len(producers) + i) % len(requests)])
                for i, producer in enumerate(producers)
            )
        )


async def drive(port: int, args: argparse.Namespace, pid: int) -> dict[str, float]:
    token = bearer_token() if args.jwt else None
    requests = [post_of(port, f"publish-{i}", token) for i in range(args.topics)]
    producers = await connect(port, args.connections)
    try:
        await post_rounds(producers, requests, 0, args.warmup)
        before = cpu_seconds(pid)
        if args.callgrind:
            callgrind_control(pid, "--instr=on")
        await post_rounds(producers, requests, args.warmup, args.rounds)
        if args.callgrind:
            callgrind_control(pid, "--dump=window")
            callgrind_control(pid, "--instr=off")
        cpu = cpu_seconds(pid) - before
    finally:
        for producer in producers:
            if producer.transport is not None:
                producer.transport.close()
    posts = args.rounds * args.connections
    assert sum(p.created for p in producers) == (args.warmup + args.rounds) * args.connections
    return {"posts": posts, "cpu_us_per_post": cpu * 1e6 / posts}


def run_once(code: Path, args: argparse.Namespace) -> dict[str, float]:
    async def window(redis_url: str, broker: subprocess.Popen[bytes]) -> dict[str, float]:
        return await drive(args.port + 1, args, broker.pid)

    settings = {"BROKER_JWT_SECRET": JWT_SECRET} if args.jwt else {}
    return counted_run(code, args, window, "post", settings)


def parser() -> argparse.ArgumentParser:
    """This driver's options (``bench.ingest_line`` runs it with their defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=47950, help="Redis; the broker the next")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--topics", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--jwt", action="store_true", help="a JWT secret; each POST a token")
    add_run_options(parser, py_spy=False)
    return parser


def main() -> None:
    args = parser().parse_args()
    alternate(args, lambda code: run_once(code, args), " jwt" if args.jwt else "")


if __name__ == "__main__":
    main()
