"""`python -m bench.micro dispatch|append`: in-process measurements of one hot path each.

The scenarios measure the whole system, and on a shared 2-core machine their
figures move by +-20% between runs: a change worth 0.3 us per delivery is lost
in that. These two take the network and the load generator out and time one
path in one process, so a change to it can be measured before it goes in:

- ``dispatch``: the Python cost of the live reader's direct write to a
  subscriber (``Subscription.offer`` into a ``StreamConnection`` whose transport
  does nothing): what every delivery pays besides the socket write. Best of 20
  rounds over 10,000 subscriptions.
- ``append``: the client CPU of one append (``Broker.publish`` of one event)
  against a real ``redis-server`` started here, alone and with 8 and 64
  concurrent publishers (the pipeline batches those), from ``getrusage``.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import subprocess
import tempfile
import time
from typing import Any

import uvloop

from api.lean_stream import StreamConnection
from broker import Broker, NewEvent
from broker import constants as c
from broker.ids import EventId
from broker.model import LiveBatch, LogEntry
from broker.redis_open import open_store
from broker.subscription import Subscription

SUBSCRIBERS = 10_000
ROUNDS = 20
APPENDS = 20_000
REDIS_PORT = 6397


class _NullTransport:
    """A socket that takes everything at once."""

    def write(self, data: bytes) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def _parked_subscription() -> Subscription:
    """A caught-up single-topic subscription whose sink is a StreamConnection."""
    sink: Any = StreamConnection.__new__(StreamConnection)
    sink._transport = _NullTransport()
    sink._paused = False
    sink._chunked = True
    subscription = Subscription(None, None, {"t": "now"}, sink=sink)  # type: ignore[arg-type]
    subscription._consumer_idle = True
    subscription._resync = set()
    subscription._catching_up = False
    subscription._positions = {"t": EventId("abcdefgh", (1, 0))}
    return subscription


def dispatch(subscribers: int = SUBSCRIBERS, rounds: int = ROUNDS) -> float:
    """Microseconds of Python per direct delivery, best of ``rounds``."""
    subscriptions = [_parked_subscription() for _ in range(subscribers)]
    best = float("inf")
    for round_ in range(rounds):
        fields = {c.FIELD_EPOCH: b"abcdefgh", c.FIELD_DATA: b'{"text": "a token"}'}
        batch = LiveBatch([LogEntry("t", (2 + round_, 0), fields)], from_origin=False)
        started = time.perf_counter()
        written = sum(subscription.offer(batch) for subscription in subscriptions)
        best = min(best, time.perf_counter() - started)
        if written != subscribers:  # else it measured the queued path, not this one
            raise RuntimeError(f"{subscribers - written} offers were not written directly")
    return 1e6 * best / subscribers


async def _append_cost(url: str, concurrency: int) -> tuple[float, float]:
    """(us of client CPU per append, appends/s) with ``concurrency`` publishers."""
    store = open_store(url)
    await store.open()
    broker = Broker(store)
    await broker.start()
    left = 0

    async def publisher(n: int) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await broker.publish(f"micro.{n % 50}", [NewEvent('{"n": 1}')])

    try:
        left = APPENDS // 4  # warm: scripts loaded, pool filled
        await asyncio.gather(*(publisher(n) for n in range(concurrency)))
        left = APPENDS
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        await asyncio.gather(*(publisher(n) for n in range(concurrency)))
        after, ended = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    finally:
        await broker.close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return 1e6 * cpu / APPENDS, APPENDS / (ended - started)


def append() -> dict[int, tuple[float, float]]:
    """Client CPU per append alone, with 8 and with 64 concurrent publishers."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            "append needs redis-server (bash scripts/ensure-system-tools.sh redis-server)"
        )
    with tempfile.TemporaryDirectory() as directory:
        server = subprocess.Popen(
            [binary, "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no",
             "--dir", directory],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(0.5)
            url = f"redis://127.0.0.1:{REDIS_PORT}/0"
            return {n: uvloop.run(_append_cost(url, n)) for n in (1, 8, 64)}
        finally:
            server.terminate()
            server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument("what", choices=["dispatch", "append"])
    args = parser.parse_args()
    if args.what == "dispatch":
        print(f"{dispatch():.3f} us of Python per direct delivery (best of {ROUNDS})")
    else:
        for concurrency, (cpu_us, rate) in append().items():
            print(
                f"{concurrency:>3} publishers: {cpu_us:.1f} us client CPU per append, {rate:,.0f}/s"
            )


if __name__ == "__main__":
    main()
