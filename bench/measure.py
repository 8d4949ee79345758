"""What a measured window cost, and who paid: the server tree, Redis, the load generator,
and anything else on the machine (other jobs sharing it make every figure pessimistic)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.config import LOADGEN_SATURATED, MACHINE_CORES
from bench.procstats import (
    TreeSample,
    machine_busy_seconds,
    own_cpu_seconds,
    sample_tree,
    socket_count,
    tree_pids,
)
from bench.servers import RunningServer

OTHER_LOAD_WARNING_CORES = 0.25


@dataclass
class Outcome:
    """A scenario's figures (numbers for the table), details (for the JSON) and warnings."""

    figures: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def redis_cpu(server: RunningServer) -> float:
    info = server.redis_client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def redis_calls(server: RunningServer) -> dict[str, int]:
    """Calls per command so far, not counting the INFO that asks."""
    stats = server.redis_client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name != "cmdstat_info"
    }


def redis_command_stats(server: RunningServer) -> dict[str, tuple[int, int]]:
    """(calls, microseconds) per command so far, not counting INFO."""
    stats = server.redis_client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(value["calls"]), int(value["usec"]))
        for name, value in stats.items()
        if name != "cmdstat_info"
    }


def redis_memory_bytes(server: RunningServer) -> int:
    return int(server.redis_client.info("memory")["used_memory"])


def worker_sockets(server: RunningServer) -> dict[str, int]:
    """Sockets held by each process under the server's root: how connections spread
    over the workers (they share one listening socket, so the kernel need not balance)."""
    return {str(pid): socket_count(pid) for pid in tree_pids(server.pid)[1:]}


def redis_clients(server: RunningServer) -> int:
    """Connected clients, less our own connection, which asks."""
    return int(server.redis_client.info("clients")["connected_clients"]) - 1


class Window:
    """CPU of everyone involved between `Window(server)` and `close()`."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.tree0 = sample_tree(server.pid)
        self.redis0 = redis_cpu(server)
        self.machine0 = machine_busy_seconds()
        self.own0 = own_cpu_seconds()
        self.tree1 = self.tree0
        self.costs: dict[str, float] = {}

    def close(self) -> None:
        self.tree1 = sample_tree(self.server.pid)
        self.costs = {
            "server": self.tree1.cpu_s - self.tree0.cpu_s,
            "server_kernel": self.tree1.sys_s - self.tree0.sys_s,
            "redis": redis_cpu(self.server) - self.redis0,
            "orchestrator": own_cpu_seconds() - self.own0,
            "machine": machine_busy_seconds() - self.machine0,
        }

    @property
    def seconds(self) -> float:
        return self.tree1.at - self.tree0.at

    @property
    def server_cpu_s(self) -> float:
        return self.costs["server"]

    @property
    def after(self) -> TreeSample:
        return self.tree1

    def account(self, outcome: Outcome, results: list[dict[str, Any]]) -> None:
        """Record cores used by each party; warn when the load generator or the machine
        was saturated, or other processes took a share of it."""
        loadgen_s = _loadgen_shares(outcome, results) + self.costs["orchestrator"]
        wall = max(self.seconds, 1e-9)
        parties = {
            "server": self.costs["server"],
            "redis": self.costs["redis"],
            "load_generator": loadgen_s,
        }
        other = max(0.0, self.costs["machine"] - sum(parties.values()))
        cores = {name: round(cpu / wall, 3) for name, cpu in parties.items()}
        cores["other_processes"] = round(other / wall, 3)
        outcome.details["window_s"] = self.seconds
        # The kernel's share (socket writes, mostly): what no user-space change can cut.
        outcome.details["server_kernel_share"] = round(
            self.costs["server_kernel"] / max(self.costs["server"], 1e-9), 3
        )
        outcome.details["cores_used"] = cores
        _machine_warnings(outcome, cores)


def _loadgen_shares(outcome: Outcome, results: list[dict[str, Any]]) -> float:
    shares = [r["cpu_s"] / r["wall_s"] if r["wall_s"] > 0 else 0.0 for r in results]
    outcome.details["loadgen_core_share_per_process"] = [round(s, 3) for s in shares]
    for index, share in enumerate(shares):
        if share > LOADGEN_SATURATED:
            outcome.warnings.append(
                f"load generator process {index} used {share:.0%} of a core: it, not the "
                "server, may be the bottleneck; treat the figures as bounds"
            )
    return float(sum(r["cpu_s"] for r in results))


def _machine_warnings(outcome: Outcome, cores: dict[str, float]) -> None:
    if cores["other_processes"] > OTHER_LOAD_WARNING_CORES:
        outcome.warnings.append(
            f"other processes on the machine used {cores['other_processes']:.2f} cores "
            "during the measurement: the figures are pessimistic"
        )
    total = sum(cores.values())
    if total > 0.9 * MACHINE_CORES:
        outcome.warnings.append(
            f"the machine was saturated ({total:.2f} of {MACHINE_CORES} cores busy): "
            "everything competed for CPU"
        )
