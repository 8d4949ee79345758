"""Hunt: the LLM use case across real Redis Sentinel failovers, some of which lose writes.

A primary, one replica and three Sentinels (quorum 2, down after 1 s), two real
brokers reaching them by a ``redis+sentinel://`` URL (publish durability ``leader``,
the default: a failover can lose acknowledged writes, and that is what is hunted).
Twenty generations, each on its own topic:

- most stream their tokens by one ingest with an ``Idempotency-Key`` and
  ``?close=true``, resending the whole body under the same key on a broken
  connection or a 502/503/504, as README says;
- some publish each token by a single POST with a key of its own (retried the same
  way), closing with the last;
- some stream by an ingest WITHOUT a key (sent once: a resend would store it twice).

Each generation is watched, from before its first token, by an httpx-sse viewer
whose connection is cut at random and resumed with ``Last-Event-ID`` on either
broker, and by a brokerclient ``AsyncSubscriber``. Both go on after a ``broker.gap``.

Two faults per run, one after the other (each once the group is whole again):

- ``clean``: ``SENTINEL FAILOVER`` (the replica in sync);
- ``kill-behind``: the replica's link to the primary is cut and cannot come back
  (``masterauth`` set wrong on it), writes go on a moment, the primary is SIGKILLed;
  the replica, without those writes, is promoted; the old primary restarts (empty)
  and the Sentinels make it a replica;
- ``stop-behind``: the same, the primary SIGSTOPped instead, and let go (SIGCONT)
  once the replica is promoted: it is still a primary until the Sentinels demote it.

The checks, against each topic's log as the last primary holds it:

- per viewer: every event it got is the log's next one, or a told gap came first;
  an event it got that the log no longer holds (lost by a failover) is followed by
  a gap before anything of the log; it ends with the log's broker.end. A gap told
  where no loss is known is reported as a lesser finding (a note).
- per keyed producer: what it was told stored (its final ids) is the log, tokens
  0..N-1 once each, in order; a keyed POST acknowledged and then lost must have been
  told as a gap to every viewer that went past its place.
- keyless ingests: what the producer was told against the log (a note: a failover
  that loses lines of a keyless ingest is known to go untold to its producer).

Run it (not collected; ports 48000-48019 by default, HUNT_PORT_BASE to move them):

    PYTHONPATH=. .venv/bin/python -m tests.soak.failover_hunt --runs 10
    PYTHONPATH=. .venv/bin/python -m tests.soak.failover_hunt --faults kill-behind,stop-behind

Each run takes some 30-40 s. A failed run prints its problems and keeps its logs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis
from httpx_sse import aconnect_sse

from broker import constants as c
from brokerclient import AsyncSubscriber
from tests.e2e.brokers import broker_environment, broker_executable
from tests.soak.llm_soak import TLS, CuttingTransport, Timeline, Viewer, compress, token_line
from tests.support.polling import wait_until
from tests.support.procs import ManagedProcess, http_status, tail
from tests.support.redis_server import REDIS_SERVER, RedisServer, redis_ping

GENERATIONS = 20
TOKENS = 80
TOKEN_INTERVAL = 0.03
GENERATION_SPACING = 0.6
RUN_DEADLINE = 120.0
VIEWER_GRACE = 8.0  # after the faults: a viewer still waiting then is stopped
CUT_PROBABILITY = 0.03
BEHIND_FOR = 0.6  # how long writes go on at the primary that the replica will not have
SERVICE = "mymaster"
FAULT_KINDS = ("clean", "kill-behind", "stop-behind")
WRONG_AUTH = "not-the-primary-password"  # a replica that cannot resync (see cut_replica_link)


# -- the deployment ------------------------------------------------------------------------


def rcli(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1)


class Sentinels:
    """Three ``redis-server --sentinel`` on fixed ports, monitoring the primary."""

    def __init__(self, ports: list[int], primary: int, workdir: Path) -> None:
        self.ports, self.primary_port, self.workdir = ports, primary, workdir
        self.processes: list[ManagedProcess] = []

    def start(self) -> None:
        """Each in turn (those started are in ``processes``, for ``close``)."""
        for port in self.ports:
            directory = self.workdir / f"sentinel-{port}"
            directory.mkdir(exist_ok=True)
            config = directory / "sentinel.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 3000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            process = ManagedProcess(
                f"sentinel-{port}",
                [REDIS_SERVER, str(config), "--sentinel"],
                directory / "sentinel.log",
                cwd=directory,
            )
            process.start()
            self.processes.append(process)
            redis_ping(port)

    def primary(self) -> int | None:
        """The primary's port if every Sentinel names the same one."""
        named = set()
        for port in self.ports:
            try:
                reply: Any = rcli(port).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
                )
            except (redis.RedisError, OSError):
                return None
            named.add(int(reply[1]))
        return named.pop() if len(named) == 1 else None

    def ready(self) -> bool:
        for port in self.ports:
            master: Any = rcli(port).sentinel_master(SERVICE)
            if master["num-other-sentinels"] < 2 or master["num-slaves"] < 1:
                return False
        return True

    def close(self) -> None:
        for process in self.processes:
            process.close()


class HuntBroker:
    def __init__(self, index: int, port: int, url: str, workdir: Path) -> None:
        self.index, self.port = index, port
        args = [broker_executable(), "serve", "--host", "127.0.0.1", "--port", str(port),
                "--redis-url", url, "--workers", "1"]  # fmt: skip
        self.process = ManagedProcess(
            f"broker-{index}", args, workdir / f"broker-{index}.log", env=broker_environment()
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process.start()

        def ready() -> bool:
            if not self.process.running:
                raise AssertionError(f"broker-{self.index} exited\n{tail(self.process.log_path)}")
            return http_status(f"{self.url}/readyz") == 200

        wait_until(ready, timeout=20, what=f"broker-{self.index} /readyz")


class Deployment:
    """Primary and replica, three Sentinels, two brokers: 7 ports from ``base``."""

    def __init__(self, base: int, workdir: Path) -> None:
        self.workdir = workdir
        self.servers = {
            port: RedisServer(
                appendonly=False,
                port=port,
                directory=workdir / f"redis-{port}",
                extra_args=["--repl-diskless-sync-delay", "0"],
            )
            for port in (base, base + 1)
        }
        for server in self.servers.values():
            server.directory.mkdir()
        self.sentinel_ports = [base + 2, base + 3, base + 4]
        self.sentinels: Sentinels | None = None
        url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        self.brokers = [HuntBroker(i, base + 5 + i, f"{url}/{SERVICE}", workdir) for i in range(2)]
        self.primary = base
        self.frozen: int | None = None
        self.faults = FAULTS
        self.topics: list[str] = []

    def log_port(self, topic: str) -> int:
        """The primary (every topic's log is there), as the Sentinels name it."""
        named = self.sentinels.primary() if self.sentinels else None
        return named or self.primary

    def start(self) -> None:
        primary, replica = self.servers.values()
        primary.start()
        replica.extra_args += ["--replicaof", "127.0.0.1", str(primary.port)]
        replica.start()
        self.wait_whole(primary.port)
        self.sentinels = Sentinels(self.sentinel_ports, primary.port, self.workdir)
        self.sentinels.start()
        wait_until(self.sentinels.ready, timeout=20, what="the Sentinels ready",
                   tolerate=(redis.RedisError, OSError))  # fmt: skip
        for broker in self.brokers:
            broker.start()

    def replica_of(self, primary: int) -> int:
        return next(port for port in self.servers if port != primary)

    def wait_whole(self, primary: int, timeout: float = 30) -> None:
        """Until the primary has its replica online (synced, streaming)."""

        def online() -> bool:
            info: Any = rcli(primary).info("replication")
            return info["role"] == "master" and info.get("slave0", {}).get("state") == "online"

        wait_until(online, timeout=timeout, what=f"a replica online on :{primary}",
                   tolerate=(redis.RedisError, OSError))  # fmt: skip

    def wait_promoted(self, old: int, timeout: float = 30) -> int:
        assert self.sentinels is not None
        sentinels = self.sentinels

        def promoted() -> int | None:
            port = sentinels.primary()
            if port is None or port == old:
                return None
            info: Any = rcli(port).info("replication")
            return port if info["role"] == "master" else None

        new: int = wait_until(promoted, timeout=timeout, what=f"a failover away from :{old}",
                              tolerate=(redis.RedisError, OSError))  # type: ignore[assignment]  # fmt: skip
        self.primary = new
        return new

    def close(self) -> None:
        if self.frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.frozen, signal.SIGCONT)
        for broker in self.brokers:
            broker.process.close()
        if self.sentinels is not None:
            self.sentinels.close()
        for server in self.servers.values():
            server.stop(kill=True)


# -- faults --------------------------------------------------------------------------------


def clean_failover(deployment: Deployment) -> str:
    old = deployment.primary
    deployment.wait_whole(old)
    assert deployment.sentinels is not None
    sentinel = rcli(deployment.sentinels.ports[0])
    wait_until(  # refused (NOGOODSLAVE) until the Sentinels judge the replica good again
        lambda: sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE),
        timeout=30, what="a SENTINEL FAILOVER taken", tolerate=(redis.ResponseError,),
    )  # fmt: skip
    new = deployment.wait_promoted(old)
    deployment.wait_whole(new)
    return f"clean: SENTINEL FAILOVER :{old} -> :{new}, :{old} its replica again"


def cut_replica_link(replica: int) -> None:
    """The replica loses its primary and cannot come back to it: it sends a password
    the primary has none for, so each of its reconnects fails at AUTH (and, promoted,
    it needs no link)."""
    client = rcli(replica)
    client.config_set("masterauth", WRONG_AUTH)
    client.execute_command("CLIENT", "KILL", "TYPE", "master")

    def down() -> bool:
        info: Any = client.info("replication")
        return info.get("master_link_status") == "down"

    wait_until(down, timeout=5, what=f"the link of :{replica} down")


def behind_failover(deployment: Deployment, how: str) -> str:
    old = deployment.primary
    deployment.wait_whole(old)
    replica = deployment.replica_of(old)
    cut_replica_link(replica)
    time.sleep(BEHIND_FOR)  # (the fault's shape: writes the replica will never have)
    lag = lag_bytes(old, replica)
    server = deployment.servers[old]
    assert server.process is not None
    if how == "kill":
        server.stop(kill=True)
    else:
        server.process.send_signal(signal.SIGSTOP)
        deployment.frozen = server.process.pid
    new = deployment.wait_promoted(old)
    rcli(new).config_set("masterauth", "")
    if how == "kill":
        server.start()  # empty (no AOF): the Sentinels make it the new primary's replica
    else:
        server.process.send_signal(signal.SIGCONT)
        deployment.frozen = None
    deployment.wait_whole(new, timeout=45)
    return f"{how}-behind: :{old} {how}ed {lag} bytes ahead of :{new}, which was promoted"


def lag_bytes(primary: int, replica: int) -> int:
    ahead: Any = rcli(primary).info("replication")["master_repl_offset"]
    behind: Any = rcli(replica).info("replication")["master_repl_offset"]
    return int(ahead) - int(behind)


FAULTS: dict[str, Callable[[Deployment], str]] = {
    "clean": clean_failover,
    "kill-behind": lambda d: behind_failover(d, "kill"),
    "stop-behind": lambda d: behind_failover(d, "stop"),
}


# -- what happened -------------------------------------------------------------------------


@dataclass
class Generation:
    index: int
    topic: str
    kind: str  # "ingest", "posts", "keyless"
    viewers: list[HuntViewer] = field(default_factory=list)
    told_stored: list[str] = field(default_factory=list)  # ids it was told are stored
    end_id: str | None = None
    attempts: int = 0
    breaks: list[str] = field(default_factory=list)
    failure: str | None = None
    note: str | None = None


# -- producers -----------------------------------------------------------------------------


class Tokens:
    """Tokens made once at their pace; a resend sends those made so far, then the rest."""

    def __init__(self) -> None:
        self.made: list[bytes] = []

    async def body(self) -> AsyncIterator[bytes]:
        for line in list(self.made):
            yield line
        while len(self.made) < TOKENS:
            await asyncio.sleep(TOKEN_INTERVAL)
            self.made.append(token_line(len(self.made)))
            yield self.made[-1]


RESEND = (502, 503, 504)


async def produce_ingest(generation: Generation, urls: list[str], rng: random.Random) -> None:
    """README's producer: the whole body again under the same key after a break."""
    keyed = generation.kind == "ingest"
    headers = {"Content-Type": "application/x-ndjson"}
    if keyed:
        headers["Idempotency-Key"] = f"hunt-{uuid.uuid4().hex}"
    tokens = Tokens()
    for _ in range(40):  # bounded: each break is a fault of this run
        generation.attempts += 1
        url = rng.choice(urls)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=20, verify=TLS) as client:
                response = await client.post(
                    f"/topics/{generation.topic}/events", params={"close": "true"},
                    headers=headers, content=tokens.body(),
                )  # fmt: skip
        except httpx.TransportError as error:
            generation.breaks.append(type(error).__name__)
            if not keyed:
                generation.note = f"keyless ingest broken ({error!r}), not resent"
                return
            await asyncio.sleep(0.2)
            continue
        if response.status_code in RESEND:
            generation.breaks.append(f"{response.status_code} {problem_type(response)}")
            if not keyed:
                generation.note = f"keyless ingest {response.status_code} {response.text[:200]}"
                return
            await asyncio.sleep(min(float(response.headers.get("Retry-After", "0.2")), 1.0))
            continue
        if response.status_code not in (200, 201):
            generation.failure = f"producer: {response.status_code} {response.text[:300]}"
            return
        answer = response.json()
        generation.told_stored = list(answer["ids"])
        generation.end_id = answer.get("end_id")
        return
    generation.failure = "producer: not taken in 40 attempts"


def problem_type(response: httpx.Response) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(response.json()["type"]).rsplit("#", 1)[-1]
    return ""


async def produce_posts(generation: Generation, urls: list[str], rng: random.Random) -> None:
    """One POST per token, each under its own key, retried until answered; the last closes."""
    key = uuid.uuid4().hex
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=u, timeout=10, verify=TLS))
            for u in urls
        ]
        for n in range(TOKENS):
            await asyncio.sleep(TOKEN_INTERVAL)
            last = n == TOKENS - 1
            answer = await post_until_answered(generation, rng.choice(clients), n, key, last)
            if answer is None:
                return
            generation.told_stored.append(answer["id"])
            if last:
                generation.end_id = answer.get("end_id")


async def post_until_answered(
    generation: Generation, client: httpx.AsyncClient, n: int, key: str, last: bool
) -> dict[str, Any] | None:
    body = orjson.dumps({"data": orjson.dumps({"n": n}).decode(), "event": "token"})
    params = {"close": "true"} if last else {}
    headers = {"Content-Type": "application/json", "Idempotency-Key": f"{key}-{n}"}
    for _ in range(100):  # bounded: some 20 s of retries
        generation.attempts += 1
        try:
            response = await client.post(
                f"/topics/{generation.topic}/events", params=params, headers=headers, content=body
            )
        except httpx.TransportError as error:
            generation.breaks.append(type(error).__name__)
            await asyncio.sleep(0.2)
            continue
        if response.status_code in RESEND:
            generation.breaks.append(str(response.status_code))
            await asyncio.sleep(0.2)
            continue
        if response.status_code not in (200, 201):
            generation.failure = f"post {n}: {response.status_code} {response.text[:300]}"
            return None
        return dict(response.json())
    generation.failure = f"post {n}: not taken in 100 attempts"
    return None


PRODUCERS: dict[str, Callable[[Generation, list[str], random.Random], Awaitable[None]]] = {
    "ingest": produce_ingest,
    "keyless": produce_ingest,
    "posts": produce_posts,
}


# -- viewers -------------------------------------------------------------------------------


async def view_with_httpx_sse(
    viewer: Viewer, urls: list[str], topic: str, rng: random.Random, opened: asyncio.Event
) -> None:
    """Reconnects with Last-Event-ID itself, on either broker, as EventSource does; goes
    on after a gap (a gap's id is where it resumes)."""
    last_id: str | None = None
    for _ in range(300):  # bounded: each connection is a cut or a fault of this run
        url = rng.choice(urls)
        viewer.connections += 1
        headers = {"Last-Event-ID": last_id} if last_id else {}
        params = {} if last_id else {"from": "earliest"}
        try:
            async with (
                httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(20, connect=3)) as client,
                aconnect_sse(
                    client, "GET", f"/topics/{topic}/events", params=params, headers=headers
                ) as source,
            ):
                status = source.response.status_code
                viewer.visits.append(f"{time.time():.3f} {url[-6:]} {status} from {last_id}")
                if status == 204:
                    if not viewer.received or viewer.received[-1][0] != "broker.end":
                        viewer.failure = f"204 before its broker.end (last id {last_id})"
                    return
                if status != 200:
                    viewer.errors.append(f"{time.monotonic():.2f} {status}")
                    await asyncio.sleep(0.2)
                    continue
                opened.set()
                async for sse in source.aiter_sse():
                    if not sse.data:
                        continue
                    viewer.received.append((sse.event, sse.id, sse.data))
                    last_id = sse.id
                    if sse.event == "broker.end":
                        return
                    if rng.random() < CUT_PROBABILITY:
                        viewer.cuts += 1
                        viewer.visits.append(f"{time.time():.3f} cut")
                        break
        except httpx.TransportError as error:
            viewer.errors.append(f"{time.monotonic():.2f} {error!r}")
            viewer.visits.append(f"{time.time():.3f} broken {error!r}")
            await asyncio.sleep(0.1)
    viewer.failure = "no broker.end after 300 connections"


async def view_with_brokerclient(
    viewer: Viewer, urls: list[str], topic: str, rng: random.Random
) -> None:
    client = httpx.AsyncClient(
        base_url=rng.choice(urls), timeout=httpx.Timeout(20, connect=3),
        transport=CuttingTransport(viewer, rng),
    )  # fmt: skip
    async with (
        client,
        AsyncSubscriber(
            topic, str(client.base_url), from_earliest=True, give_up_after=40, client=client
        ) as subscriber,
    ):
        async for e in subscriber:
            viewer.received.append((e.event or "message", e.id or "", e.data))
            if e.is_end:
                return


# -- one generation ------------------------------------------------------------------------


async def settle(tasks: list[asyncio.Task[None]], faults_over: asyncio.Event) -> None:
    """A log whose end a failover lost (or a keyless ingest that broke) never ends: its
    viewers are given until the faults are over and VIEWER_GRACE more, then stopped."""
    done_at: float | None = None
    for _ in range(int(RUN_DEADLINE / 0.5)):  # bounded: the run's deadline
        _, pending = await asyncio.wait(tasks, timeout=0.5)
        if not pending:
            return
        if faults_over.is_set() and done_at is None:
            done_at = time.monotonic()
        if done_at is not None and time.monotonic() - done_at > VIEWER_GRACE:
            return


@dataclass
class HuntViewer(Viewer):
    stopped: bool = False  # still waiting when its time was up


async def run_generation(
    generation: Generation, urls: list[str], rng: random.Random, faults_over: asyncio.Event
) -> None:
    first = HuntViewer(f"g{generation.index}-{generation.kind}-httpx-sse")
    second = HuntViewer(f"g{generation.index}-{generation.kind}-brokerclient")
    generation.viewers += [first, second]
    opened = asyncio.Event()
    tasks = [
        asyncio.create_task(view_with_httpx_sse(first, urls, generation.topic, rng, opened)),
        asyncio.create_task(view_with_brokerclient(second, urls, generation.topic, rng)),
    ]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(opened.wait(), 5)  # subscribed before the first token
    try:
        await PRODUCERS[generation.kind](generation, urls, rng)
    except Exception as error:
        generation.failure = f"producer raised {error!r}"
    await settle(tasks, faults_over)
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for viewer, result in zip(generation.viewers, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            viewer.stopped = True
        elif isinstance(result, BaseException) and viewer.failure is None:
            viewer.failure = f"raised {result!r} after {viewer.errors[-6:]}"


# -- the checks ----------------------------------------------------------------------------


@dataclass
class Log:
    """A topic's log as the last primary holds it: raw stream ids, types, token numbers."""

    epoch: str
    ids: list[str]
    kinds: list[str]
    tokens: list[int]

    @classmethod
    def read(cls, port: int, topic: str) -> Log:
        client = rcli(port)
        entries: Any = client.xrange(c.log_key(topic))
        epoch = (client.hget(c.meta_key(topic), "epoch") or b"").decode()  # type: ignore[union-attr]
        ids, kinds, tokens = [], [], []
        for raw_id, fields in entries:
            ids.append(raw_id.decode())
            kind = fields.get(b"e", b"").decode()
            kinds.append(kind)
            if kind == "token":
                tokens.append(token_number(fields[b"d"]))
        return cls(epoch, ids, kinds, tokens)

    @property
    def ends(self) -> bool:
        return bool(self.kinds) and self.kinds[-1] != "token"

    def full_id(self, i: int) -> str:
        return f"{self.epoch}.{self.ids[i]}"


def token_number(data: bytes | str) -> int:
    value = orjson.loads(data)
    if isinstance(value, str):  # (a POST's data is a JSON string of the token)
        value = orjson.loads(value)
    return int(value["n"])


def token_at(log: Log, i: int) -> int:
    """The token number of entry ``i`` (-1 before the first); the end follows the last."""
    if i < 0:
        return -1
    if log.kinds[i] != "token":
        return max(log.tokens, default=-1) + 1
    return log.tokens[sum(1 for k in log.kinds[:i] if k == "token")]


def stream_order(raw: str) -> tuple[int, int]:
    ms, seq = raw.split("-")
    return int(ms), int(seq)


def losses(generation: Generation, log: Log) -> list[str]:
    """Ids of this log's epoch seen or acknowledged that the log no longer holds: lost."""
    held = set(log.ids)
    known = {i for v in generation.viewers for _, i, _ in v.received if i}
    known |= set(generation.told_stored)
    lost = []
    for full in known:
        epoch, _, raw = full.partition(".")
        if "-" in raw and (epoch != log.epoch or raw not in held):
            lost.append(raw)
    return sorted(set(lost), key=stream_order)


def lost_between(lost: list[str], after: str | None, before: str) -> list[str]:
    low = stream_order(after) if after else (0, 0)
    high = stream_order(before)
    return [raw for raw in lost if low < stream_order(raw) < high]


def needless_gap(viewer: HuntViewer, pos: int, data: str, known_loss: bool) -> list[str]:
    """A gap told where nothing is known lost: a lesser finding."""
    if known_loss:
        return []
    return [f"{viewer.name}: a gap told after entry {pos}, nothing known lost: {data}"]


def viewer_problems(viewer: HuntViewer, log: Log, lost: list[str]) -> tuple[list[str], list[str]]:
    """(problems, notes) of one viewer against the log. An event the log does not hold
    (lost with an old primary, or of a log lost whole) must be followed by a gap before
    anything of the log; a step past a known lost id must be a told one."""
    if viewer.failure:
        return [f"{viewer.name}: {viewer.failure}"], []
    index = {raw: i for i, raw in enumerate(log.ids)}
    problems, notes = [], []
    pos, told, delivered_lost = -1, False, 0
    for kind, full, data in viewer.received:
        epoch, _, raw = full.partition(".")
        if kind == "broker.gap":
            notes += needless_gap(viewer, pos, data, delivered_lost or bool(lost))
            told, delivered_lost = True, 0
            continue
        if epoch != log.epoch or raw not in index:
            delivered_lost += 1  # delivered, then lost with the old primary
            continue
        i = index[raw]
        previous = log.ids[pos] if pos >= 0 else None
        if delivered_lost and not told:
            problems.append(
                f"{viewer.name}: got {delivered_lost} events since lost, then entry {i} "
                "with no gap between (silent)"
            )
        elif i <= pos:
            problems.append(f"{viewer.name}: entry {i} again (or out of order) after {pos}")
        elif i > pos + 1 and not told:
            problems.append(f"{viewer.name}: skipped entries {pos + 1}..{i - 1} silently")
        elif not told and token_at(log, i) != token_at(log, pos) + 1:
            # (the next entry of a POSTs' log whose acknowledged events between were lost)
            skipped = lost_between(lost, previous, raw)
            problems.append(
                f"{viewer.name}: went from token {token_at(log, pos)} to {token_at(log, i)} "
                f"past {len(skipped)} lost ids with no gap"
            )
        elif not told and lost_between(lost, previous, raw):
            # Lost ids it never saw, their tokens stored again since (an ingest's resend):
            # it missed nothing.
            notes.append(f"{viewer.name}: passed lost ids it never saw; no token missed")
        pos, told, delivered_lost = max(pos, i), False, 0
    return problems + end_problems(viewer, log, pos), notes


def end_problems(viewer: HuntViewer, log: Log, pos: int) -> list[str]:
    """It ends with the log's end; a log whose end was lost, with the log's last entry."""
    ended = bool(viewer.received) and viewer.received[-1][0] == "broker.end"
    if log.ends and not ended:
        return [f"{viewer.name}: did not end with broker.end ({viewer.errors[-3:]})"]
    if pos != len(log.ids) - 1 and not (ended and not log.ends):
        return [f"{viewer.name}: stopped at entry {pos} of {len(log.ids)}"]
    return []


def producer_problems(
    generation: Generation, log: Log, lost: list[str]
) -> tuple[list[str], list[str]]:
    """Keyed producers: the log holds what they were told stored, once, in order; what a
    failover lost after it was acknowledged (publish durability ``leader``) is a note."""
    name = f"g{generation.index}-{generation.kind}"
    if generation.failure:
        return [f"{name}: {generation.failure}"], []
    problems, notes = [], []
    token_ids = [log.full_id(i) for i, k in enumerate(log.kinds) if k == "token"]
    ends = [i for i, k in enumerate(log.kinds) if k != "token"]
    if ends not in ([], [len(log.kinds) - 1]):
        problems.append(f"{name}: log's non-token entries at {ends} of {len(log.kinds)}")
    told = generation.told_stored
    kept = [i for i in told if i in set(token_ids)]
    if generation.kind != "keyless":
        if log.tokens != sorted(set(log.tokens)):
            problems.append(f"{name}: log tokens {compress(log.tokens)} (repeat or reorder)")
        if generation.kind == "ingest" and log.tokens != list(range(len(log.tokens))):
            problems.append(f"{name}: log tokens {compress(log.tokens)} (a hole)")
        if kept != token_ids:
            problems.append(f"{name}: the log holds tokens it was not told stored, or reordered")
        if len(kept) < len(told) or (generation.end_id and not log.ends):
            notes.append(
                f"{name}: acknowledged then lost by a failover: {len(told) - len(kept)} tokens"
                f"{'' if log.ends else ' and the end'} (log tokens {compress(log.tokens)})"
            )
    elif generation.note or len(kept) != len(told) or log.tokens != list(range(TOKENS)):
        notes.append(
            f"{name}: {generation.note or 'answered'}: told {len(told)} stored, "
            f"{len(told) - len(kept)} of them lost; log tokens {compress(log.tokens)}"
            f"{'' if log.ends else ', no end'}"
        )
    if generation.end_id and log.ends and generation.end_id != log.full_id(len(log.ids) - 1):
        problems.append(f"{name}: told end {generation.end_id}, log ends {log.full_id(-1)}")
    return problems, notes


# -- a run ---------------------------------------------------------------------------------


def kind_of(index: int) -> str:
    return {8: "posts", 9: "keyless", 4: "posts", 6: "keyless"}.get(index % 10, "ingest")


async def faults(
    deployment: Any, kinds: list[str], timeline: Timeline, over: asyncio.Event
) -> None:
    try:
        await asyncio.sleep(3.0)  # generations under way
        await each_fault(deployment, kinds, timeline)
    finally:
        over.set()


async def each_fault(deployment: Any, kinds: list[str], timeline: Timeline) -> None:
    for kind in kinds:
        try:
            timeline.note(await asyncio.to_thread(deployment.faults[kind], deployment))
        except Exception as error:
            timeline.failures.append(f"fault {kind} failed: {error!r}")
            timeline.note(timeline.failures[-1])
            return


async def hunt(deployment: Any, seed: int, kinds: list[str]) -> tuple[list[str], list[str], str]:
    """The generations and the faults on ``deployment`` (a Sentinel one here, a Cluster
    one in cluster_hunt.py: its ``brokers``, ``faults`` by kind, ``workdir``, and
    ``log_port(topic)``, the node that holds a topic's log once the faults are over)."""
    rng = random.Random(seed)
    timeline = Timeline()
    run_id = uuid.uuid4().hex[:6]
    generations = [
        Generation(index=i, topic=f"hunt.{run_id}.{i}", kind=kind_of(i)) for i in range(GENERATIONS)
    ]
    deployment.topics = [g.topic for g in generations]
    urls = [b.url for b in deployment.brokers]

    async def staggered(generation: Generation) -> None:
        await asyncio.sleep(generation.index * GENERATION_SPACING)
        await run_generation(generation, urls, rng, faults_over)

    faults_over = asyncio.Event()
    fault_task = asyncio.create_task(faults(deployment, kinds, timeline, faults_over))
    runs = [asyncio.create_task(staggered(g)) for g in generations]
    try:
        await asyncio.wait_for(asyncio.gather(fault_task, *runs), RUN_DEADLINE)
    except TimeoutError:
        timeline.failures.append("run deadline passed")
    problems, notes = list(timeline.failures), []
    for generation in generations:
        port = await asyncio.to_thread(deployment.log_port, generation.topic)
        log = Log.read(port, generation.topic)
        lost = losses(generation, log)
        found, told = producer_problems(generation, log, lost)
        problems += found
        notes += told
        for viewer in generation.viewers:
            found, told = viewer_problems(viewer, log, lost)
            problems += found
            notes += told
        if lost:
            notes.append(f"g{generation.index}: {len(lost)} known ids lost")
    if problems:
        dump: dict[str, Any] = {
            g.topic: {v.name: v.received for v in g.viewers} for g in generations
        }
        dump["told"] = {g.topic: [g.told_stored, g.end_id, g.breaks] for g in generations}
        dump["visits"] = {g.topic: {v.name: v.visits for v in g.viewers} for g in generations}
        (deployment.workdir / "received.json").write_bytes(orjson.dumps(dump))
    breaks: dict[str, int] = {}
    for reason in (b for g in generations for b in g.breaks):
        breaks[reason] = breaks.get(reason, 0) + 1
    stats = f"faults {kinds}, producer breaks {breaks}\n{timeline}"
    return problems, notes, stats


def run_once(
    seed: int, base: int, kinds: list[str], make: Callable[[int, Path], Any] | None = None
) -> bool:
    """One run on a new deployment (``make(base, workdir)``, Sentinel's by default)."""
    workdir = Path(tempfile.mkdtemp(prefix="failover-hunt-"))
    started = time.monotonic()
    deployment = (make or Deployment)(base, workdir)
    try:
        try:
            deployment.start()
        except (TimeoutError, AssertionError) as error:
            # (a port of the range taken a moment, as a client's ephemeral port: the
            # range lies in Linux's ephemeral one)
            print(f"seed {seed}: the deployment did not start: {error!r} ({workdir})")
            return False
        problems, notes, stats = asyncio.run(hunt(deployment, seed, kinds))
    finally:
        deployment.close()
    print(f"seed {seed}: {time.monotonic() - started:.1f} s, {len(problems)} problems, "
          f"{len(notes)} notes ({workdir})\n{stats}")  # fmt: skip
    for line in problems[:40]:
        print("PROBLEM", line)
    for line in notes[:40]:
        print("note", line)
    if not problems:
        shutil.rmtree(workdir, ignore_errors=True)
    return not problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--faults", default=None, help="comma-separated, of " + ", ".join(FAULTS))
    args = parser.parse_args()
    base = int(os.environ.get("HUNT_PORT_BASE", "48000"))
    failed = 0
    for run in range(args.runs):
        seed = args.seed + run if args.seed is not None else random.randrange(1 << 30)
        if args.faults:
            kinds = args.faults.split(",")
        else:
            kinds = [FAULT_KINDS[run % 3], FAULT_KINDS[(run + 1) % 3]]
        failed += not run_once(seed, base, kinds)
    print(f"{args.runs - failed}/{args.runs} runs passed")
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
