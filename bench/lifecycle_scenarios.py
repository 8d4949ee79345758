"""The short-lived-topic scenarios, orchestrator side: `sessions` and `churn`.

The load-generator side is `bench/lifecycle_jobs.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from typing import Any

import orjson

from api.settings import Settings
from bench.config import Sizes, server_env
from bench.loadgen import LoadGenerators, Message, split
from bench.measure import (
    Outcome,
    Window,
    redis_command_stats,
    redis_memory_bytes,
)
from bench.progress import say
from bench.servers import HOST, RunningServer

MODES = {
    "post": "one POST per token",
    "ingest": "streaming ingest (NDJSON)",
    "direct": "direct Redis publisher (brokerclient.direct)",
}
# Each mode's CPU per token over one POST per token's, when both ran.
CPU_RATIOS = {"ingest_vs_post_cpu": "ingest", "direct_vs_post_cpu": "direct"}
TTL_POLL_S = 0.25
CHURN_END_WAIT_S = 3.0  # at most, after the window, for its last events (and ends) to arrive
WATCHED_COMMANDS = ("xread", "client|unblock", "evalsha", "xrange", "xrevrange")


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _spec(server: RunningServer, **fields: Any) -> Message:
    return {"host": HOST, "port": server.port, **fields}


def direct_options(scenario_env: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """``DirectPublisher``'s arguments from the settings the broker runs with (its
    environment and the scenario's additions, read as ``broker serve`` reads them), so
    that a direct append keeps, trims and expires as the broker's own does; and what
    the direct publisher cannot honour of them."""
    overrides: dict[str, Any] = {
        name.removeprefix("BROKER_").lower(): value for name, value in scenario_env.items()
    }
    if "topic_policies" in overrides:  # a JSON list in the environment
        overrides["topic_policies"] = orjson.loads(overrides["topic_policies"])
    # (The benchmark's brokers always run on its redis-server; its URL is theirs to set.)
    settings = Settings(**({"redis_url": "redis://127.0.0.1"} | overrides))
    options = {
        "retention_maxlen": settings.retention_maxlen,
        "retention_seconds": settings.retention_seconds,
        "idempotency_seconds": settings.idempotency_seconds,
        "topic_ttl_seconds": settings.topic_ttl_seconds,
        "topic_policies": [policy.model_dump() for policy in settings.topic_policies],
        "max_event_bytes": settings.max_event_bytes,
        "max_batch": settings.max_batch,
    }
    unhonoured = []
    if settings.publish_durability != "leader":
        unhonoured.append(
            f"the broker runs with publish_durability={settings.publish_durability}, which "
            "DirectPublisher has no setting for: its appends wait for no replica"
        )
    if settings.jwt_secret or settings.jwt_public_key or settings.jwt_jwks_url:
        unhonoured.append("the broker checks tokens; a direct append goes around them")
    return options, unhonoured


# ---- sessions -------------------------------------------------------------------------------


def _publishing_share(figures: dict[str, float]) -> None:
    """Ingest's server CPU per token for publishing alone over POST's: each less the
    direct mode's, which publishes nothing through the server and delivers the same
    tokens (delivery costs every mode alike, so it weighs on the whole ratio)."""
    post, ingest, direct = (
        figures.get(f"cpu_us_per_token_{m}") for m in ("post", "ingest", "direct")
    )
    if post is None or ingest is None or direct is None or post <= direct:
        return
    figures["ingest_vs_post_publishing_cpu"] = (ingest - direct) / (post - direct)


async def sessions(server: RunningServer, pool: LoadGenerators, sizes: Sizes) -> Outcome:
    """N generations at once, each on a new topic, by each way of publishing in turn;
    then, past the TTL, what is left in Redis."""
    outcome = Outcome()
    broker = server.target.name == "broker"
    memory0 = redis_memory_bytes(server)
    modes = [m for m in sizes.sessions_modes.split(",") if m in MODES and (broker or m == "post")]
    for mode in modes:
        await _sessions_mode(server, pool, sizes, mode, broker, outcome)
    post = outcome.figures.get("cpu_us_per_token_post")
    for key, mode in CPU_RATIOS.items():
        other = outcome.figures.get(f"cpu_us_per_token_{mode}")
        if post is not None and other is not None:
            outcome.figures[key] = other / post if post else float("nan")
    _publishing_share(outcome.figures)
    await _after_ttl(server, sizes, broker, memory0, outcome)
    return outcome


def _sessions_specs(
    server: RunningServer,
    pool: LoadGenerators,
    sizes: Sizes,
    mode: str,
    closes: bool,
    direct: dict[str, Any],
) -> list[Message]:
    counts = split(sizes.sessions_concurrent, pool.size)
    firsts = [sum(counts[:i]) for i in range(len(counts))]
    start_at = time.time() + 0.5
    return [
        _spec(
            server, mode=mode, close=closes, slots=n, first_slot=first,
            rounds=sizes.sessions_rounds, tokens=sizes.sessions_tokens,
            rate=sizes.sessions_rate, drop_fraction=sizes.sessions_drop_fraction,
            grace_s=sizes.sessions_grace_s, seed=f"{mode}:{first}",
            prefix=f"bench.sessions.{mode}.{uuid.uuid4().hex[:8]}", start_at=start_at,
            envelope=server.target.envelope, live_cursor=server.target.is_broker, **direct,
        )
        for n, first in zip(counts, firsts, strict=True)
    ]  # fmt: skip


def _direct_spec(server: RunningServer, sizes: Sizes, outcome: Outcome) -> dict[str, Any]:
    """What a load generator needs to publish straight to the scenario's Redis."""
    options, unhonoured = direct_options(server_env("sessions", sizes))
    outcome.details["direct_publisher"] = {"options": options, "not_honoured": unhonoured}
    outcome.warnings += [f"direct: {why}" for why in unhonoured]
    return {"redis_url": server.redis_server.url, "direct_options": options}


async def _sessions_mode(
    server: RunningServer,
    pool: LoadGenerators,
    sizes: Sizes,
    mode: str,
    closes: bool,
    outcome: Outcome,
) -> None:
    direct = _direct_spec(server, sizes, outcome) if mode == "direct" else {}
    specs = _sessions_specs(server, pool, sizes, mode, closes, direct)
    total = sizes.sessions_concurrent * sizes.sessions_rounds
    say(
        f"sessions ({MODES[mode]}): {sizes.sessions_concurrent} at once, {total} in all, "
        f"{sizes.sessions_tokens} tokens at {sizes.sessions_rate:g}/s each"
    )
    await asyncio.sleep(max(0.0, specs[0]["start_at"] - time.time() - 0.05))
    window, mode_outcome, stats0 = Window(server), Outcome(), redis_command_stats(server)
    pool.start_job("sessions", specs)
    results = await pool.results()
    window.close()
    commands = _commands_delta(stats0, redis_command_stats(server))
    window.account(mode_outcome, results)
    _session_figures(outcome, mode, results, window)
    outcome.details[mode] |= mode_outcome.details | {
        # Where Redis' time per token goes: the append script, the live reads, the rest.
        "redis_us_per_token_by_command": _per_token(commands, outcome.details[mode]),
    }
    outcome.warnings += [f"{mode}: {w}" for w in mode_outcome.warnings]


def _session_figures(outcome: Outcome, mode: str, results: list[Message], window: Window) -> None:
    summed = {
        key: sum(r[key] for r in results)
        for key in (
            "sessions", "exact", "ended", "dropped_and_resumed", "connects", "gaps",
            "tokens_received", "tokens_published", "publish_failed", "subscribe_failed",
            "came_back_later",
        )
    }  # fmt: skip
    latencies = [ms for r in results for ms in r["latencies_ms"]]
    late = [s for r in results for s in r["late_s"]]
    tokens = max(summed["tokens_published"], 1)
    outcome.details[mode] = summed | {
        "inexact_examples": [e for r in results for e in r["inexact_examples"]][:5],
        "publish_failures": {k: v for r in results for k, v in r["failures"].items()},
        "latency_samples": len(latencies),
        "latency_max_ms": max(latencies, default=float("nan")),
        "generation_late_p99_s": _percentile(late, 0.99),
        "server_cpu_s": window.server_cpu_s,
        "redis_cpu_s": window.costs["redis"],
        # The producers' and subscribers' side (a direct publisher's work is here).
        "load_generator_cpu_us_per_token": 1e6 * sum(r["cpu_s"] for r in results) / tokens,
    }
    if summed["came_back_later"]:
        # The broker's answer when its store did not answer a subscribe in time (the
        # pool's wait, on a saturated machine): the subscriber came back, and its
        # producer waited for it.
        outcome.warnings.append(
            f"{mode}: {summed['came_back_later']} subscribes were told to come back later"
        )
    if summed["exact"] < summed["sessions"]:
        outcome.warnings.append(
            f"{mode}: only {summed['exact']} of {summed['sessions']} sessions were exact"
        )
    outcome.figures |= {
        f"exact_pct_{mode}": 100.0 * summed["exact"] / max(summed["sessions"], 1),
        f"cpu_us_per_token_{mode}": 1e6 * window.server_cpu_s / tokens,
        f"redis_cpu_us_per_token_{mode}": 1e6 * window.costs["redis"] / tokens,
        f"latency_p50_ms_{mode}": _percentile(latencies, 0.50),
        f"latency_p99_ms_{mode}": _percentile(latencies, 0.99),
    }


async def _after_ttl(
    server: RunningServer, sizes: Sizes, expires: bool, memory0: int, outcome: Outcome
) -> None:
    """Wait (bounded) for Redis to expire every topic; the keys and memory left."""
    client = server.redis_client
    keys_before = int(client.dbsize())
    waited = 0.0
    if expires:
        say(f"sessions: waiting for the {sizes.sessions_ttl_s:g}s topic TTL ({keys_before} keys)")
        began = time.monotonic()
        deadline = began + sizes.sessions_ttl_s + sizes.sessions_grace_s
        while int(client.dbsize()) and time.monotonic() < deadline:
            await asyncio.sleep(TTL_POLL_S)
        waited = time.monotonic() - began
    keys = int(client.dbsize())
    memory = redis_memory_bytes(server)
    outcome.details["redis_after_ttl"] = {
        "ttl_s": sizes.sessions_ttl_s if expires else None,
        "keys_before": keys_before,
        "keys_after": keys,
        "waited_s": waited,
        # When what is left would go: a server without a topic TTL may still expire
        # its keys by its own rule (Nchan: its message timeout, 1h in the bench config).
        "left_keys_ttl_s": _ttl_sample(server),
        "used_memory_before_bytes": memory0,
        "used_memory_after_bytes": memory,
    }
    outcome.figures["redis_keys_after_ttl"] = float(keys)
    outcome.figures["redis_memory_kb_after_ttl"] = (memory - memory0) / 1024


def _ttl_sample(server: RunningServer, sample: int = 200) -> dict[str, Any]:
    """The TTLs of up to `sample` keys left: shortest, longest, how many have none."""
    client = server.redis_client
    ttls = [int(client.ttl(key)) for key in itertools.islice(client.scan_iter(count=100), sample)]
    expiring = [ttl for ttl in ttls if ttl >= 0]
    return {
        "sampled": len(ttls),
        "without_ttl": len(ttls) - len(expiring),
        "min": min(expiring, default=None),
        "max": max(expiring, default=None),
    }


# ---- churn ----------------------------------------------------------------------------------


async def churn(server: RunningServer, pool: LoadGenerators, sizes: Sizes) -> Outcome:
    """Topics come and go at a steady rate while `churn_live` stay open; the window is
    measured once the ramp (one topic lifetime) has filled them."""
    outcome = Outcome()
    lifetime = sizes.churn_live / sizes.churn_rate
    start_at = time.time() + 1.0
    prefix = f"bench.churn.{uuid.uuid4().hex[:8]}"
    specs = [
        _spec(
            server, rate=sizes.churn_rate / pool.size, lifetime_s=lifetime,
            events=sizes.churn_events, start_at=start_at, measure_s=sizes.churn_measure_s,
            grace_s=CHURN_END_WAIT_S, publishers=sizes.churn_publishers, prefix=f"{prefix}.{i}",
        )
        for i in range(pool.size)
    ]  # fmt: skip
    pool.start_job("churn", specs)
    say(
        f"churn: {sizes.churn_rate:g} new topics/s, {sizes.churn_live} live; "
        f"ramp {lifetime:.0f}s, then {sizes.churn_measure_s:g}s measured"
    )
    await asyncio.sleep(max(0.0, start_at + lifetime - time.time()))
    window, stats0 = Window(server), redis_command_stats(server)
    await asyncio.sleep(sizes.churn_measure_s)
    window.close()
    stats1 = redis_command_stats(server)
    results = await pool.results()
    window.account(outcome, results)
    _churn_figures(outcome, results, window, _commands_delta(stats0, stats1))
    return outcome


def _commands_delta(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, dict[str, float]]:
    delta = {}
    for name, (calls, usec) in after.items():
        calls0, usec0 = before.get(name, (0, 0))
        if calls > calls0:
            delta[name] = {
                "calls": calls - calls0,
                "usec": usec - usec0,
                "usec_per_call": (usec - usec0) / (calls - calls0),
            }
    return dict(sorted(delta.items(), key=lambda item: -item[1]["usec"]))


def _per_token(commands: dict[str, dict[str, float]], details: Message) -> dict[str, float]:
    tokens = max(details["tokens_published"], 1)
    return {name: round(stats["usec"] / tokens, 2) for name, stats in commands.items()}


def _churn_figures(
    outcome: Outcome,
    results: list[Message],
    window: Window,
    commands: dict[str, dict[str, float]],
) -> None:
    latencies = [ms for r in results for ms in r["latencies_ms"]]
    publishes = [ms for r in results for ms in r["publish_ms"]]
    deliveries = [ms for r in results for ms in r["delivery_ms"]]
    sent = sum(r["sent_in_window"] for r in results)
    received = sum(r["received_in_window"] for r in results)
    seconds = max(window.seconds, 1e-9)
    topics = sum(r["topics"] for r in results)
    live = sum(r["live_at_window_start"] or 0 for r in results)
    outcome.details |= {
        "topics_created": topics,
        "subscribe_failed": sum(r["subscribe_failed"] for r in results),
        "publish_failed": sum(r["publish_failed"] for r in results),
        "publish_failures": dict(sum((Counter(r["publish_failures"]) for r in results), Counter())),
        "ends_received": sum(r["ended"] for r in results),
        "sent_in_window": sent,
        "received_in_window": received,
        "latency_max_ms": max(latencies, default=float("nan")),
        "publish_answer_p50_ms": _percentile(publishes, 0.50),
        "publish_answer_p99_ms": _percentile(publishes, 0.99),
        "server_cpu_s": window.server_cpu_s,
        "redis_cpu_s": window.costs["redis"],
        "redis_commands": {n: commands[n] for n in WATCHED_COMMANDS if n in commands},
        "redis_commands_all": commands,
        "xread_per_s": commands.get("xread", {}).get("calls", 0) / seconds,
    }
    if not sent:
        outcome.warnings.append(
            "no event sent in the window was acknowledged in it: the server fell behind its "
            "publishers, nothing was timed"
        )
    for key in ("subscribe_failed", "publish_failed"):
        if outcome.details[key]:
            outcome.warnings.append(f"{outcome.details[key]} {key.replace('_', ' ')}")
    outcome.figures |= {
        "new_topics_per_s": sum(r["created_per_s"] for r in results),
        "live_topics": float(live),
        "delivery_p50_ms": _percentile(deliveries, 0.50),
        "delivery_p99_ms": _percentile(deliveries, 0.99),
        "latency_p50_ms": _percentile(latencies, 0.50),
        "latency_p99_ms": _percentile(latencies, 0.99),
        "delivered_pct": 100.0 * received / sent if sent else float("nan"),
        "server_cores": window.server_cpu_s / seconds,
        "redis_cores": window.costs["redis"] / seconds,
        "xread_us": commands.get("xread", {}).get("usec_per_call", float("nan")),
    }


SCENARIO_FUNCTIONS = {"sessions": sessions, "churn": churn}
