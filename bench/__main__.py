"""`python -m bench`: measure the broker and the hand-written baseline, print a table.

Each scenario starts its own redis-server and server (2 workers) on loopback, drives
it from a pool of load-generator processes, and reads CPU and memory from /proc. The
table goes to stdout, progress to stderr, and everything to a JSON file. Timings never
make it exit non-zero; a scenario that cannot run at all does.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from bench import floor, gc_compare, lifecycle_scenarios, nchan, scenarios, servers, threeway
from bench.config import BROKER_ONLY, NOT_FOR_NCHAN, SCENARIOS, Sizes, server_env, sizes_for
from bench.loadgen import LoadGenerators
from bench.measure import Outcome
from bench.procstats import other_load, raise_open_files_limit
from bench.profiling import Profiler
from bench.progress import say
from bench.report import Results, auth_rows, render_auth_table, render_table, rows, write_json

SCENARIO_FUNCTIONS = scenarios.SCENARIO_FUNCTIONS | lifecycle_scenarios.SCENARIO_FUNCTIONS
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"
SCENARIO_TIMEOUT_S = {True: 90.0, False: 240.0}
QUIET_WAIT_S = {True: 0.0, False: 10.0}
QUIET_CORES = 0.2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="run this scenario")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--skip-baseline", action="store_true", help="leave out the baseline")
    parser.add_argument("--skip-broker", action="store_true", help="leave out the broker")
    parser.add_argument(
        "--skip-nchan", action="store_true", help="leave out Nchan (nginx + libnginx-mod-nchan)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        metavar="S",
        help="wait up to S seconds before each scenario for other processes to go quiet "
        "(default 10, 0 with --quick)",
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="also measure the broker with authorization on (HS256), side by side",
    )
    parser.add_argument(
        "--gc-compare",
        action="store_true",
        help="also measure the broker with CPython's GC defaults (BROKER_GC_TUNING=false)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure the floor: a bare uvloop + httptools server, one XADD a publish "
        "(publish-single only; bench/floor.py)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the server workers (flame graphs by --json)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SIZE=VALUE",
        help="override one size of bench/config.py's Sizes, e.g. --set sessions_concurrent=100",
    )
    return parser.parse_args(argv)


def _sizes(args: argparse.Namespace, target: str, quick: bool) -> Sizes:
    """The sizes for a target, with the --set overrides (typed as the field they set)."""
    sizes = sizes_for(target, quick)
    for assignment in args.set:
        name, _, value = assignment.partition("=")
        if name not in {f.name for f in dataclasses.fields(Sizes)}:
            raise SystemExit(f"--set: no size named {name!r} (see bench/config.py)")
        sizes = dataclasses.replace(sizes, **{name: type(getattr(sizes, name))(value)})
    return sizes


def chosen_targets(args: argparse.Namespace) -> list[servers.Target]:
    targets = []
    if not args.skip_broker:
        targets.append(servers.BROKER)
        if args.auth:
            targets.append(servers.BROKER_AUTH)
        if args.gc_compare:
            targets.append(gc_compare.BROKER_GC_DEFAULT)
    if not args.skip_baseline:
        targets.append(servers.BASELINE)
    if not args.skip_nchan:
        targets.append(nchan.NCHAN)
    if args.floor:
        targets.append(floor.FLOOR)
    return targets


def broker_missing() -> str | None:
    script = Path(sys.executable).parent / "broker"
    if not script.exists() or not (servers.REPO / "api" / "cli.py").exists():
        return f"the broker is not installed ({script} or api/cli.py is missing)"
    return None


async def run_scenario(
    target: servers.Target, name: str, pool: LoadGenerators, args: argparse.Namespace, log_dir: Path
) -> Outcome:
    sizes = _sizes(args, target.name, args.quick)
    other = await wait_for_quiet(
        args.quiet_wait if args.quiet_wait is not None else QUIET_WAIT_S[args.quick]
    )
    say(f"{target.name}: {name}: starting redis-server and the server")
    server = servers.start(target, log_dir, server_env(name, sizes))
    profiler = (
        Profiler(server.pid, args.json.parent, f"{target.name}-{name}") if args.profile else None
    )
    try:
        scenario = SCENARIO_FUNCTIONS[name](server, pool, sizes)
        outcome = await asyncio.wait_for(scenario, SCENARIO_TIMEOUT_S[args.quick])
    except Exception as error:
        tail = server.log_tail()
        raise RuntimeError(f"{type(error).__name__}: {error}\nserver log:\n{tail}") from error
    finally:
        profile = profiler.stop() if profiler else None
        server.stop()
    outcome.details["other_load_before_cores"] = round(other, 3)
    if profile is not None:
        outcome.details["profile_hottest_frames"] = profile
    return outcome


async def wait_for_quiet(max_wait_s: float) -> float:
    """Wait (bounded) until other processes leave the cores alone; the load last seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = await asyncio.to_thread(other_load, 1.0 if max_wait_s > 0 else 0.2)
        if load < QUIET_CORES or time.monotonic() >= deadline:
            return load
        say(f"waiting for the machine to quieten: other processes use {load:.2f} cores")


def _not_run(target: servers.Target, name: str) -> str | None:
    """Why a target does not run a scenario, or None when it does."""
    if target is servers.BASELINE and name in BROKER_ONLY:
        return "the baseline cannot close a topic"
    if target is nchan.NCHAN and name in NOT_FOR_NCHAN:
        return "Nchan cannot close a topic"
    if target is floor.FLOOR and name not in floor.SCENARIOS:
        return "the floor only publishes"
    return None


def _outcome_dict(outcome: Outcome) -> dict[str, Any]:
    return {"figures": outcome.figures, "details": outcome.details, "warnings": outcome.warnings}


async def run_all(args: argparse.Namespace, log_dir: Path) -> tuple[Results, list[str]]:
    results: Results = {}
    errors: list[str] = []
    chosen = args.only or list(SCENARIOS)
    targets = chosen_targets(args)
    pool = LoadGenerators(max(_sizes(args, t.name, args.quick).loadgen_processes for t in targets))
    if any(t.is_broker for t in targets) and (missing := broker_missing()):
        errors.append(f"broker: {missing}")
        say(missing)
        targets = [t for t in targets if not t.is_broker]
    if nchan.NCHAN in targets and (missing := nchan.missing()):
        errors.append(f"nchan: {missing}")
        say(missing)
        targets.remove(nchan.NCHAN)
    try:
        # Scenario by scenario, so auth on and off are measured one after the other.
        for name in chosen:
            for target in targets:
                if (why := _not_run(target, name)) is not None:
                    say(f"{target.name}: {name}: not run ({why})")
                    continue
                try:
                    outcome = await run_scenario(target, name, pool, args, log_dir)
                except Exception as error:
                    errors.append(f"{target.name}: {name}: {error}")
                    say(f"{target.name}: {name}: FAILED: {error}")
                    pool.close()
                    pool = LoadGenerators(pool.size)
                    continue
                results.setdefault(target.name, {})[name] = _outcome_dict(outcome)
                for warning in outcome.warnings:
                    say(f"{target.name}: {name}: WARNING: {warning}")
    finally:
        pool.close()
    return results, errors


def sizes_notes(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """Where the baseline ran with smaller sizes than the broker, say so in its cells."""
    broker, baseline = _sizes(args, "broker", args.quick), _sizes(args, "baseline", args.quick)
    notes: dict[str, str] = {}
    if baseline.idle_subscribers != broker.idle_subscribers:
        notes["idle"] = f"(N={baseline.idle_subscribers:,})"
    if baseline.fanout_subscribers != broker.fanout_subscribers:
        notes["fanout"] = f"(N={baseline.fanout_subscribers:,})"
    if baseline.broadcast_subscribers != broker.broadcast_subscribers:
        notes["broadcast"] = f"(N={baseline.broadcast_subscribers:,})"
    if baseline.storm_clients != broker.storm_clients:
        notes["storm"] = f"(N={baseline.storm_clients:,})"
    return {"baseline": notes}


def document(args: argparse.Namespace, results: Results, errors: list[str]) -> dict[str, Any]:
    targets = [t.name for t in chosen_targets(args)]
    table = rows(results, sizes_notes(args))
    if "nchan" in targets:
        threeway.add_nchan(table, results)
    return {
        "meta": {
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "quick": args.quick,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "sizes": {t: dataclasses.asdict(_sizes(args, t, args.quick)) for t in targets},
        },
        "table": table,
        "auth_table": auth_rows(results),
        "results": results,
        "errors": errors,
    }


def print_summary(doc: dict[str, Any], json_path: Path) -> None:
    three_way = any("nchan" in row for row in doc["table"])
    print((threeway.render if three_way else render_table)(doc["table"]))
    if doc["auth_table"]:
        print()
        print(render_auth_table(doc["auth_table"]))
    for target, outcomes in doc["results"].items():
        for name, outcome in outcomes.items():
            for warning in outcome["warnings"]:
                print(f"warning: {target}: {name}: {warning}")
    if (line := floor_line(doc["results"])) is not None:
        print(line)
    for error in doc["errors"]:
        print(f"error: {error.splitlines()[0]}")
    print(f"results: {json_path}")


def floor_line(results: Results) -> str | None:
    """The broker's server CPU per publish beside the floor's, when both were measured."""
    key = ("publish-single", "figures", "server_cpu_us_per_event")
    try:
        broker, least = (results[t][key[0]][key[1]][key[2]] for t in ("broker", "floor"))
    except KeyError:
        return None
    return (
        f"publish single: server CPU us/publish: broker {broker:.1f}, floor {least:.1f} "
        f"({broker / least:.1f}x): the rest is the broker's own work per request"
    )


async def main_async(args: argparse.Namespace) -> int:
    log_dir = servers.new_log_dir()
    results, errors = await run_all(args, log_dir)
    doc = document(args, results, errors)
    write_json(args.json, doc)
    print_summary(doc, args.json)
    if errors:
        print(f"server logs: {log_dir}", file=sys.stderr)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_open_files_limit()
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
