"""Child processes of the end-to-end suite, and waiting for conditions with deadlines.

Every process is started in its own session (process group), so the suite can
signal exactly the processes it started, children included, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import httpx

T = TypeVar("T")


def run_whole(
    command: Sequence[str], *, cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` with its output captured, in a session of its own, killed whole
    (children included) past ``timeout`` or once it ended: killed alone, a bench run left
    its redis-server and broker running for good."""
    with subprocess.Popen(
        list(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    ) as process:  # fmt: skip
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            raise AssertionError(f"{command[:3]} ran over {timeout:g} s:\n{out}{err}") from None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # (whatever it left behind)
    return subprocess.CompletedProcess(list(command), process.returncode, out, err)


def rss_bytes(pid: int) -> int:
    """A process's resident memory (``VmRSS``), in bytes."""
    for field_line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if field_line.startswith("VmRSS:"):
            return int(field_line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, for failure messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"<{path} unreadable>"
    return "\n".join(text.splitlines()[-lines:])


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The status of a GET, or None when nothing answered."""
    try:
        return httpx.get(url, timeout=timeout).status_code
    except httpx.HTTPError:
        return None


class ManagedProcess:
    """One child process in its own process group, with its output in a log file."""

    def __init__(self, name: str, args: Sequence[str], log_path: Path, **popen: object) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self.popen_kwargs = popen
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {' '.join(self.args)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(  # type: ignore[call-overload]
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self.popen_kwargs,
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, sig: signal.Signals) -> None:
        """Signal the process group this process leads, while its leader is not yet reaped.

        An unreaped leader (even a zombie) keeps its pid, so the group id cannot have
        been reused by anyone else: the signal reaches only processes we started.
        """
        if self.process is None or self.process.returncode is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group, as a crash or an OOM kill would, and reap it."""
        if self.process is None:
            return
        self.signal_group(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float) -> int:
        """SIGTERM the process alone (as an orchestrator would) and return its exit code."""
        assert self.process is not None, f"{self.name} was never started"
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s of SIGTERM\n{tail(self.log_path)}"
            ) from None

    def close(self) -> None:
        """Teardown: SIGKILL the whole group (children included) and reap; never raises."""
        if self.process is None or self.process.returncode is not None:
            return
        self.signal_group(signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
