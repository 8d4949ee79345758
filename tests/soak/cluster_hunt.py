"""Hunt: the LLM use case across real Redis Cluster failovers, some of which lose writes.

failover_hunt.py's generations, producers, viewers and checks, on a Redis Cluster
of three primaries, each with one replica (``cluster-node-timeout`` 1 s), reached
by two real brokers through a ``redis+cluster://`` URL (publish durability
``leader``, the default). The faults, each on the primary of a topic being written
(one after the other, each once the cluster is whole again):

- ``clean``: ``CLUSTER FAILOVER`` on its replica (in sync, so nothing is lost);
- ``kill-behind``: the replica's link is cut and cannot come back (``masterauth``
  set wrong on it), writes go on a moment, the primary is SIGKILLed; the replica,
  without those writes, takes over; the old primary restarts (empty, its
  ``nodes.conf`` kept) and rejoins as the new primary's replica;
- ``stop-behind``: the same, the primary SIGSTOPped instead and let go (SIGCONT)
  once its replica took over: it is a primary until the cluster bus tells it
  otherwise;
- ``migrate``: the topic's slot moved to another primary by hand
  (``SETSLOT IMPORTING/MIGRATING``, ``MIGRATE``, ``SETSLOT NODE``), held split
  for a random while, sometimes longer than the brokers wait (a 503, README).

Ports (HUNT_PORT_BASE, default 48500): nodes base..base+5, their cluster bus ports
base+10..base+15 (``--cluster-port``: not port+10000), brokers base+20, base+21.

    PYTHONPATH=. .venv/bin/python -m tests.soak.cluster_hunt --runs 10
    PYTHONPATH=. .venv/bin/python -m tests.soak.cluster_hunt --faults kill-behind,migrate

Each run takes some 30-45 s. A failed run prints its problems and keeps its logs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from broker import constants as c
from tests.soak.failover_hunt import BEHIND_FOR, HuntBroker, cut_replica_link, lag_bytes, rcli
from tests.soak.failover_hunt import run_once as run_hunt
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer

REDIS_CLI = "/usr/bin/redis-cli"
NODES = 6
BUS_OFFSET = 10
BROKER_OFFSET = 20
MIGRATION_HOLDS = (3.0, 0.3, 1.0, 0.0)  # the first is past the brokers' 2 s patience
MIGRATIONS = itertools.count()
FAULT_KINDS = ("clean", "kill-behind", "stop-behind", "migrate")
TOLERATE = (redis.RedisError, OSError)


def text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


class ClusterDeployment:
    """Six nodes (three primaries, three replicas) and two brokers, on fixed ports."""

    def __init__(self, base: int, workdir: Path) -> None:
        self.workdir = workdir
        self.rng = random.Random(base ^ int(time.time()))
        self.servers: dict[int, RedisServer] = {}
        for port in range(base, base + NODES):
            args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
                    "--cluster-port", str(port + BUS_OFFSET),
                    "--repl-diskless-sync-delay", "0"]  # fmt: skip
            directory = workdir / f"redis-{port}"
            directory.mkdir()
            self.servers[port] = RedisServer(
                appendonly=False, port=port, directory=directory, extra_args=args
            )
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.servers)
        self.brokers = [HuntBroker(i, base + BROKER_OFFSET + i, url, workdir) for i in range(2)]
        self.faults: dict[str, Callable[[ClusterDeployment], str]] = FAULTS
        self.topics: list[str] = []
        self.frozen: int | None = None

    def start(self) -> None:
        for server in self.servers.values():
            server.start()
        nodes = [f"127.0.0.1:{port}" for port in self.servers]
        done = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, timeout=45, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(f"cluster create failed: {done.stdout!r} {done.stderr!r}")
        self.wait_whole()
        for broker in self.brokers:
            broker.start()

    # -- the cluster as its nodes see it

    def live(self) -> list[int]:
        return [p for p, s in self.servers.items() if s.process is not None and p != self.frozen]

    def nodes(self) -> list[dict[str, Any]]:
        """CLUSTER NODES of a live node: each node's port, id, role, master id, link."""
        for port in self.live():
            try:
                reply = rcli(port).execute_command("CLUSTER", "NODES")
            except TOLERATE:
                continue
            found = []
            for line in text(reply).splitlines():
                parts = line.split()
                found.append({
                    "id": parts[0], "port": int(parts[1].split("@")[0].rsplit(":", 1)[1]),
                    "flags": parts[2].split(","), "master": parts[3], "slots": parts[8:],
                })  # fmt: skip
            return found
        raise RuntimeError("no live node answered CLUSTER NODES")

    def slot_owner(self, slot: int) -> int:
        """The node that serves ``slot`` (CLUSTER SLOTS of a live node)."""
        for port in self.live():
            with contextlib.suppress(*TOLERATE):
                for first, last, owner, *_ in rcli(port).execute_command("CLUSTER", "SLOTS"):
                    if int(first) <= slot <= int(last):
                        return int(owner[1])
        raise RuntimeError(f"no node serves slot {slot}")

    def keyslot(self, topic: str) -> int:
        return int(rcli(self.live()[0]).execute_command("CLUSTER", "KEYSLOT", c.log_key(topic)))

    def log_port(self, topic: str) -> int:
        return self.slot_owner(self.keyslot(topic))

    def replica_of(self, master: int) -> int:
        """Its replica, as a live node sees it (raising, never StopIteration: this runs
        in a thread, and a StopIteration there never resolves the awaiting future)."""

        def named() -> int | None:
            by_port = {n["port"]: n for n in self.nodes()}
            master_id = by_port[master]["id"]
            found = [p for p, n in by_port.items() if n["master"] == master_id]
            return found[0] if found else None

        port: int = wait_until(named, timeout=10, what=f"a replica of :{master}",
                               tolerate=TOLERATE)  # type: ignore[assignment]  # fmt: skip
        return port

    def wait_whole(self, timeout: float = 45) -> None:
        """Every node up, the cluster ok everywhere, each primary streaming to a replica."""

        def whole() -> bool:
            for port in self.servers:
                info = text(rcli(port).execute_command("CLUSTER", "INFO"))
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    return False
            masters = [n for n in self.nodes() if "master" in n["flags"] and n["slots"]]
            if len(masters) != 3:
                return False
            for master in masters:
                replication: Any = rcli(master["port"]).info("replication")
                if replication.get("slave0", {}).get("state") != "online":
                    return False
            return True

        wait_until(whole, timeout=timeout, what="the cluster whole", tolerate=TOLERATE)

    def wait_taken_over(self, old: int, replica: int, timeout: float = 30) -> None:
        def taken() -> bool:
            role: Any = rcli(replica).info("replication")
            return role["role"] == "master" and bool(self.node(replica)["slots"])

        wait_until(taken, timeout=timeout, what=f":{replica} taking over :{old}",
                   tolerate=TOLERATE)  # fmt: skip

    def node(self, port: int) -> dict[str, Any]:
        return next(n for n in self.nodes() if n["port"] == port)

    def busy_master(self) -> int:
        """The primary of a topic whose generation is under way (the newest few)."""
        topic = self.rng.choice(self.topics[:3] or ["x"]) if not self.written() else \
            self.rng.choice(self.written()[-4:])  # fmt: skip
        return self.log_port(topic)

    def written(self) -> list[str]:
        """Topics with a log so far, in the order of the run."""
        found = []
        for topic in self.topics:
            with contextlib.suppress(*TOLERATE):
                if rcli(self.log_port(topic)).exists(c.log_key(topic)):
                    found.append(topic)
        return found

    def close(self) -> None:
        if self.frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.frozen, signal.SIGCONT)
        for broker in self.brokers:
            broker.process.close()
        for server in self.servers.values():
            server.stop(kill=True)


# -- faults --------------------------------------------------------------------------------


def clean_failover(deployment: ClusterDeployment) -> str:
    deployment.wait_whole()
    old = deployment.busy_master()
    replica = deployment.replica_of(old)
    rcli(replica).execute_command("CLUSTER", "FAILOVER")
    deployment.wait_taken_over(old, replica)
    deployment.wait_whole()
    return f"clean: CLUSTER FAILOVER :{old} -> :{replica}, :{old} its replica"


def behind_failover(deployment: ClusterDeployment, how: str) -> str:
    deployment.wait_whole()
    old = deployment.busy_master()
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
        deployment.frozen = old
    deployment.wait_taken_over(old, replica)
    rcli(replica).config_set("masterauth", "")
    if how == "kill":
        server.start()  # empty, its nodes.conf kept: it rejoins as the replica's replica
    else:
        server.process.send_signal(signal.SIGCONT)
        deployment.frozen = None
    deployment.wait_whole()
    return f"{how}-behind: :{old} {how}ed {lag} bytes ahead of :{replica}, which took over"


def migrate_slot(deployment: ClusterDeployment) -> str:
    """A written topic's slot to another primary, held split ``hold`` seconds."""
    deployment.wait_whole()
    topic = deployment.rng.choice(deployment.written()[-4:] or deployment.topics[:1])
    slot = deployment.keyslot(topic)
    source = deployment.slot_owner(slot)
    masters = [n for n in deployment.nodes() if "master" in n["flags"] and n["slots"]]
    target = deployment.rng.choice([n for n in masters if n["port"] != source])
    source_id = deployment.node(source)["id"]
    hold = MIGRATION_HOLDS[next(MIGRATIONS) % len(MIGRATION_HOLDS)]  # each in turn
    rcli(target["port"]).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    rcli(source).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target["id"])
    time.sleep(hold)  # (the fault's shape: a slot split that long)
    moved = move_keys(source, target["port"], slot)
    for node in masters:
        rcli(node["port"]).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target["id"])
    deployment.wait_whole()
    return f"migrate: slot {slot} ({moved} keys) :{source} -> :{target['port']}, held {hold} s"


def move_keys(source: int, target: int, slot: int) -> int:
    moved = 0
    for _ in range(100):  # bounded: a slot holds a few topics' keys
        keys: Any = rcli(source).execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10)
        if not keys:
            return moved
        rcli(source).execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        moved += len(keys)
    raise AssertionError(f"slot {slot} not emptied")


FAULTS: dict[str, Callable[[ClusterDeployment], str]] = {
    "clean": clean_failover,
    "kill-behind": lambda d: behind_failover(d, "kill"),
    "stop-behind": lambda d: behind_failover(d, "stop"),
    "migrate": migrate_slot,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--faults", default=None, help="comma-separated, of " + ", ".join(FAULTS))
    args = parser.parse_args()
    base = int(os.environ.get("HUNT_PORT_BASE", "48500"))
    failed = 0
    for run in range(args.runs):
        seed = args.seed + run if args.seed is not None else random.randrange(1 << 30)
        if args.faults:
            kinds = args.faults.split(",")
        else:
            kinds = [FAULT_KINDS[run % 4], FAULT_KINDS[(run + 1) % 4]]
        failed += not run_hunt(seed, base, kinds, make=ClusterDeployment)
    print(f"{args.runs - failed}/{args.runs} runs passed")
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
