"""Real broker processes (``broker serve`` under uvicorn) on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.redis_server import free_port

BROKER_BIN = Path(sys.executable).with_name("broker")


@dataclass
class BrokerProcess:
    """One broker instance; ``env`` holds BROKER_* settings beyond the URL and port."""

    redis_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    max_open_files: int | None = None  # the process's RLIMIT_NOFILE (soft and hard)
    ignore_hangups: bool = False  # as ``nohup`` starts it
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(
        default_factory=lambda: Path(tempfile.mkstemp(prefix="broker-", suffix=".log")[1])
    )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> BrokerProcess:
        args = [str(BROKER_BIN), "serve", "--port", str(self.port), "--workers", str(self.workers)]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env.update(self.env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self._prepare,
                start_new_session=True,  # (its workers with it: close() stops them all)
            )
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.close()  # a broker that never became healthy must not outlive its test
            raise
        return self

    def _prepare(self) -> None:
        """In the child, before the broker runs."""
        if self.max_open_files is not None:
            limit = (self.max_open_files, self.max_open_files)
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)
        # As started from a shell (SIGHUP default), or under ``nohup`` (ignored): not as
        # the suite's own runner has it, which a run under nohup passed on (ignored), and
        # the tests of SIGHUP's drain then found a broker that rightly ignored it.
        signal.signal(signal.SIGHUP, signal.SIG_IGN if self.ignore_hangups else signal.SIG_DFL)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"broker exited early:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"broker not healthy in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, and the exit status once it has drained."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def close(self) -> None:
        """Stop it and every process of its session (its workers: a supervisor killed
        alone leaves them to exit by themselves, and one that never started its workers
        well left them restarting, using the CPU of the tests after it)."""
        session = self.process.pid if self.process is not None else None
        self.kill()
        if session is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(session, signal.SIGKILL)
        self.log_path.unlink(missing_ok=True)
