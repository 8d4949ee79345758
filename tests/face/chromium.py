"""Headless Chromium driven over the DevTools protocol, recording every request a page makes.

The suite's other Chromium client (tests/e2e/clients.py) runs one EventSource;
the face's tests need pages: navigate, reload, click, evaluate, screenshot, and
the URL of each network request (``Network.requestWillBeSent``), to prove that
nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from tests.e2e.clients import CHROMIUM_FLAGS, chromium_executable
from tests.e2e.procs import ManagedProcess, tail
from tests.support.polling import wait_until
from tests.support.redis_server import free_port

CALL_TIMEOUT = 15.0


class Chromium:
    """One headless Chromium with one page; ``close()`` it (a context manager does)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.debug_port = free_port()
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-face-"))
        args = [
            chromium_executable(),
            *CHROMIUM_FLAGS,
            "--window-size=1400,900",
            f"--user-data-dir={self.profile}",
            f"--remote-debugging-port={self.debug_port}",
            "about:blank",
        ]
        self.process = ManagedProcess("chromium", args, workdir / "chromium.log")
        self.requests: list[str] = []
        self.console: list[str] = []
        self._socket: ClientConnection | None = None
        self._exit_stack = ExitStack()
        self._next_id = 0

    def __enter__(self) -> Chromium:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        self.process.start()
        target = wait_until(self._page_target, timeout=30, what="Chromium's DevTools page")
        self._socket = self._exit_stack.enter_context(
            connect(target, max_size=None, open_timeout=10)
        )
        for domain in ("Page", "Network", "Runtime"):
            self.call(f"{domain}.enable")

    def _page_target(self) -> str | None:
        if not self.process.running:
            raise AssertionError(f"chromium exited\n{tail(self.process.log_path)}")
        try:
            targets = httpx.get(f"http://127.0.0.1:{self.debug_port}/json/list", timeout=1).json()
        except (httpx.HTTPError, ValueError):
            return None
        pages = [t for t in targets if t.get("type") == "page"]
        return str(pages[0]["webSocketDebuggerUrl"]) if pages else None

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """A DevTools command's result; the events that arrive meanwhile are recorded."""
        assert self._socket is not None
        self._next_id += 1
        call_id = self._next_id
        self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + CALL_TIMEOUT
        while time.monotonic() < deadline:
            message = json.loads(self._socket.recv(timeout=max(0.0, deadline - time.monotonic())))
            if message.get("id") != call_id:
                self._record(message)
                continue
            if "error" in message:
                raise AssertionError(f"DevTools {method} failed: {message['error']}")
            return dict(message.get("result", {}))
        raise TimeoutError(f"DevTools did not answer {method} in {CALL_TIMEOUT}s")

    def _record(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(str(params["request"]["url"]))
        elif method == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(a.get("value", "")) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            self.console.append(f"exception: {params['exceptionDetails'].get('text')}")

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 15, what: str = "") -> Any:
        """Poll a page expression until it is truthy (and return it)."""
        return wait_until(
            lambda: self.evaluate(expression), timeout=timeout, what=what or expression
        )

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for(
            f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
            what=f"{url} to load",
        )

    def reload(self) -> None:
        marker = f"reload-{self._next_id}"
        self.evaluate(f"window.__reloadMarker = {json.dumps(marker)}")
        self.call("Page.reload")
        self.wait_for(
            f"window.__reloadMarker !== {json.dumps(marker)} && document.readyState === 'complete'",
            what="the page to reload",
        )

    def run_on_every_load(self, source: str) -> None:
        self.call("Page.addScriptToEvaluateOnNewDocument", source=source)

    def screenshot(self, name: str) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path = self.workdir / f"{name}.png"
        path.write_bytes(base64.b64decode(data))
        return path

    def requests_leaving(self, origin: str) -> list[str]:
        """Every request so far that went anywhere but ``origin`` (data: URLs stay home)."""
        self.evaluate("1")  # collect the events that arrived since the last call
        return [url for url in self.requests if not url.startswith((origin + "/", "data:"))]

    def close(self) -> None:
        try:
            self._exit_stack.close()
        finally:
            self.process.close()
            shutil.rmtree(self.profile, ignore_errors=True)
