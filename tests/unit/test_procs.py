"""``tests.support.procs.run_whole``: a child run killed with everything it started."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.polling import wait_until
from tests.support.procs import run_whole

LEAVES_A_SLEEPER = """
import subprocess, sys, time
sleeper = subprocess.Popen(  # (its output elsewhere, as the bench's servers' is)
    [sys.executable, "-c", "import time; time.sleep(120)"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)
open(sys.argv[1], "w").write(str(sleeper.pid))
time.sleep(float(sys.argv[2]))
"""


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # (a zombie is over, waiting for its reaper)


def _sleeper(pid_file: Path) -> int:
    wait_until(pid_file.exists, timeout=10, what="the sleeper started")
    return int(wait_until(pid_file.read_text, timeout=10, what="the sleeper's pid"))


@pytest.mark.parametrize("runs_for", [0.0, 120.0], ids=["ended", "over-time"])
def test_what_a_run_started_is_killed_with_it(tmp_path: Path, runs_for: float) -> None:
    """Killed alone (``subprocess.run``'s timeout), a bench run left its redis-server
    and broker running for good; one that ended may have left some behind too."""
    pid_file = tmp_path / "sleeper.pid"
    command = [sys.executable, "-c", LEAVES_A_SLEEPER, str(pid_file), str(runs_for)]
    if runs_for:
        with pytest.raises(AssertionError, match="ran over"):
            run_whole(command, cwd=tmp_path, timeout=5)
    else:
        assert run_whole(command, cwd=tmp_path, timeout=30).returncode == 0
    sleeper = _sleeper(pid_file)
    wait_until(lambda: not _running(sleeper), timeout=10, what="the sleeper killed")
