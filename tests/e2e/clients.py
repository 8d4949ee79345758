"""Real SSE clients that reconnect on their own: npm `eventsource` and Chromium's EventSource.

Neither gets help from the suite: each reconnects, and sends Last-Event-ID, the
way it does for its users. The suite only reads what each one recorded: one
record per open, error and received event, in the order the client saw them.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tests.support.chromium import Chromium
from tests.support.procs import ManagedProcess

NODE_DIR = Path(__file__).resolve().parent / "node"
Record = dict[str, Any]


class SseClient(Protocol):
    name: str
    records: list[Record]

    def start(self) -> None: ...

    def poll(self) -> None:
        """Bring `records` up to date with what the client has seen."""

    def ready_state(self) -> int | None:
        """The client's EventSource.readyState now (0 connecting, 1 open, 2 closed)."""

    def close(self) -> None: ...


# Starts a client on a path behind the load balancer (a fixture of conftest.py).
ClientFactory = Callable[[str], SseClient]


def node_executable() -> str:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is missing: install Node.js 20+")
    if not (NODE_DIR / "node_modules" / "eventsource").is_dir():
        raise RuntimeError("tests/e2e/node/node_modules is missing: run `make test`")
    return node


class NodeEventSourceClient:
    """`node client.mjs URL FILE`: the npm `eventsource` package in its own process."""

    def __init__(self, name: str, url: str, workdir: Path, types: tuple[str, ...] = ()) -> None:
        """``types``: event types it records besides "message" and "broker.gap"."""
        self.name = name
        self.output = workdir / f"{name}.jsonl"
        self.output.touch()
        client = [node_executable(), str(NODE_DIR / "client.mjs")]
        args = [*client, url, str(self.output), *types]
        self.process = ManagedProcess(name, args, workdir / f"{name}.log")
        self.records: list[Record] = []
        self._offset = 0

    def start(self) -> None:
        self.process.start()

    def poll(self) -> None:
        with self.output.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        self.records += [json.loads(line) for line in complete.splitlines() if line]

    def ready_state(self) -> int | None:
        """Ask the client to stop and report: SIGTERM makes it write its final readyState."""
        if not self.process.running:
            return None
        assert self.process.process is not None
        self.process.process.send_signal(signal.SIGTERM)
        self.process.process.wait(timeout=10)
        self.poll()
        finals = [r for r in self.records if r["kind"] == "final"]
        return int(finals[-1]["readyState"]) if finals else None

    def close(self) -> None:
        self.process.close()


# Runs in a page of the load balancer's origin, so the stream is same-origin.
SUBSCRIBE_SCRIPT = """
(() => {
  window.__log = [];
  const record = (entry) => window.__log.push({t: Date.now() / 1000, ...entry});
  const source = new EventSource(%s);
  window.__source = source;
  source.addEventListener("open", () => record({kind: "open"}));
  source.addEventListener("error", () => record({kind: "error", readyState: source.readyState}));
  for (const type of ["message", "broker.gap"]) {
    source.addEventListener(type, (event) => record(
      {kind: "event", type: event.type, id: event.lastEventId, data: event.data}));
  }
  return true;
})()
"""


class ChromiumEventSourceClient:
    """Headless Chromium's own EventSource, driven over the DevTools protocol."""

    def __init__(self, name: str, origin: str, path: str, workdir: Path) -> None:
        self.name = name
        self.origin = origin
        self.path = path
        self.browser = Chromium(workdir, name=name)
        self.records: list[Record] = []

    def start(self) -> None:
        self.browser.start()
        # Any page of the broker's origin will do; /healthz is the one every deployment has.
        self.browser.navigate(f"{self.origin}/healthz")
        self.browser.evaluate(SUBSCRIBE_SCRIPT % json.dumps(self.path))

    def poll(self) -> None:
        fresh = self.browser.evaluate(f"window.__log.slice({len(self.records)})")
        self.records += fresh

    def ready_state(self) -> int | None:
        return int(self.browser.evaluate("window.__source.readyState"))

    def close(self) -> None:
        self.browser.close()
