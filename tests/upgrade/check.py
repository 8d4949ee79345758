"""A rolling upgrade, checked: the previous release and this one serve the same clients
on one Redis, each client's requests alternating between the two (README, Upgrading).

    make upgrade-check PREVIOUS=<git rev>      # default: the release before this one
    python -m tests.upgrade.check --previous <git rev>

Not a pytest module (nothing collects it): it exports the previous release's tree with
``git archive`` into a temporary directory (no network), starts one real redis-server and
one broker of each tree (the same python, each tree first on its own PYTHONPATH, the same
settings, which both know), and runs each check of ``tests/upgrade/scenarios.py`` twice:
begun on the previous release and taken up by this one, and the other way round. It
prints each check's verdict and exits 1 on any loss, duplicate or answer that differs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.broker_process import BrokerProcess
from tests.support.procs import tail
from tests.support.redis_server import RedisServer
from tests.upgrade.scenarios import (
    SCENARIOS,
    TTL_POLICIES,
    HoldsOnceEveryInstanceRunsIt,
    Instance,
    Scenario,
)

THIS_TREE = Path(__file__).resolve().parents[2]
DEFAULT_PREVIOUS = "6c320c8"
SCENARIO_TIMEOUT_S = 30.0
"""Each check, in each direction, bounded: a stream left waiting fails its check."""
SETTINGS = {
    "BROKER_HEARTBEAT_SECONDS": "1",
    "BROKER_TOPIC_POLICIES": json.dumps(TTL_POLICIES),  # (only the TTL check's topics)
}
"""Settings the previous release knows too (an unknown one stops a broker at start)."""


def export_tree(revision: str, into: Path) -> Path:
    """The tree of ``revision`` of this repository, as ``git archive`` gives it."""
    commit = _git("rev-parse", "--verify", "--short", f"{revision}^{{commit}}").strip()
    tree = into / commit
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(THIS_TREE), "archive", "--format=tar", commit],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True, timeout=60)
    return tree


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(THIS_TREE), *args], check=True, capture_output=True, text=True, timeout=30
    )
    return done.stdout


def imported_from(tree: Path) -> Path:
    """Where the broker's packages come from with ``tree`` first on the PYTHONPATH: it must
    be that tree (an installed copy taking precedence would check one release twice)."""
    code = "import api, broker; print(api.__file__); print(broker.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(tree)}, cwd=tree,
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    for module_file in done.stdout.split():
        if not Path(module_file).is_relative_to(tree):
            raise RuntimeError(f"with PYTHONPATH={tree} the broker is imported from {module_file}")
    return tree


def start_broker(tree: Path, redis_url: str) -> BrokerProcess:
    env = {**SETTINGS, "PYTHONPATH": str(imported_from(tree))}
    return BrokerProcess(redis_url=redis_url, env=env).start()


async def run_checks(previous: Instance, current: Instance) -> list[str]:
    """Each scenario in both directions; their verdicts' lines, printed as they come."""
    verdicts: list[str] = []
    for scenario in SCENARIOS:
        for first, second in ((previous, current), (current, previous)):
            verdicts.append(await _verdict(scenario, first, second))
            print(verdicts[-1], flush=True)
    return verdicts


async def _verdict(scenario: Scenario, first: Instance, second: Instance) -> str:
    name = f"{scenario.__name__} ({first.name} -> {second.name})"
    began = time.monotonic()
    try:
        await asyncio.wait_for(scenario(first, second), SCENARIO_TIMEOUT_S)
    except TimeoutError:
        return f"FAIL {name}: not done within {SCENARIO_TIMEOUT_S:g} s"
    except HoldsOnceEveryInstanceRunsIt as known:
        return f"once {name}: holds once every instance runs it: {known}"
    except Exception as error:  # (any error is this check's failure, said; the others run)
        return f"FAIL {name}: {type(error).__name__}: {error}"
    return f"ok   {name} ({time.monotonic() - began:.1f} s)"


async def _check(brokers: list[BrokerProcess], names: list[str]) -> list[str]:
    previous, current = brokers
    async with (
        httpx.AsyncClient(base_url=previous.url, timeout=10) as previous_client,
        httpx.AsyncClient(base_url=current.url, timeout=10) as current_client,
    ):
        return await run_checks(
            Instance(names[0], previous, previous_client, previous=True),
            Instance(names[1], current, current_client, previous=False),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--previous", default=DEFAULT_PREVIOUS, help="the release before (a git rev)"
    )
    args = parser.parse_args(argv)
    head = _git("rev-parse", "--short", "HEAD").strip()
    names = [_git("rev-parse", "--short", args.previous).strip(), f"{head}+tree"]
    print(f"upgrade check: {names[0]} beside this tree ({THIS_TREE}, HEAD {head})", flush=True)
    with tempfile.TemporaryDirectory(prefix="upgrade-check-") as scratch:
        trees = [export_tree(args.previous, Path(scratch)), THIS_TREE]
        redis = RedisServer().start()
        brokers: list[BrokerProcess] = []
        try:
            for tree in trees:
                brokers.append(start_broker(tree, redis.url))
            verdicts = asyncio.run(_check(brokers, names))
            failures = [line for line in verdicts if line.startswith("FAIL")]
            if failures:
                for name, broker in zip(names, brokers, strict=True):
                    print(f"--- the end of {name}'s broker log:\n{tail(broker.log_path)}")
        finally:
            for broker in brokers:
                broker.close()
            redis.close()
    checks = 2 * len(SCENARIOS)
    once = sum(line.startswith("once") for line in verdicts)
    print(f"{checks - len(failures)} of {checks} checks passed ({once} as the README's once)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
