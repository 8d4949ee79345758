"""Real SSE clients that reconnect on their own: npm `eventsource` and Chromium's EventSource.

Neither gets help from the suite: each reconnects, and sends Last-Event-ID, the
way it does for its users. The suite only reads what each one recorded: one
record per open, error and received event, in the order the client saw them.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import httpx
from websockets.sync.client import ClientConnection, connect

from tests.e2e.procs import ManagedProcess, tail
from tests.support.polling import wait_until
from tests.support.redis_server import free_port

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

    def __init__(self, name: str, url: str, workdir: Path) -> None:
        self.name = name
        self.output = workdir / f"{name}.jsonl"
        self.output.touch()
        args = [node_executable(), str(NODE_DIR / "client.mjs"), url, str(self.output)]
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


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
]

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


def chromium_executable() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("chromium is missing: run `make test` (it installs it)")
    return found


class ChromiumEventSourceClient:
    """Headless Chromium's own EventSource, driven over the DevTools protocol."""

    def __init__(self, name: str, origin: str, path: str, workdir: Path) -> None:
        self.name = name
        self.origin = origin
        self.path = path
        self.debug_port = free_port()
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-e2e-"))
        args = [
            chromium_executable(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={self.profile}",
            f"--remote-debugging-port={self.debug_port}",
            "about:blank",
        ]
        self.process = ManagedProcess(name, args, workdir / f"{name}.log")
        self.records: list[Record] = []
        self._socket: ClientConnection | None = None
        self._exit_stack = ExitStack()
        self._next_id = 0

    def start(self) -> None:
        self.process.start()
        target = wait_until(self._page_target, timeout=30, what="Chromium's DevTools page")
        assert target is not None
        # Entered as a context manager, as websockets wants; closed by close().
        self._socket = self._exit_stack.enter_context(
            connect(target, max_size=None, open_timeout=10)
        )
        # Any page of the broker's origin will do; /healthz is the one every deployment has.
        self._call("Page.navigate", url=f"{self.origin}/healthz")
        wait_until(self._loaded, timeout=15, what="Chromium to load the broker's origin")
        self._evaluate(SUBSCRIBE_SCRIPT % json.dumps(self.path))

    def _page_target(self) -> str | None:
        if not self.process.running:
            raise AssertionError(f"chromium exited\n{tail(self.process.log_path)}")
        try:
            targets = httpx.get(f"http://127.0.0.1:{self.debug_port}/json/list", timeout=1).json()
        except (httpx.HTTPError, ValueError):
            return None
        pages = [t for t in targets if t.get("type") == "page"]
        return str(pages[0]["webSocketDebuggerUrl"]) if pages else None

    def _loaded(self) -> bool:
        state = self._evaluate("[location.origin, document.readyState]")
        return bool(state == [self.origin, "complete"])

    def _call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._socket is not None
        self._next_id += 1
        call_id = self._next_id
        self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = json.loads(self._socket.recv(timeout=max(0.0, deadline - time.monotonic())))
            if message.get("id") != call_id:
                continue  # an event of a domain we did not enable: not an answer
            if "error" in message:
                raise AssertionError(f"DevTools {method} failed: {message['error']}")
            return dict(message["result"])
        raise TimeoutError(f"DevTools did not answer {method} in 10s")

    def _evaluate(self, expression: str) -> Any:
        result = self._call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def poll(self) -> None:
        fresh = self._evaluate(f"window.__log.slice({len(self.records)})")
        self.records += fresh

    def ready_state(self) -> int | None:
        return int(self._evaluate("window.__source.readyState"))

    def close(self) -> None:
        try:
            self._exit_stack.close()
        finally:
            self.process.close()
            shutil.rmtree(self.profile, ignore_errors=True)
