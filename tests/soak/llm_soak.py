"""Soak: the LLM use case end to end, with every fault at once.

Three real brokers behind the shipped HAProxy config, on one real redis-server.
Generations, each on a new topic: a producer pipes paced tokens through one
streaming ingest (``application/x-ndjson``, an ``Idempotency-Key``,
``?close=true``), resending the whole body under the same key when its
connection breaks. Viewers subscribe before the first token (httpx-sse, the
project's ``AsyncSubscriber``), some come back after the end (``Last-Event-ID``)
or arrive after it (``?from=earliest``). Meanwhile: a broker is SIGTERMed
(drained) and restarted, another SIGKILLed and restarted, Redis kills every
client connection a few times, viewers' connections are cut at random, and some
producers' first attempts break (``CUTS``: mid-body, after the last line, the
answer lost, the connection closed right after the body's end).

The promise checked: every viewer gets every token exactly once, in order, then
``broker.end``, and no ``broker.gap`` (nothing is trimmed); each topic's log
holds each line exactly once, in order, then its end.

tests/e2e/test_llm_soak.py runs it once (about 25 s; 30-40 s on a loaded
machine). To hunt for rare failures, run it many times (a failed run prints its
seed and problems, and keeps its logs):

    PYTHONPATH=. .venv/bin/python -m tests.soak.llm_soak --runs 20
    PYTHONPATH=. .venv/bin/python -m tests.soak.llm_soak --runs 10 --faults intense
    PYTHONPATH=. .venv/bin/python -m tests.soak.llm_soak --seed N  # N's random choices

Ports: SOAK_PORT_BASE (default 47800) and the next four.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import socket
import ssl
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
from httpx_sse import aconnect_sse

from broker.constants import log_key
from brokerclient import AsyncPublisher, AsyncSubscriber, RetryPolicy, event
from deploy.render import render_haproxy
from tests.e2e.balancers import command
from tests.e2e.brokers import broker_environment, broker_executable, open_streams_at
from tests.support.polling import wait_until
from tests.support.procs import ManagedProcess, http_status, tail
from tests.support.redis_server import RedisServer

GENERATIONS = 30
TOKENS = 60
TOKEN_INTERVAL = 0.02  # 50 tokens/s
GENERATION_SPACING = 0.6  # a new generation starts this often
RUN_DEADLINE = 75.0  # the whole run, faults and viewers, must be over by then
CUT_PROBABILITY = 0.03  # per event a viewer reads: its connection is cut
SIGTERM_EXIT_TIMEOUT = 15.0
# How a producer's first attempt breaks: its body cut after a random line, cut after
# the last line (nothing closed yet), the answer lost after the topic was closed, or
# the connection closed right after the body's end (send_and_abandon).
CUTS = ("mid-body", "before-end", "answer-lost", "abandoned")
VIEWER_TIMEOUT = httpx.Timeout(20, connect=3)
# One TLS context for every client (all plain HTTP): each httpx client made its own,
# loading the CA bundle on the event loop, 25 ms each and 0.25 s under load: the
# soak's 150 clients stalled its own loop for seconds, and its timeouts fired.
TLS = ssl.create_default_context()


# -- processes ---------------------------------------------------------------------------


class Broker:
    """One `broker serve --workers 1` on a fixed port of the soak's range."""

    def __init__(self, index: int, port: int, redis_url: str, workdir: Path) -> None:
        self.index, self.port = index, port
        args = [
            broker_executable(), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--redis-url", redis_url, "--workers", "1",
        ]  # fmt: skip
        self.process = ManagedProcess(
            f"broker-{index}", args, workdir / f"broker-{index}.log", env=broker_environment()
        )

    def start(self) -> None:
        self.process.start()
        wait_until(self._ready, timeout=20, what=f"broker-{self.index} /readyz")

    def _ready(self) -> bool:
        if not self.process.running:
            raise AssertionError(f"broker-{self.index} exited\n{tail(self.process.log_path)}")
        return http_status(f"http://127.0.0.1:{self.port}/readyz") == 200


@dataclass
class Deployment:
    redis: RedisServer
    brokers: list[Broker]
    haproxy: ManagedProcess
    url: str
    workdir: Path

    def close(self) -> None:
        self.haproxy.close()
        for broker in self.brokers:
            broker.process.close()
        self.redis.close()


def start_deployment(ports: list[int], workdir: Path) -> Deployment:
    """Redis, three brokers, HAProxy, on these five ports."""
    redis = RedisServer(appendonly=True, port=ports[0])
    brokers = [Broker(i, ports[1 + i], redis.url, workdir) for i in range(3)]
    lb_port = ports[4]
    config = render_haproxy(lb_port, [b.port for b in brokers], workdir / "haproxy")
    haproxy = ManagedProcess(
        "haproxy", command("haproxy", config, workdir), workdir / "haproxy.log", cwd=workdir
    )
    deployment = Deployment(redis, brokers, haproxy, f"http://127.0.0.1:{lb_port}", workdir)
    try:
        redis.start()
        if redis.process is None or redis.process.poll() is not None:
            # (its PING was answered by another server on the port)
            raise RuntimeError(f"redis-server could not listen on {ports[0]}")
        for broker in brokers:
            broker.start()
        haproxy.start()
        wait_until(
            lambda: http_status(f"{deployment.url}/readyz") == 200,
            timeout=15,
            what="haproxy to reach a ready broker",
        )
    except BaseException:
        deployment.close()
        raise
    return deployment


# -- what happened ------------------------------------------------------------------------


@dataclass
class Timeline:
    started: float = field(default_factory=time.monotonic)
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.lines.append(f"{time.monotonic() - self.started:6.2f}s {what}")

    def __str__(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Viewer:
    """What one subscriber received, as (event type, id, data)."""

    name: str
    received: list[tuple[str, str, str]] = field(default_factory=list)
    connections: int = 0
    cuts: int = 0
    errors: list[str] = field(default_factory=list)  # (for a failure's report)
    failure: str | None = None
    visits: list[str] = field(default_factory=list)  # each connection: when, where, from

    def problems(self, topic: str) -> list[str]:
        if self.failure:
            return [f"{self.name}: {self.failure}"]
        tokens = [orjson.loads(d)["n"] for kind, _, d in self.received if kind == "token"]
        others = [kind for kind, _, _ in self.received if kind != "token"]
        found = []
        if tokens != list(range(TOKENS)):
            found.append(f"{self.name}: tokens {compress(tokens)}")
        if others != ["broker.end"]:
            found.append(f"{self.name}: other events {others} (want only one broker.end)")
        ids = [i for _, i, _ in self.received]
        if len(set(ids)) != len(ids):
            found.append(f"{self.name}: an id received twice")
        return found


def compress(numbers: list[int]) -> str:
    """[0..59] as runs, so a duplicate or a hole stands out."""
    runs: list[str] = []
    start = previous = None
    for n in [*numbers, None]:
        if start is not None and n == previous + 1:  # type: ignore[operator]
            previous = n
            continue
        if start is not None:
            runs.append(f"{start}" if start == previous else f"{start}-{previous}")
        start = previous = n
    return "[" + ",".join(runs) + "]"


@dataclass
class Generation:
    index: int
    topic: str
    producer_kind: str
    cut: str | None  # how its producer's first attempt breaks (CUTS), if it does
    viewers: list[Viewer] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    answer: dict[str, object] | None = None
    attempts: int = 0
    breaks: list[str] = field(default_factory=list)  # why an attempt did not take it
    failure: str | None = None


# -- producers ---------------------------------------------------------------------------


class CutBody(Exception):
    """The producer's connection breaks mid-body (raised inside the body it sends)."""


def token_line(n: int) -> bytes:
    return orjson.dumps({"data": {"n": n}, "event": "token"}) + b"\n"


class Tokens:
    """One generation's tokens, made once at 50/s: a resend sends again those made so
    far, then the rest (as examples/llm_tokens.py does)."""

    def __init__(self) -> None:
        self.made: list[bytes] = []

    async def body(self, cut_at: int | None) -> AsyncIterator[bytes]:
        for sent, line in enumerate(list(self.made)):
            if sent == cut_at:
                raise CutBody
            yield line
        while len(self.made) < TOKENS:
            if len(self.made) == cut_at:
                raise CutBody
            await asyncio.sleep(TOKEN_INTERVAL)
            self.made.append(token_line(len(self.made)))
            yield self.made[-1]
        if cut_at == TOKENS:  # every line sent, the body not ended: no close yet
            raise CutBody


async def send_and_abandon(url: str, topic: str, key: str, tokens: Tokens) -> None:
    """The whole body, its end included, then the connection closed at once, the
    answer unread (a producer that died as it finished): its resend, sent at once,
    races the first request's close on whichever broker has it."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    _, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"POST /topics/{topic}/events?close=true HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/x-ndjson\r\nIdempotency-Key: {key}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    try:
        async for line in tokens.body(None):
            writer.write(b"%x\r\n%s\r\n" % (len(line), line))
            await writer.drain()  # (raises once a fault has closed the connection)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    except ConnectionError:
        pass  # broken by a fault before its end: the resend sends it all the same
    finally:
        writer.close()


async def produce_with_httpx(generation: Generation, url: str, rng: random.Random) -> None:
    """The README's producer: the whole body again under the same key after a break."""
    key = f"soak-{uuid.uuid4().hex}"
    tokens = Tokens()
    headers = {"Content-Type": "application/x-ndjson", "Idempotency-Key": key}
    cut_at = {"mid-body": rng.randrange(5, TOKENS - 5), "before-end": TOKENS}.get(
        generation.cut or ""
    )
    lost_answer: dict[str, object] | None = None
    if generation.cut == "abandoned":
        await send_and_abandon(url, generation.topic, key, tokens)
        generation.breaks.append("abandoned")
    async with httpx.AsyncClient(base_url=url, timeout=20, verify=TLS) as client:
        for _ in range(30):  # bounded: each failure is a fault of this run
            generation.attempts += 1
            try:
                response = await client.post(
                    f"/topics/{generation.topic}/events",
                    params={"close": "true"},
                    headers=headers,
                    content=tokens.body(cut_at),
                )
            except (httpx.TransportError, CutBody) as error:
                generation.breaks.append(type(error).__name__)
                cut_at = None  # one cut per producer; a broker's fault may add more
                await asyncio.sleep(0.1)
                continue
            if response.status_code in (502, 503, 504):
                generation.breaks.append(str(response.status_code))
                await asyncio.sleep(min(float(response.headers.get("Retry-After", "0.2")), 0.5))
                continue
            if response.status_code not in (200, 201):
                generation.failure = f"producer: {response.status_code} {response.text[:300]}"
                return
            if generation.cut == "answer-lost" and lost_answer is None:
                lost_answer = response.json()  # as if the connection broke before it came
                generation.breaks.append("answer-lost")
                continue
            generation.answer = response.json()
            if lost_answer is not None and (
                generation.answer != lost_answer
                or response.headers.get("Idempotent-Replayed") != "true"
            ):
                generation.failure = f"resend answered {generation.answer}, first {lost_answer}"
            return
    generation.failure = "producer: not taken in 30 attempts"


async def produce_with_brokerclient(generation: Generation, url: str, rng: random.Random) -> None:
    """brokerclient's AsyncPublisher.stream: it resends under its key by itself."""

    async def tokens() -> AsyncIterator[dict[str, object]]:
        for n in range(TOKENS):
            await asyncio.sleep(TOKEN_INTERVAL)
            yield event({"n": n}, event="token")

    async def attempted(request: httpx.Request) -> None:
        generation.attempts += 1

    async def answered(response: httpx.Response) -> None:
        if response.status_code not in (200, 201):
            generation.breaks.append(str(response.status_code))

    policy = RetryPolicy(attempts=30, backoff=0.1, max_backoff=0.5)
    hooks = {"request": [attempted], "response": [answered]}
    client = httpx.AsyncClient(base_url=url, timeout=20, event_hooks=hooks, verify=TLS)
    async with client, AsyncPublisher(url, retry=policy, client=client) as publisher:
        result = await publisher.stream(generation.topic, tokens(), close=True)
    generation.answer = {"ids": result.ids, "end_id": result.end_id}


PRODUCERS: dict[str, Callable[[Generation, str, random.Random], Awaitable[None]]] = {
    "httpx": produce_with_httpx,
    "brokerclient": produce_with_brokerclient,
}


# -- viewers -----------------------------------------------------------------------------


@dataclass
class Visit:
    """An httpx-sse viewer's place: its last id, and when it leaves to come back later."""

    last_id: str | None = None
    leave_after: int | None = None  # tokens, then it goes away (a closed tab)
    come_back: asyncio.Event | None = None  # ... until this is set (a reload after the end)


async def view_with_httpx_sse(
    viewer: Viewer,
    url: str,
    topic: str,
    rng: random.Random,
    *,
    leave_after: int | None = None,
    come_back: asyncio.Event | None = None,
) -> None:
    """A viewer on httpx-sse, which does not reconnect: it reconnects with
    Last-Event-ID itself, as EventSource does."""
    visit = Visit(None, leave_after, come_back)
    async with httpx.AsyncClient(base_url=url, timeout=VIEWER_TIMEOUT, verify=TLS) as client:
        for _ in range(200):  # bounded: every reconnect is a fault of this run
            viewer.connections += 1
            try:
                outcome = await read_connection(client, topic, viewer, visit, rng)
            except httpx.TransportError as error:
                viewer.errors.append(f"{time.monotonic():.2f} {error!r}")
                outcome = "broken"
            if outcome == "over":
                return
            if outcome == "left" and visit.come_back is not None:
                await visit.come_back.wait()
            elif outcome != "cut":
                await asyncio.sleep(0.1)
    viewer.failure = "no broker.end after 200 connections"


async def read_connection(
    client: httpx.AsyncClient, topic: str, viewer: Viewer, visit: Visit, rng: random.Random
) -> str:
    """One connection: "over" (the end, a gap, a 204), "left", "cut" or "refused"."""
    headers = {"Last-Event-ID": visit.last_id} if visit.last_id else {}
    params = {} if visit.last_id else {"from": "earliest"}
    path = f"/topics/{topic}/events"
    async with aconnect_sse(client, "GET", path, params=params, headers=headers) as source:
        if source.response.status_code == 204:
            viewer.failure = "204 before its broker.end"
            return "over"
        if source.response.status_code != 200:
            viewer.errors.append(f"{time.monotonic():.2f} {source.response.status_code}")
            return "refused"
        async for sse in source.aiter_sse():
            if not sse.data:
                # httpx-sse hands on a bare `retry:` block (with the last id kept);
                # EventSource dispatches no event without data.
                continue
            viewer.received.append((sse.event, sse.id, sse.data))
            visit.last_id = sse.id
            if sse.event in ("broker.end", "broker.gap"):
                return "over"
            if visit.leave_after is not None and len(viewer.received) >= visit.leave_after:
                visit.leave_after = None
                viewer.cuts += 1
                return "left"
            if rng.random() < CUT_PROBABILITY:
                viewer.cuts += 1
                return "cut"
    return "ended"


class CuttingStream(httpx.AsyncByteStream):
    """A response body that breaks like a dropped connection, at random."""

    def __init__(self, inner: httpx.AsyncByteStream, viewer: Viewer, rng: random.Random) -> None:
        self.inner, self.viewer, self.rng = inner, viewer, rng

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            yield chunk
            if b"event: token" in chunk and self.rng.random() < CUT_PROBABILITY * 2:
                self.viewer.cuts += 1
                self.viewer.visits.append(f"{time.time():.3f} cut")
                raise httpx.ReadError("cut by the soak")

    async def aclose(self) -> None:
        await self.inner.aclose()


class CuttingTransport(httpx.AsyncBaseTransport):
    def __init__(self, viewer: Viewer, rng: random.Random) -> None:
        self.inner = httpx.AsyncHTTPTransport(verify=TLS)
        self.viewer, self.rng = viewer, rng

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self.inner.handle_async_request(request)
        except httpx.TransportError as error:
            self.viewer.errors.append(f"{time.monotonic():.2f} {request.url.path} {error!r}")
            raise
        if response.status_code != 200:
            self.viewer.errors.append(f"{time.monotonic():.2f} {response.status_code}")
        if request.method == "GET" and "/events" in request.url.path:
            self.viewer.connections += 1
            self.viewer.visits.append(
                f"{time.time():.3f} :{request.url.port} {response.status_code} "
                f"from {request.headers.get('last-event-id')}"
            )
            assert isinstance(response.stream, httpx.AsyncByteStream)
            response.stream = CuttingStream(response.stream, self.viewer, self.rng)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def view_with_brokerclient(viewer: Viewer, url: str, topic: str, rng: random.Random) -> None:
    client = httpx.AsyncClient(
        base_url=url, timeout=VIEWER_TIMEOUT, transport=CuttingTransport(viewer, rng)
    )
    async with (
        client,
        AsyncSubscriber(topic, url, from_earliest=True, give_up_after=30, client=client) as sub,
    ):
        async for e in sub:
            viewer.received.append((e.event or "message", e.id or "", e.data))
            if e.is_gap:
                return


# -- faults ------------------------------------------------------------------------------


def kill_redis_clients(port: int) -> int:
    """CLIENT KILL TYPE normal: every broker's Redis connection drops at once."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"CLIENT KILL TYPE normal SKIPME yes\r\n")
        answer = sock.recv(64)
    return int(answer[1:].strip() or 0)


def open_streams(broker: Broker) -> float:
    """The broker's own gauge of the streams it serves (0 while it cannot say)."""
    return open_streams_at(f"http://127.0.0.1:{broker.port}")


def busiest(brokers: list[Broker]) -> Broker:
    """The broker serving the most streams: a fault there cuts the most viewers."""
    return max(brokers, key=open_streams)


def drain_and_restart(broker: Broker) -> str:
    code = broker.process.terminate(SIGTERM_EXIT_TIMEOUT)
    if code != 0:
        raise AssertionError(f"broker-{broker.index} exited {code} after SIGTERM")
    broker.start()
    return f"broker-{broker.index} drained (exit 0) and restarted"


def crash_and_restart(broker: Broker) -> str:
    broker.process.kill()
    broker.start()
    return f"broker-{broker.index} SIGKILLed and restarted"


Schedule = list[tuple[float, Callable[[], str]]]


def usual_faults(deployment: Deployment) -> Schedule:
    """A drain and a crash (of two brokers), four Redis connection kills."""

    def kill_clients() -> str:
        return f"redis killed {kill_redis_clients(deployment.redis.port)} clients"

    return [
        (3.0, kill_clients),
        (5.0, lambda: drain_and_restart(busiest(deployment.brokers[:2]))),
        (9.0, kill_clients),
        (12.0, lambda: crash_and_restart(busiest(deployment.brokers[1:]))),
        (15.5, kill_clients),
        (18.0, kill_clients),
    ]


def intense_faults(deployment: Deployment) -> Schedule:
    """For a hunt: a drain or a crash of the busiest broker every 3 s, in turns, and
    Redis connection kills in between."""

    def kill_clients() -> str:
        return f"redis killed {kill_redis_clients(deployment.redis.port)} clients"

    schedule: Schedule = []
    for turn in range(6):
        at = 2.0 + 3.0 * turn
        restart = drain_and_restart if turn % 2 == 0 else crash_and_restart
        schedule.append((at, lambda r=restart: r(busiest(deployment.brokers))))  # type: ignore[misc]
        schedule.append((at + 1.5, kill_clients))
    return schedule


FAULTS = {"usual": usual_faults, "intense": intense_faults}


async def faults(schedule: Schedule, timeline: Timeline) -> None:
    """Each fault at its time (or as soon as the one before it is over)."""
    for at, fault in schedule:
        await asyncio.sleep(max(0.0, at - (time.monotonic() - timeline.started)))
        try:
            timeline.note(await asyncio.to_thread(fault))
        except Exception as error:  # (a fault that could not be done is a problem too)
            timeline.failures.append(f"fault at {at} s failed: {error!r}")
            timeline.note(timeline.failures[-1])


# -- one generation ----------------------------------------------------------------------


async def run_generation(generation: Generation, url: str, rng: random.Random) -> None:
    topic = generation.topic
    tasks: list[asyncio.Task[None]] = []
    first = Viewer(f"g{generation.index}-live-httpx-sse")
    second = Viewer(f"g{generation.index}-live-brokerclient")
    generation.viewers += [first, second]
    tasks.append(asyncio.create_task(view_with_httpx_sse(first, url, topic, rng)))
    tasks.append(asyncio.create_task(view_with_brokerclient(second, url, topic, rng)))
    if generation.index % 3 == 0:  # a closed tab, reopened after the end
        reload = Viewer(f"g{generation.index}-reload")
        generation.viewers.append(reload)
        tasks.append(
            asyncio.create_task(
                view_with_httpx_sse(
                    reload, url, topic, rng, leave_after=rng.randrange(1, TOKENS),
                    come_back=generation.finished,
                )
            )
        )  # fmt: skip
    # A head start, so that most viewers subscribe before the first token (from
    # earliest: in either order they must get every token).
    await asyncio.sleep(0.05)
    try:
        await PRODUCERS[generation.producer_kind](generation, url, rng)
    except Exception as error:  # (said in the report, with the rest)
        generation.failure = f"producer raised {error!r}"
    generation.finished.set()
    if generation.index % 3 == 1:  # a late visitor: the whole answer from earliest
        late = Viewer(f"g{generation.index}-late")
        generation.viewers.append(late)
        tasks.append(asyncio.create_task(view_with_httpx_sse(late, url, topic, rng)))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for viewer, result in zip(generation.viewers, results, strict=True):
        if isinstance(result, BaseException) and viewer.failure is None:
            viewer.failure = f"raised {result!r} after {viewer.errors[-6:]}"


def id_problems(generation: Generation) -> list[str]:
    """Every viewer saw the ids the producer was answered (its tokens', its end's)."""
    answer = generation.answer or {}
    if not answer.get("ids"):
        return []
    expected = [*answer["ids"], answer.get("end_id")]  # type: ignore[misc]
    return [
        f"{viewer.name}: ids differ from the producer's answer"
        for viewer in generation.viewers
        if not viewer.failure and [i for _, i, _ in viewer.received] != expected
    ]


def log_problems(redis_port: int, topic: str) -> list[str]:
    """The topic's Redis Stream: each token once, in order, then the end entry."""
    import redis  # (the test's own view of Redis, not the broker's client)

    with redis.Redis(port=redis_port) as client:
        entries = client.xrange(log_key(topic))
    tokens, ends = [], 0
    for _, fields in entries:
        if fields.get(b"e") == b"token":
            tokens.append(orjson.loads(fields[b"d"])["n"])
        else:
            ends += 1
    found = []
    if tokens != list(range(TOKENS)):
        found.append(f"{topic} log: tokens {compress(tokens)}")
    if ends != 1 or (entries and entries[-1][1].get(b"e") == b"token"):
        found.append(f"{topic} log: {ends} non-token entries, last {entries[-1:]}")
    return found


async def watch_loop_lag(timeline: Timeline) -> None:
    """Notes each time this process's event loop ran late by over half a second: on a
    starved machine the soak's own clients fall behind, and their timeouts fire."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(0.1)
        late = time.monotonic() - before - 0.1
        if late > 0.5:
            timeline.note(f"the soak's event loop ran {late:.1f} s late")


async def soak(
    deployment: Deployment, seed: int, fault_kind: str = "usual"
) -> tuple[list[str], Timeline, str]:
    rng = random.Random(seed)
    timeline = Timeline()
    run_id = uuid.uuid4().hex[:6]
    generations = [
        Generation(
            index=i,
            topic=f"soak.{run_id}.{i}",
            producer_kind="brokerclient" if i % 4 == 3 else "httpx",
            cut=CUTS[i // 4 % len(CUTS)] if i % 4 == 1 else None,
        )
        for i in range(GENERATIONS)
    ]

    async def staggered(generation: Generation) -> None:
        await asyncio.sleep(generation.index * GENERATION_SPACING)
        await run_generation(generation, deployment.url, rng)

    fault_task = asyncio.create_task(faults(FAULTS[fault_kind](deployment), timeline))
    lag_task = asyncio.create_task(watch_loop_lag(timeline))
    runs = [asyncio.create_task(staggered(g)) for g in generations]
    try:
        await asyncio.wait_for(asyncio.gather(fault_task, *runs), RUN_DEADLINE)
    except TimeoutError:
        timeline.note("run deadline passed")
    lag_task.cancel()
    problems = list(timeline.failures)
    for generation in generations:
        if generation.failure:
            problems.append(f"g{generation.index} {generation.failure}")
        for viewer in generation.viewers:
            problems += viewer.problems(generation.topic)
        problems += id_problems(generation)
        problems += log_problems(deployment.redis.port, generation.topic)
    stats = summary(generations)
    return problems, timeline, stats


def summary(generations: list[Generation]) -> str:
    viewers = [v for g in generations for v in g.viewers]
    breaks: dict[str, int] = {}
    for reason in (b for g in generations for b in g.breaks):
        breaks[reason] = breaks.get(reason, 0) + 1
    return (
        f"{len(generations)} generations, producer attempts "
        f"{sum(g.attempts for g in generations)} {breaks}, {len(viewers)} viewers, "
        f"{sum(v.connections for v in viewers)} connections, {sum(v.cuts for v in viewers)} cuts"
    )


def soak_on_new_deployment(
    seed: int, ports: list[int], workdir: Path, fault_kind: str = "usual"
) -> tuple[list[str], str]:
    """One soak on a new deployment: its problems, and a report of the run."""
    started = time.monotonic()
    deployment = start_deployment(ports, workdir)
    try:
        problems, timeline, stats = asyncio.run(soak(deployment, seed, fault_kind))
    finally:
        deployment.close()
    took = time.monotonic() - started
    report = f"seed {seed}: {took:.1f} s, {stats}, {len(problems)} problems ({workdir})"
    if problems:
        report += "\n" + "\n".join(problems[:40]) + f"\n{timeline}"
    return problems, report


def run_once(seed: int, ports: list[int], fault_kind: str) -> bool:
    workdir = Path(tempfile.mkdtemp(prefix="llm-soak-"))
    problems, report = soak_on_new_deployment(seed, ports, workdir, fault_kind)
    print(report)
    if not problems:
        shutil.rmtree(workdir, ignore_errors=True)  # (a failed run's logs are kept)
    return not problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--faults", choices=sorted(FAULTS), default="usual")
    args = parser.parse_args()
    port_base = int(os.environ.get("SOAK_PORT_BASE", "47800"))
    ports = [port_base + i for i in range(5)]
    failed = 0
    for run in range(args.runs):
        seed = args.seed + run if args.seed is not None else random.randrange(1 << 30)
        failed += not run_once(seed, ports, args.faults)
    print(f"{args.runs - failed}/{args.runs} runs passed")
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
