"""Load-generator processes: subscribers and publishers spread over several processes.

One Python process saturates one core long before a server's two workers do, so the
orchestrator hands each job to every process of a `LoadGenerators` pool, splitting the
connection count between them. Each process runs uvloop and reports the CPU it used
during the measured window, so the harness can say when it, not the server, was the
bottleneck.

A job is a coroutine in a worker process that talks to the orchestrator over a pipe:
it may send intermediate messages ("connected") and wait for commands ("go") before
it returns its result.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Awaitable, Callable, Iterable
from multiprocessing.connection import Connection
from typing import Any

import uvloop

from bench import lifecycle_jobs
from bench.procstats import own_cpu_seconds, raise_open_files_limit
from bench.wire import EventCounter, PolledSubscriber, PublishLoop, SseSubscriber, get_request

Message = dict[str, Any]
HEADERS_TIMEOUT_S = 15.0


class Channel:
    """The worker's or the orchestrator's end of one pipe, awaitable without blocking a loop."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def receive(self) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, self.connection.recv)

    def send(self, message: Any) -> None:
        self.connection.send(message)


# ---- the worker side -----------------------------------------------------------------------


class Subscribers:
    """A set of SSE subscriptions in one worker, and when all of them are done."""

    def __init__(self) -> None:
        self.open: list[EventCounter] = []
        self.failed = 0
        self.finished = 0
        self.all_done = asyncio.Event()

    def on_done(self, _subscriber: EventCounter) -> None:
        self.finished += 1
        if self.finished >= len(self.open):
            self.all_done.set()

    async def add(
        self, spec: Message, count: int, *, sampled: int = 0, polled: bool = False
    ) -> None:
        """Open `count` more subscriptions, at most `spec["concurrency"]` connecting at once.

        The first `sampled` record latencies; with `polled` the others are swept, not
        driven by the event loop (see `PolledSubscriber`)."""
        gate = asyncio.Semaphore(spec.get("concurrency", 200))
        results = await asyncio.gather(
            *(
                self._open_one(spec, gate, sample=i < sampled, polled=polled and i >= sampled)
                for i in range(count)
            )
        )
        for subscriber in results:
            if subscriber is None:
                self.failed += 1
            else:
                self.open.append(subscriber)

    async def _open_one(
        self, spec: Message, gate: asyncio.Semaphore, *, sample: bool, polled: bool
    ) -> EventCounter | None:
        async with gate:
            subscriber = self.make(spec, sample=sample, polled=polled)
            try:
                status = await asyncio.wait_for(_subscribe(spec, subscriber), HEADERS_TIMEOUT_S)
            except (OSError, TimeoutError):
                status = 0
            if status != 200:
                subscriber.close()
                return None
            return subscriber

    def make(self, spec: Message, *, sample: bool = False, polled: bool = False) -> EventCounter:
        kind = PolledSubscriber if polled else SseSubscriber
        return kind(
            _request(spec),
            sample=sample,
            expected=spec.get("expected", 0),
            marker=spec.get("marker", b""),
            on_done=self.on_done,
        )

    async def sweep(self, interval: float) -> None:
        """Read every polled subscription's socket each `interval` seconds, forever."""
        polled = [s for s in self.open if isinstance(s, PolledSubscriber)]
        while True:
            for subscriber in polled:
                if not subscriber.closed:
                    subscriber.poll()
            await asyncio.sleep(interval)

    def expect(self, count: int) -> None:
        """Lower every subscriber's expected count (the publisher could send only `count`)."""
        for subscriber in self.open:
            subscriber.expected = count
            if not subscriber.done_at and subscriber.count >= count:
                subscriber.done_at = time.time()
                self.on_done(subscriber)

    async def wait_all_done(self, timeout: float) -> None:
        if self.open and self.finished < len(self.open):
            try:
                await asyncio.wait_for(self.all_done.wait(), timeout)
            except TimeoutError:
                pass

    def close(self) -> None:
        for subscriber in self.open:
            subscriber.close()


def _request(spec: Message) -> bytes:
    return get_request(spec["host"], spec["port"], spec["path"], spec.get("headers"))


async def _subscribe(spec: Message, subscriber: EventCounter) -> int:
    """Connect and wait for the response head; its status."""
    if isinstance(subscriber, PolledSubscriber):
        return await subscriber.open(spec["host"], spec["port"])
    assert isinstance(subscriber, SseSubscriber)
    await connect(spec, subscriber)
    return await subscriber.headers


async def connect(spec: Message, protocol: asyncio.Protocol) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_connection(lambda: protocol, spec["host"], spec["port"])


class CpuWindow:
    """This process's CPU and wall time over a measured window."""

    def __init__(self) -> None:
        self.cpu0, self.wall0 = own_cpu_seconds(), time.monotonic()

    def result(self) -> Message:
        wall = time.monotonic() - self.wall0
        return {"cpu_s": own_cpu_seconds() - self.cpu0, "wall_s": wall}


async def fanout_job(channel: Channel, spec: Message) -> Message:
    """Subscribe, report, wait for "go"; then wait until every subscriber has `expected`,
    report that ("measured"), and disconnect only when told: the orchestrator closes its
    CPU window first, so the servers' teardown of thousands of connections is not billed
    to the deliveries (it is measured apart)."""
    subscribers = Subscribers()
    await subscribers.add(spec, spec["count"], sampled=spec.get("sampled", 0), polled=True)
    channel.send({"connected": len(subscribers.open), "failed": subscribers.failed})
    await channel.receive()  # go: the publisher starts now
    window = CpuWindow()
    sweeper = asyncio.create_task(subscribers.sweep(spec["sweep_s"]))
    finish = await channel.receive()  # the publisher is done: what it published, how long to wait
    subscribers.expect(finish["expected"])
    await subscribers.wait_all_done(finish["grace_s"])
    sweeper.cancel()
    result = window.result() | _delivery_summary(subscribers.open, finish["expected"])
    result["failed"] = subscribers.failed
    channel.send({"measured": result})
    await channel.receive()  # the window is closed: disconnect
    closed = len(subscribers.open)
    subscribers.close()
    return {"closed": closed}


def _delivery_summary(subscribers: list[EventCounter], expected: int) -> Message:
    counts = [s.count for s in subscribers]
    latencies = [ms for s in subscribers for ms in s.latencies_ms]
    return {
        "subscribers": len(subscribers),
        "delivered": sum(min(c, expected) for c in counts),
        "received": sum(counts),
        "complete": sum(1 for c in counts if c >= expected),
        "dropped": sum(1 for s in subscribers if s.closed),
        "latencies_ms": latencies,
    }


async def idle_job(channel: Channel, spec: Message) -> Message:
    """Hold idle subscriptions, growing to each count in `steps` on the orchestrator's word."""
    subscribers = Subscribers()
    for step in spec["steps"]:
        await subscribers.add(spec, step - len(subscribers.open) - subscribers.failed)
        channel.send({"connected": len(subscribers.open), "failed": subscribers.failed})
        await channel.receive()
    dropped = sum(1 for s in subscribers.open if s.closed)
    subscribers.close()
    return {"connected": len(subscribers.open), "failed": subscribers.failed, "dropped": dropped}


async def storm_job(channel: Channel, spec: Message) -> Message:
    """At `start_at` (wall clock) connect `count` clients at once; each waits for `marker`."""
    subscribers = Subscribers()
    clients = [
        SseSubscriber(_request(spec), marker=spec["marker"], on_done=subscribers.on_done)
        for _ in range(spec["count"])
    ]
    subscribers.open = list(clients)
    await _sleep_until(spec["start_at"])
    window = CpuWindow()
    results = await asyncio.gather(
        *(connect(spec, client) for client in clients), return_exceptions=True
    )
    await subscribers.wait_all_done(max(0.0, spec["start_at"] + spec["timeout_s"] - time.time()))
    caught_up = [c.done_at - spec["start_at"] for c in clients if c.done_at]
    result = window.result() | {
        "clients": len(clients),
        "connect_failed": sum(1 for r in results if isinstance(r, BaseException)),
        "caught_up_s": caught_up,
        "received": sum(c.count for c in clients),
    }
    subscribers.close()
    return result


async def publish_job(channel: Channel, spec: Message) -> Message:
    """Send the same POST back to back on each keep-alive connection for `duration_s`."""
    raw: bytes = spec["request"]
    loops = [PublishLoop(raw, until=0.0) for _ in range(spec["connections"])]
    await asyncio.gather(*(connect(spec, loop) for loop in loops))
    await _sleep_until(spec["start_at"])
    window = CpuWindow()
    for loop in loops:
        loop.until = time.monotonic() + spec["duration_s"]
        loop.start()
    await asyncio.wait_for(asyncio.gather(*(loop.done for loop in loops)), spec["duration_s"] + 30)
    result = window.result()
    for loop in loops:
        assert loop.transport is not None
        loop.transport.close()
    return result | {"ok": sum(p.ok for p in loops), "failed": sum(p.failed for p in loops)}


async def _sleep_until(wall_time: float) -> None:
    await asyncio.sleep(max(0.0, wall_time - time.time()))


JOBS: dict[str, Callable[[Channel, Message], Awaitable[Message]]] = {
    "fanout": fanout_job,
    "idle": idle_job,
    "storm": storm_job,
    "publish": publish_job,
    **lifecycle_jobs.JOBS,
}


async def _serve(channel: Channel) -> None:
    while (job := await channel.receive()) is not None:
        try:
            result = await JOBS[job["kind"]](channel, job["spec"])
        except Exception as error:  # reported to the orchestrator, which fails the scenario
            result = {"error": f"{type(error).__name__}: {error}"}
        channel.send({"result": result})


def _worker_main(connection: Connection) -> None:
    raise_open_files_limit()
    uvloop.run(_serve(Channel(connection)))


# ---- the orchestrator side -----------------------------------------------------------------


class LoadGenerators:
    """A pool of worker processes; each job runs in all of them at once."""

    def __init__(self, size: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.channels: list[Channel] = []
        self.processes = []
        for _ in range(size):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker_main, args=(theirs,), daemon=True)
            process.start()
            self.channels.append(Channel(ours))
            self.processes.append(process)

    @property
    def size(self) -> int:
        return len(self.channels)

    def start_job(self, kind: str, specs: Iterable[Message]) -> None:
        for channel, spec in zip(self.channels, specs, strict=True):
            channel.send({"kind": kind, "spec": spec})

    def broadcast(self, message: Message) -> None:
        for channel in self.channels:
            channel.send(message)

    async def gather(self) -> list[Message]:
        """The next message from every worker."""
        return list(await asyncio.gather(*(c.receive() for c in self.channels)))

    async def results(self) -> list[Message]:
        """The final results of the current job; raise if any worker failed."""
        messages = await self.gather()
        for message in messages:
            if "error" in message["result"]:
                raise RuntimeError("load generator failed: " + message["result"]["error"])
        return [message["result"] for message in messages]

    def close(self) -> None:
        for channel, process in zip(self.channels, self.processes, strict=True):
            try:
                channel.send(None)
            except OSError:
                pass
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


def split(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal integers."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
