"""Real broker processes (`broker serve`) on loopback ports, as a deployment runs them."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx

from tests.support.polling import wait_until
from tests.support.procs import ManagedProcess, http_status, tail
from tests.support.redis_server import free_port

# Short heartbeats keep idle streams visibly alive through the load balancers'
# read timeouts; every other setting is the broker's default.
BROKER_ENV = {"BROKER_HEARTBEAT_SECONDS": "2"}
READY_TIMEOUT = 20.0
OPEN_STREAMS_METRIC = "broker_connected_subscribers"


def broker_executable() -> str:
    """The console script of this checkout's venv (E2E_BROKER_EXECUTABLE overrides it)."""
    override = os.environ.get("E2E_BROKER_EXECUTABLE")
    if override:
        return override
    beside_python = Path(sys.executable).parent / "broker"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("broker")
    if found is None:
        raise RuntimeError("the `broker` console script is missing: run `make test`")
    return found


def broker_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without any BROKER_* the caller had set, plus the suite's settings.

    `extra`: the settings a Redis topology needs (e.g. replicated publish durability).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_ENV)
    env.update(extra or {})
    return env


class BrokerInstance:
    """One `broker serve --workers 1` process on a fixed port that survives restarts."""

    def __init__(
        self, index: int, redis_url: str, workdir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.index = index
        self.port = free_port()
        self.redis_url = redis_url
        args = [
            broker_executable(), "serve",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--redis-url", redis_url,
            "--workers", "1",
        ]  # fmt: skip
        self.process = ManagedProcess(
            f"broker-{index}", args, workdir / f"broker-{index}.log", env=broker_environment(env)
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process.start()
        self.wait_ready()

    def wait_ready(self) -> None:
        def ready() -> bool:
            if not self.process.running:
                raise AssertionError(
                    f"broker-{self.index} exited while starting\n{tail(self.process.log_path)}"
                )
            return http_status(f"{self.base_url}/readyz") == 200

        wait_until(ready, timeout=READY_TIMEOUT, what=f"broker-{self.index} /readyz")

    def open_streams(self) -> float:
        """How many event streams this instance serves now (its /metrics gauge); 0 if unknown."""
        return open_streams_at(self.base_url)

    def kill(self) -> None:
        self.process.kill()

    def terminate(self, timeout: float) -> int:
        return self.process.terminate(timeout)

    def close(self) -> None:
        self.process.close()


class BrokerCluster:
    """Several instances sharing one Redis topology: one deployment."""

    def __init__(
        self, size: int, redis_url: str, workdir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.instances = [BrokerInstance(i, redis_url, workdir, env) for i in range(size)]

    @property
    def ports(self) -> list[int]:
        return [instance.port for instance in self.instances]

    def start(self) -> None:
        for instance in self.instances:
            instance.process.start()
        for instance in self.instances:
            instance.wait_ready()

    def busiest(self, otherwise: int) -> BrokerInstance:
        """The instance serving the most streams, so failing it disconnects clients.

        When no instance reports a stream (the gauge is not there), instance
        `otherwise` (mod the cluster's size) is the one.
        """
        streams = {instance.index: instance.open_streams() for instance in self.instances}
        if max(streams.values()) <= 0:
            return self.instances[otherwise % len(self.instances)]
        return self.instances[max(streams, key=lambda index: streams[index])]

    def close(self) -> None:
        for instance in self.instances:
            instance.close()


def open_streams_at(base_url: str) -> float:
    """The broker's own gauge of the streams it serves (0 while it cannot say)."""
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0.0
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == OPEN_STREAMS_METRIC:
            return float(value)
    return 0.0
