"""CPU time and resident memory of a process tree, read from /proc.

The server under test is a uvicorn supervisor plus its worker children, so every figure
is summed over the whole tree, found afresh at each sample (workers may be respawned).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


@dataclass(frozen=True)
class TreeSample:
    """CPU seconds (user + system, and system alone) and resident kilobytes summed over
    a process tree."""

    pids: tuple[int, ...]
    cpu_s: float
    rss_kb: int
    at: float
    sys_s: float = 0.0


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def _parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                parents[int(entry.name)] = int(fields[1])
    return parents


def tree_pids(root: int) -> tuple[int, ...]:
    """The root and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parent_map().items():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return tuple(found)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of one process (all its threads), 0 if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def sys_seconds(pid: int) -> float:
    """System (kernel) CPU of one process, 0 if it is gone."""
    fields = _stat_fields(pid)
    return 0.0 if fields is None else int(fields[12]) / CLOCK_TICKS


def rss_kb(pid: int) -> int:
    """Resident set size of one process in kB, 0 if it is gone."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def socket_count(pid: int) -> int:
    """Open sockets of one process (listening, client and Redis connections alike)."""
    count = 0
    try:
        for fd in (PROC / str(pid) / "fd").iterdir():
            try:
                count += os.readlink(fd).startswith("socket:")
            except OSError:
                continue
    except OSError:
        pass
    return count


def sample_tree(root: int) -> TreeSample:
    pids = tree_pids(root)
    return TreeSample(
        pids=pids,
        cpu_s=sum(cpu_seconds(pid) for pid in pids),
        rss_kb=sum(rss_kb(pid) for pid in pids),
        at=time.monotonic(),
        sys_s=sum(sys_seconds(pid) for pid in pids),
    )


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (not idle, not waiting for I/O)."""
    fields = [int(v) for v in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def other_load(seconds: float = 1.0) -> float:
    """Cores busy on the machine over the next `seconds`, less this process's own CPU."""
    busy0, own0 = machine_busy_seconds(), own_cpu_seconds()
    time.sleep(seconds)
    return max(0.0, (machine_busy_seconds() - busy0) - (own_cpu_seconds() - own0)) / seconds


def own_cpu_seconds() -> float:
    """CPU of the calling process, all threads, at microsecond resolution."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (thousands of sockets); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
