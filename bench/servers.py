"""Start and stop what is measured: a fresh redis-server and a server (broker or baseline).

Every scenario gets its own Redis and server so that no scenario inherits another's
heap, connections or backlog. The server runs in its own session so that stopping it
stops its uvicorn workers too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import jwt
import orjson
import redis

from tests.support.redis_server import RedisServer, free_port

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
WORKERS = 2
READY_TIMEOUT_S = 30.0
AUTH_SECRET = "bench-only-secret-" + "0123456789abcdef" * 3  # 66 bytes: HS256


@dataclass(frozen=True)
class Target:
    """A server implementation to measure: how to start it and what it calls its workers."""

    name: str
    label: str
    auth: bool = False
    # Whether a publish body wraps each event as `{"data": ...}` (the broker, the
    # baseline) or is the event itself, one per request (Nchan).
    envelope: bool = True

    @property
    def is_broker(self) -> bool:
        return self.name.startswith("broker")

    def ready(self, port: int) -> bool:
        """Whether it takes requests now: its GET /readyz answers 200."""
        with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=1) as answer:
            return bool(answer.status == 200)

    def command(self, port: int, redis_url: str) -> list[str]:
        if self.is_broker:
            return [
                str(Path(sys.executable).parent / "broker"), "serve",
                "--host", HOST, "--port", str(port),
                "--redis-url", redis_url, "--workers", str(WORKERS),
            ]  # fmt: skip
        return [
            sys.executable, "-m", "uvicorn", "--factory", "bench.baseline_app:create_app",
            "--host", HOST, "--port", str(port), "--workers", str(WORKERS),
            "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip

    def environment(self, redis_url: str) -> dict[str, str]:
        env = dict(os.environ, BENCH_REDIS_URL=redis_url, BROKER_REDIS_URL=redis_url)
        env.setdefault("BROKER_LOG_LEVEL", "warning")
        env.setdefault("BROKER_ACCESS_LOG", "false")
        if self.auth:
            env["BROKER_JWT_SECRET"] = AUTH_SECRET
        return env

    def authorized(self, path: str) -> str:
        """``path`` marked with this target's token (``?access_token=``: one way for every
        request the scenarios build); ``wire`` sends it as an ``Authorization: Bearer``
        header, as producers do."""
        if not self.auth:
            return path
        return f"{path}{'&' if '?' in path else '?'}access_token={bench_token()}"

    def publish_bodies(self, events: list[Any]) -> list[bytes]:
        """Request bodies that publish `events` (each one event's `data`), in order: the
        broker and the baseline take them all in one POST (a JSON array for several);
        without the envelope, one request per event, whose body subscribers get as `data:`."""
        if not self.envelope:
            return [orjson.dumps(event) for event in events]
        if len(events) == 1:
            return [orjson.dumps({"data": events[0]})]
        return [orjson.dumps([{"data": event} for event in events])]

    def published_id(self, body: bytes) -> str:
        """The id of the (last) event a publish answer acknowledges."""
        return str(orjson.loads(body)["id"])


def bench_token() -> str:
    """One HS256 token for the whole run, allowed every bench topic, valid for a day."""
    claims = {
        "exp": int(time.time()) + 86_400,
        "broker": {"publish": ["bench.*"], "subscribe": ["bench.*"]},
    }
    return jwt.encode(claims, AUTH_SECRET, algorithm="HS256")


BROKER = Target("broker", "broker")
BROKER_AUTH = Target("broker-auth", "broker, auth on (HS256 JWT)", auth=True)
BASELINE = Target("baseline", "baseline (FastAPI SSE + XREAD per client)")


@dataclass
class RunningServer:
    """A Redis and a server over it, both up and answering."""

    target: Target
    redis_server: RedisServer
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    redis_client: redis.Redis = field(init=False)

    def __post_init__(self) -> None:
        self.redis_client = redis.Redis(port=self.redis_server.port, decode_responses=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        _stop_session(self.process)
        self.redis_client.close()
        self.redis_server.close()


def _stop_session(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _wait_ready(
    target: Target, process: subprocess.Popen[bytes], port: int, log_path: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"server exited with {process.returncode}:\n{tail}")
        try:
            if target.ready(port):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server not ready on port {port} after {READY_TIMEOUT_S}s")


def start(target: Target, log_dir: Path, env: dict[str, str] | None = None) -> RunningServer:
    """Start a fresh redis-server and the target over it, with `env` added to the
    server's environment; wait until /readyz answers 200."""
    redis_server = RedisServer(appendonly=False).start()
    port = free_port()
    log_path = log_dir / f"{target.name}-{port}.log"
    log: IO[bytes] = log_path.open("wb")
    process = subprocess.Popen(
        target.command(port, redis_server.url),
        env=target.environment(redis_server.url) | (env or {}),
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    try:
        _wait_ready(target, process, port, log_path)
    except BaseException:
        _stop_session(process)
        redis_server.close()
        raise
    return RunningServer(target, redis_server, process, port, log_path)


def new_log_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-logs-"))
