"""`--profile`: sample the server's worker processes with py-spy while a scenario runs.

py-spy (`pip install py-spy`) attaches to running processes and needs ptrace rights
(root, or `kernel.yama.ptrace_scope=0`). Each worker gets a flame graph (SVG) and a
collapsed-stack file, whose hottest frames `hottest()` summarises for the JSON.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from bench.procstats import tree_pids

SAMPLE_RATE = 250
IDLE_THREADS = ("always_pong", "_watch_parent")
"""Frames of threads that only wait, which py-spy samples as busy."""


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy recorders on every Python process of a server tree but its root."""

    def __init__(self, root_pid: int, out_dir: Path, label: str) -> None:
        self.recorders: list[tuple[subprocess.Popen[bytes], Path]] = []
        binary = py_spy()
        if binary is None:
            raise RuntimeError("--profile needs py-spy: pip install py-spy")
        out_dir.mkdir(parents=True, exist_ok=True)
        for pid in tree_pids(root_pid)[1:]:
            collapsed = out_dir / f"{label}-{pid}.txt"
            self.recorders.append((self._record(binary, pid, collapsed, "raw"), collapsed))
            svg = out_dir / f"{label}-{pid}.svg"
            self.recorders.append((self._record(binary, pid, svg, "flamegraph"), svg))

    @staticmethod
    def _record(binary: str, pid: int, output: Path, fmt: str) -> subprocess.Popen[bytes]:
        command = [binary, "record", "-p", str(pid), "-r", str(SAMPLE_RATE), "-f", fmt]
        return subprocess.Popen(
            [*command, "-o", str(output), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> dict[str, list[str]]:
        """Stop recording (py-spy writes its files on SIGINT); the hottest frames per file."""
        for process, _ in self.recorders:
            process.send_signal(signal.SIGINT)
        for process, _ in self.recorders:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        return {str(path): hottest(path) for _, path in self.recorders if path.suffix == ".txt"}


def hottest(collapsed: Path, top: int = 15) -> list[str]:
    """The frames with the most own samples in a py-spy raw (collapsed) file."""
    own: collections.Counter[str] = collections.Counter()
    try:
        lines = collapsed.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        stack, _, count = line.rpartition(" ")
        # uvicorn's supervisor-ping thread sits in a blocking read, and the worker's
        # supervisor-watch thread in time.sleep: py-spy counts both as busy.
        if stack and count.isdigit() and not any(idle in stack for idle in IDLE_THREADS):
            own[stack.split(";")[-1]] += int(count)
    total = sum(own.values()) or 1
    return [f"{100 * n / total:5.1f}% {frame}" for frame, n in own.most_common(top)]
