"""The scenarios. Each takes a running server and the load-generator pool, and returns
its figures (numbers for the table), details (everything else for the JSON) and warnings."""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench.config import Sizes
from bench.loadgen import LoadGenerators, Message, split
from bench.measure import Outcome, Window, redis_calls, redis_clients, worker_sockets
from bench.pacer import Pacer
from bench.procstats import TreeSample, sample_tree
from bench.progress import say
from bench.servers import HOST, RunningServer
from bench.wire import KeepAliveClient, SseSubscriber, get_request, post_request

Scenario = Callable[[RunningServer, LoadGenerators, Sizes], Awaitable[Outcome]]


def _topic(name: str) -> str:
    return f"bench.{name}.{uuid.uuid4().hex[:8]}"


def _events_path(server: RunningServer, topic: str) -> str:
    return server.target.authorized(f"/topics/{topic}/events")


def _spec(server: RunningServer, path: str, **fields: Any) -> Message:
    return {"host": HOST, "port": server.port, "path": path, **fields}


def _check_progress(messages: list[Message]) -> list[Message]:
    for message in messages:
        if "result" in message:
            raise RuntimeError("load generator failed: " + str(message["result"].get("error")))
    return messages


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _publish(server: RunningServer, path: str, events: list[Any]) -> bytes:
    """Publish `events` (each one event's data) in order, as the target takes them (one
    POST for the broker, one per event for Nchan); the last answer's body."""
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(KeepAliveClient, HOST, server.port)
    body = b""
    try:
        for payload in server.target.publish_bodies(events):
            status, body = await client.request(post_request(HOST, server.port, path, payload))
            # 201 Created; Nchan answers 202 Accepted when no subscriber is there yet.
            if status not in (201, 202):
                raise RuntimeError(f"publish answered {status}: {body[:300]!r}")
    finally:
        client.close()
    return body


# ---- fanout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Audience:
    """Who a fan-out publishes to, and how: `fanout` (many events to a thousand) and
    `broadcast` (a few events to a large audience) differ only in these numbers."""

    name: str
    subscribers: int
    sampled: int  # subscribers that record the latency of every event
    rate: float
    seconds: float

    @classmethod
    def fanout(cls, sizes: Sizes) -> Audience:
        return cls(
            "fanout", sizes.fanout_subscribers, sizes.fanout_sampled,
            sizes.fanout_rate, sizes.fanout_seconds,
        )  # fmt: skip

    @classmethod
    def broadcast(cls, sizes: Sizes) -> Audience:
        # Every subscriber records latency: at 2 events/s the load generator can afford a
        # wake-up per event, and a broadcast's p99 is about the last sockets served.
        return cls(
            "broadcast", sizes.broadcast_subscribers, sizes.broadcast_subscribers,
            sizes.broadcast_rate, sizes.broadcast_events / sizes.broadcast_rate,
        )  # fmt: skip


def _fanout_specs(
    server: RunningServer,
    path: str,
    pool: LoadGenerators,
    sizes: Sizes,
    audience: Audience,
    count: int,
) -> list[Message]:
    counts = split(audience.subscribers, pool.size)
    sampled = split(audience.sampled, pool.size)
    options = {"concurrency": sizes.connect_concurrency, "sweep_s": sizes.fanout_sweep_s}
    return [
        _spec(server, path, count=n, sampled=s, expected=count, **options)
        for n, s in zip(counts, sampled, strict=True)
    ]


async def fanout(server: RunningServer, pool: LoadGenerators, sizes: Sizes) -> Outcome:
    return await _fan_out(server, pool, sizes, Audience.fanout(sizes))


async def broadcast(server: RunningServer, pool: LoadGenerators, sizes: Sizes) -> Outcome:
    return await _fan_out(server, pool, sizes, Audience.broadcast(sizes))


async def _fan_out(
    server: RunningServer, pool: LoadGenerators, sizes: Sizes, audience: Audience
) -> Outcome:
    outcome = Outcome()
    name = audience.name
    path = _events_path(server, _topic(name))
    count = round(audience.rate * audience.seconds)
    say(f"{name}: connecting {audience.subscribers} subscribers")
    specs = _fanout_specs(server, path, pool, sizes, audience, count)
    pool.start_job("fanout", specs)
    connected = _check_progress(await pool.gather())
    subscribed = sum(m["connected"] for m in connected)
    outcome.details["subscribed"] = subscribed
    outcome.details["sockets_per_server_process"] = worker_sockets(server)
    if subscribed < audience.subscribers:
        outcome.warnings.append(f"only {subscribed} of {audience.subscribers} subscribed")
    settle = Window(server)
    await asyncio.sleep(1.0)  # let every subscription reach its blocking read
    settle.close()
    # What holding the audience costs with nothing to deliver (timers, heartbeats): it
    # is billed to the deliveries of the window that follows, so it is shown apart.
    outcome.details["idle_server_cores_before"] = round(settle.server_cpu_s / settle.seconds, 3)
    say(f"{name}: publishing {count} events at {audience.rate:g}/s to {subscribed} subscribers")
    window = Window(server)
    pool.broadcast({"go": True})
    pacer = Pacer(HOST, server.port, path, encode=server.target.publish_bodies)
    deadline = time.monotonic() + audience.seconds + sizes.grace_s
    await pacer.run(audience.rate, count, deadline)
    outcome.details |= {"published": pacer.acknowledged, "publish_failed": pacer.failed}
    outcome.details["publish_failures"] = dict(pacer.failures)
    outcome.details["publish_rate_offered"] = pacer.sent / (time.monotonic() - window.tree0.at)
    say(f"{name}: waiting for every subscriber to receive every event")
    pool.broadcast({"grace_s": sizes.grace_s, "expected": pacer.acknowledged})
    results = _measured(await pool.gather())
    window.close()
    # The subscribers disconnect after the window: tearing down thousands of streams is
    # not a delivery's cost (nor is connecting them); shown apart, per subscriber.
    teardown = Window(server)
    held = sum(worker_sockets(server).values())
    pool.broadcast({"disconnect": True})
    await pool.results()
    await _until_sockets_close(server, held - subscribed)
    teardown.close()
    outcome.details["teardown_server_cpu_us_per_subscriber"] = round(
        1e6 * teardown.server_cpu_s / max(subscribed, 1), 1
    )
    _publish_warnings(outcome, count, pacer)
    _fanout_figures(outcome, results, window, pacer.acknowledged * subscribed)
    window.account(outcome, results)
    return outcome


def _measured(messages: list[Message]) -> list[Message]:
    """The fanout jobs' measurements; raise if a load generator failed instead."""
    for message in messages:
        if "measured" not in message:
            error = message.get("result", {}).get("error", message)
            raise RuntimeError(f"load generator failed: {error}")
    return [message["measured"] for message in messages]


async def _until_sockets_close(server: RunningServer, before: int, timeout: float = 10.0) -> None:
    """Until the server's workers hold no more sockets than ``before``: those they held
    as the audience left, less the audience (not a count taken before it came, which
    the workers' Redis connections opened meanwhile outgrew: the wait then ran to its
    timeout). Bounded: a server slow to let go is measured as far as the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sum(worker_sockets(server).values()) > before:
        await asyncio.sleep(0.05)


def _latency_by_event(outcome: Outcome, results: list[Message]) -> None:
    """The median and p99 latency of each event, when every sampled subscriber saw every
    event (each one's latencies are in event order): a p99 made by one slow event (the
    first, a pause) looks very different from one made by the last sockets of each."""
    count = outcome.details.get("published", 0)
    per_process = [r["latencies_ms"] for r in results]
    if not count or not any(per_process) or any(len(lat) % count for lat in per_process):
        return  # (no subscriber's latency sampled: nothing by event, not a NaN to round)
    by_event: list[list[float]] = [[] for _ in range(count)]
    for latencies in per_process:
        for index, ms in enumerate(latencies):
            by_event[index % count].append(ms)
    outcome.details["latency_p50_ms_by_event"] = [round(_percentile(e, 0.5)) for e in by_event]
    outcome.details["latency_p99_ms_by_event"] = [round(_percentile(e, 0.99)) for e in by_event]


def _publish_warnings(outcome: Outcome, count: int, pacer: Pacer) -> None:
    if pacer.failed:
        outcome.warnings.append(f"{pacer.failed} publishes were not acknowledged")
    if pacer.sent < count:
        outcome.warnings.append(
            f"the server took publishes too slowly: only {pacer.sent} of {count} were sent "
            f"before the deadline ({outcome.details['publish_rate_offered']:.0f}/s)"
        )


def _fanout_figures(
    outcome: Outcome, results: list[Message], window: Window, expected: int
) -> None:
    delivered = sum(r["delivered"] for r in results)
    latencies = [ms for r in results for ms in r["latencies_ms"]]
    _latency_by_event(outcome, results)
    outcome.details |= {
        "expected_deliveries": expected,
        "delivered": delivered,
        "received": sum(r["received"] for r in results),
        "subscribers_complete": sum(r["complete"] for r in results),
        "subscribers_dropped": sum(r["dropped"] for r in results),
        "latency_samples": len(latencies),
        "server_cpu_s": window.server_cpu_s,
        "latency_p90_ms": _percentile(latencies, 0.90),
        "latency_mean_ms": statistics.fmean(latencies) if latencies else float("nan"),
    }
    outcome.figures |= {
        "deliveries_per_s": delivered / window.seconds,
        "delivered_pct": 100.0 * delivered / expected if expected else 0.0,
        "cpu_us_per_delivery": 1e6 * window.server_cpu_s / max(delivered, 1),
        "latency_p50_ms": _percentile(latencies, 0.50),
        "latency_p99_ms": _percentile(latencies, 0.99),
        "latency_max_ms": max(latencies, default=float("nan")),
    }


# ---- publish --------------------------------------------------------------------------------


def _added(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {pid: count - before.get(pid, 0) for pid, count in after.items()}


def _event(index: int) -> Message:
    return {"n": index, "msg": "hello, subscribers"}


async def _publish_rate(
    server: RunningServer, pool: LoadGenerators, sizes: Sizes, batch: int
) -> Outcome:
    outcome = Outcome()
    path = _events_path(server, _topic(f"publish{batch}"))
    bodies = server.target.publish_bodies([_event(i) for i in range(batch)])
    # A target that takes one event per request (Nchan) sends them one by one: events/s
    # is what compares.
    batch //= len(bodies)
    request = post_request(HOST, server.port, path, bodies[0])
    start_at = time.time() + 0.5
    specs = [
        _spec(
            server,
            path,
            request=request,
            connections=n,
            duration_s=sizes.publish_seconds,
            start_at=start_at,
        )
        for n in split(sizes.publish_connections, pool.size)
    ]
    say(
        f"publish: {sizes.publish_connections} keep-alive connections, "
        f"{batch} event(s) per request, {sizes.publish_seconds:g}s"
    )
    await asyncio.sleep(max(0.0, start_at - time.time() - 0.2))
    window, sockets0 = Window(server), worker_sockets(server)
    pool.start_job("publish", specs)
    await asyncio.sleep(start_at - time.time() + sizes.publish_seconds / 2)
    outcome.details["connections_per_server_process"] = _added(sockets0, worker_sockets(server))
    results = await pool.results()
    window.close()
    window.account(outcome, results)
    ok = sum(r["ok"] for r in results)
    outcome.details |= {
        "requests_ok": ok,
        "requests_failed": sum(r["failed"] for r in results),
        "events_per_request": batch,
        "server_cpu_us_per_event": 1e6 * window.server_cpu_s / max(ok * batch, 1),
    }
    if outcome.details["requests_failed"]:
        outcome.warnings.append(f"{outcome.details['requests_failed']} publish requests failed")
    outcome.figures["events_per_s"] = ok * batch / max(r["wall_s"] for r in results)
    outcome.figures["server_cpu_us_per_event"] = outcome.details["server_cpu_us_per_event"]
    return outcome


async def publish_single(server: RunningServer, pool: LoadGenerators, sizes: Sizes) -> Outcome:
    return await _publish_rate(server, pool, sizes, 1)


async def publish_batch(server: RunningServer, pool: LoadGenerators, sizes: Sizes) -> Outcome:
    return await _publish_rate(server, pool, sizes, sizes.batch_size)


# ---- idle -----------------------------------------------------------------------------------


def _same(protocol: SseSubscriber) -> SseSubscriber:
    return protocol


async def _warm_up(server: RunningServer, path: str, settle_s: float) -> None:
    """Open and close a few subscriptions so lazily created state is not billed to the idle."""
    loop = asyncio.get_running_loop()
    subscribers = []
    for _ in range(4):
        subscriber = SseSubscriber(get_request(HOST, server.port, path))
        await loop.create_connection(functools.partial(_same, subscriber), HOST, server.port)
        await asyncio.wait_for(subscriber.headers, 10)
        subscribers.append(subscriber)
    await _publish(server, path, [{"warm": True}])
    await asyncio.sleep(0.5 * settle_s)
    for subscriber in subscribers:
        subscriber.close()
    await asyncio.sleep(settle_s)


async def idle(server: RunningServer, pool: LoadGenerators, sizes: Sizes) -> Outcome:
    outcome = Outcome()
    path = _events_path(server, _topic("idle"))
    total = sizes.idle_subscribers
    await _warm_up(server, path, sizes.settle_s)
    before, clients0 = sample_tree(server.pid), redis_clients(server)
    steps = list(zip(split(total // 10, pool.size), split(total, pool.size), strict=True))
    pool.start_job(
        "idle",
        [_spec(server, path, steps=list(s), concurrency=sizes.connect_concurrency) for s in steps],
    )
    say(f"idle: connecting {total // 10} subscribers")
    tenth = sum(m["connected"] for m in _check_progress(await pool.gather()))
    await asyncio.sleep(sizes.settle_s)
    middle, clients1 = sample_tree(server.pid), redis_clients(server)
    say(f"idle: connecting up to {total} subscribers")
    pool.broadcast({"next": True})
    connected = sum(m["connected"] for m in _check_progress(await pool.gather()))
    await asyncio.sleep(2 * sizes.settle_s)  # let the server settle before reading its memory
    after, clients2 = sample_tree(server.pid), redis_clients(server)
    outcome.details["sockets_per_server_process"] = worker_sockets(server)
    pool.broadcast({"close": True})
    results = await pool.results()
    _idle_figures(outcome, before, middle, after, tenth, connected)
    outcome.details |= {
        "redis_connections": {"before": clients0, "at_tenth": clients1, "at_all": clients2},
        "subscribers_failed": sum(r["failed"] for r in results),
        "subscribers_dropped": sum(r["dropped"] for r in results),
    }
    outcome.figures["redis_connections_growth"] = float(clients2 - clients1)
    if connected < total:
        outcome.warnings.append(f"only {connected} of {total} idle subscribers connected")
    return outcome


def _idle_figures(
    outcome: Outcome,
    before: TreeSample,
    middle: TreeSample,
    after: TreeSample,
    tenth: int,
    all_: int,
) -> None:
    outcome.details |= {
        "subscribers": all_,
        "server_processes": len(after.pids),
        "rss_kb": {"before": before.rss_kb, "at_tenth": middle.rss_kb, "at_all": after.rss_kb},
        "kb_per_subscriber_marginal": (after.rss_kb - middle.rss_kb) / max(all_ - tenth, 1),
    }
    outcome.figures["kb_per_subscriber"] = (after.rss_kb - before.rss_kb) / max(all_, 1)


# ---- storm ----------------------------------------------------------------------------------


async def _prepare_storm(server: RunningServer, path: str, behind: int, marker: str) -> str:
    """Publish an anchor event and then `behind` more; return the anchor's id."""
    anchor = await _publish(server, path, [{"anchor": True}])
    events: list[dict[str, Any]] = [{"t": time.time_ns(), "i": i} for i in range(behind)]
    events[-1]["end"] = marker
    await _publish(server, path, events)
    return server.target.published_id(anchor)


async def storm(server: RunningServer, pool: LoadGenerators, sizes: Sizes) -> Outcome:
    outcome = Outcome()
    path = _events_path(server, _topic("storm"))
    marker = f"storm-end-{uuid.uuid4().hex}"
    anchor = await _prepare_storm(server, path, sizes.storm_behind, marker)
    await asyncio.sleep(0.5 * sizes.settle_s)
    calls0, window = redis_calls(server), Window(server)
    start_at = time.time() + 1.0
    specs = [
        _spec(
            server, path, count=n, marker=marker.encode(), start_at=start_at,
            timeout_s=sizes.storm_timeout_s, headers={"Last-Event-ID": anchor},
        )
        for n in split(sizes.storm_clients, pool.size)
    ]  # fmt: skip
    say(f"storm: {sizes.storm_clients} clients resume {sizes.storm_behind} events behind at once")
    pool.start_job("storm", specs)
    results = await pool.results()
    window.close()
    _storm_figures(outcome, results, sizes, _calls_delta(calls0, redis_calls(server)))
    outcome.details["server_cpu_s"] = window.server_cpu_s
    window.account(outcome, results)
    return outcome


def _calls_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta = {name: calls - before.get(name, 0) for name, calls in after.items()}
    return dict(sorted(((n, c) for n, c in delta.items() if c), key=lambda item: -item[1]))


def _storm_figures(
    outcome: Outcome, results: list[Message], sizes: Sizes, commands: dict[str, int]
) -> None:
    clients = sum(r["clients"] for r in results)
    times = [t for r in results for t in r["caught_up_s"]]
    complete = len(times) == clients
    issued = sum(commands.values())
    outcome.details |= {
        "clients": clients,
        "caught_up": len(times),
        "connect_failed": sum(r["connect_failed"] for r in results),
        "catch_up_p50_s": _percentile(times, 0.5),
        "redis_commands_by_name": commands,
    }
    if not complete:
        outcome.warnings.append(
            f"only {len(times)} of {clients} clients caught up within {sizes.storm_timeout_s:g}s"
        )
    outcome.figures |= {
        "catch_up_s": max(times) if complete else sizes.storm_timeout_s,
        "caught_up_pct": 100.0 * len(times) / max(clients, 1),
        "redis_commands": float(issued),
        "redis_commands_per_client": issued / max(clients, 1),
    }


SCENARIO_FUNCTIONS: dict[str, Scenario] = {
    "publish-single": publish_single,
    "publish-batch": publish_batch,
    "fanout": fanout,
    "broadcast": broadcast,
    "storm": storm,
    "idle": idle,
}
