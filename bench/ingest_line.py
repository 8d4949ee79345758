"""`python -m bench.ingest_line`: what one line of a streaming ingest costs a broker process.

The ``sessions`` bench's ingest producer sends a token stream as one chunked
``application/x-ndjson`` POST, a line (``{"data": {"n": .., "t": ..}}``) a chunk, paced.
This measures such a line alone, reproducibly (no subscriber, so no delivery):

- a private redis-server and one broker process (``broker serve``, one worker) on the
  ports given (``--port``: Redis there, the broker on the next), as ``bench.publishing``;
- ``--ingests`` streaming ingests at once, each on its own topic and connection (raw
  sockets: a client's cost is not the broker's), ``--keyed`` of them with an
  ``Idempotency-Key`` (a record per line), the others keyless;
- rounds of one line on every ingest, each line its own chunk and write (its own TCP
  segment, as a token stream's); a round ends once Redis holds every line of it (the
  driver polls the logs' lengths: Redis' work, not the broker's), so the broker reads
  each line alone, as it does a paced stream's, and its appends share writes to Redis as
  a busy instance's do (the 2 ms linger).

Measured over ``--rounds`` rounds after ``--warmup``: ``--callgrind`` as
``bench.publishing`` (instructions per ingest line, user space only; the broker's CPU per
line from /proc beside it). Unless ``--no-post``, each run then runs ``bench.publishing``'s
single-event POST the same way (its defaults, another broker process) and prints the ratio
of the two (``line_vs_post``: the issue's target is "a small fraction"). The ingests end
(their last chunk) after the window, and each must answer 201 with every line stored.

``python -m bench.ingest_line --callgrind --runs 3 --broker-path /tmp/base --broker-path .``
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import time
from pathlib import Path

import orjson
import redis.asyncio as redis

from bench import publishing
from bench.delivery import (
    add_run_options,
    alternate,
    callgrind_control,
    counted_run,
    cpu_seconds,
    py_spy,
)
from bench.wire import LAST_CHUNK, KeepAliveClient, chunk
from broker import constants as c

NDJSON = "application/x-ndjson"
POLL_S = 0.002  # (how often the driver looks whether a round is stored)


def ingest_head(port: int, topic: str, key: str | None, token: str | None) -> bytes:
    """A chunked NDJSON POST's head, as the sessions bench's ingest producer sends it."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    keyed = f"Idempotency-Key: {key}\r\n" if key else ""
    return (
        f"POST /topics/{topic}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}{keyed}"
        f"Content-Type: {NDJSON}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()


def line_of(number: int) -> bytes:
    """The sessions bench's token line, in its own chunk."""
    return chunk(orjson.dumps({"data": {"n": number, "t": time.time_ns()}}) + b"\n")


class Ingests:
    """The open ingests: one connection each, and their answers to come."""

    def __init__(self, topics: list[str]) -> None:
        self.topics = topics
        self.clients: list[KeepAliveClient] = []
        self.answers: list[asyncio.Future[tuple[int, bytes]]] = []
        self.sent = 0  # lines, each ingest

    async def open(self, port: int, keyed: int, token: str | None) -> None:
        loop = asyncio.get_running_loop()
        for index, topic in enumerate(self.topics):
            _, client = await loop.create_connection(KeepAliveClient, "127.0.0.1", port)
            key = f"bench-line-{index}" if index < keyed else None
            self.answers.append(client.begin(ingest_head(port, topic, key, token)))
            self.clients.append(client)

    def send_line(self) -> None:
        self.sent += 1
        for client, answer in zip(self.clients, self.answers, strict=True):
            if answer.done():
                raise RuntimeError(f"an ingest answered mid-body: {answer.result()!r}")
            client.write(line_of(self.sent))

    async def end(self) -> None:
        """The last chunk on every ingest; each must store every line it sent."""
        for client in self.clients:
            client.write(LAST_CHUNK)
        for status, body in await asyncio.gather(*self.answers):
            stored = orjson.loads(body)
            count = stored.get("count", len(stored.get("ids", [])))
            if status != 201 or count != self.sent:
                raise RuntimeError(f"an ingest answered {status}: {body[:600]!r}")

    def close(self) -> None:
        for client in self.clients:
            client.close()


async def stored(store: redis.Redis, topics: list[str], lines: int, timeout: float) -> None:
    """Until every topic's log holds ``lines`` entries (or raise after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        async with store.pipeline(transaction=False) as pipe:
            for topic in topics:
                pipe.xlen(c.log_key(topic))
            lengths = await pipe.execute()
        if min(lengths) >= lines:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"a log holds {min(lengths)} lines of {lines}")
        await asyncio.sleep(POLL_S)


async def rounds(ingests: Ingests, store: redis.Redis, count: int, timeout: float) -> None:
    for _ in range(count):
        ingests.send_line()
        await stored(store, ingests.topics, ingests.sent, timeout)


async def drive(port: int, redis_url: str, args: argparse.Namespace, pid: int) -> dict[str, float]:
    token = publishing.bearer_token() if args.jwt else None
    ingests = Ingests([f"line-{i}" for i in range(args.ingests)])
    store = redis.Redis.from_url(redis_url)
    timeout = 600.0 if args.callgrind else 30.0
    try:
        await ingests.open(port, args.keyed, token)
        await rounds(ingests, store, args.warmup, timeout)
        before = cpu_seconds(pid)
        if args.callgrind:
            callgrind_control(pid, "--instr=on")
        sampler = py_spy(pid, args.py_spy) if args.py_spy else None
        await rounds(ingests, store, args.rounds, timeout)
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)  # (py-spy writes its file on SIGINT)
            sampler.wait(timeout=60)
        if args.callgrind:
            callgrind_control(pid, "--dump=window")
            callgrind_control(pid, "--instr=off")
        cpu = cpu_seconds(pid) - before
        await ingests.end()
    finally:
        ingests.close()
        await store.aclose()
    lines = args.rounds * args.ingests
    return {"lines": lines, "cpu_us_per_line": cpu * 1e6 / lines}


def run_once(code: Path, args: argparse.Namespace) -> dict[str, float]:
    async def window(redis_url: str, broker: subprocess.Popen[bytes]) -> dict[str, float]:
        return await drive(args.port + 1, redis_url, args, broker.pid)

    settings = {"BROKER_JWT_SECRET": publishing.JWT_SECRET} if args.jwt else {}
    figures = counted_run(code, args, window, "line", settings)
    if not args.no_post:
        post = publishing.run_once(code, post_arguments(args))
        figures["cpu_us_per_post"] = post["cpu_us_per_post"]
        if args.callgrind:
            figures["ir_per_post"] = post["ir_per_post"]
            figures["line_vs_post"] = figures["ir_per_line"] / post["ir_per_post"]
    return figures


def post_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """bench.publishing's defaults, on this run's ports, JWT and callgrind."""
    post = publishing.parser().parse_args([])
    post.port, post.jwt, post.callgrind, post.keep = args.port, args.jwt, args.callgrind, args.keep
    return post


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=47960, help="Redis; the broker the next")
    parser.add_argument("--ingests", type=int, default=50, help="ingests at once")
    parser.add_argument("--keyed", type=int, default=25, help="of them with an Idempotency-Key")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--jwt", action="store_true", help="a JWT secret; each ingest a token")
    parser.add_argument("--no-post", action="store_true", help="no single-event POST run")
    add_run_options(parser)
    args = parser.parse_args()
    alternate(args, lambda code: run_once(code, args), f" {args.keyed}/{args.ingests} keyed")


if __name__ == "__main__":
    main()
