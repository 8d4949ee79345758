"""The suite's one headless Chromium, driven over the DevTools protocol (CDP).

One browser with one page: launch it on a profile of its own and a free DevTools
port, find the page's target over HTTP, talk to it on one websocket (``fresh_page``:
a new page in a browser context of its own, for the next test). Its users: the
browser's own EventSource in the failover tests (tests/e2e/clients.py), CORS with
cookies (tests/browser), and the face's pages (tests/face), which also read the URL
of every request a page makes (``Network.requestWillBeSent``) to prove that nothing
leaves 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Self

import httpx
from websockets.sync.client import ClientConnection, connect

from tests.support.polling import wait_until
from tests.support.procs import ManagedProcess, tail
from tests.support.redis_server import free_port

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
CALL_TIMEOUT = 15.0  # one DevTools command, answered
START_TIMEOUT = 30.0  # the browser up and its page target listed
LOAD_TIMEOUT = 15.0  # a page loaded, or a page condition come true
NAVIGATING = re.compile(r"navigated or closed|Cannot find context|context was destroyed")


def chromium_executable() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("chromium is missing: run `make test` (it installs it)")
    return found


class Chromium:
    """One headless Chromium with one page; ``close()`` it (a context manager does).

    Its output goes to ``workdir/<name>.log``; screenshots go to ``workdir``.
    ``enable`` names the CDP domains whose events to receive from the start
    (``Network`` fills ``requests``, ``Runtime`` fills ``console``).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        name: str = "chromium",
        window: tuple[int, int] | None = None,
        enable: tuple[str, ...] = (),
        flags: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.enable = enable
        self.debug_port = free_port()
        self.profile = Path(tempfile.mkdtemp(prefix=f"{name}-profile-"))
        size = [f"--window-size={window[0]},{window[1]}"] if window else []
        args = [
            chromium_executable(),
            *CHROMIUM_FLAGS,
            *size,
            *flags,
            f"--user-data-dir={self.profile}",
            f"--remote-debugging-port={self.debug_port}",
            "about:blank",
        ]
        self.process = ManagedProcess(name, args, workdir / f"{name}.log")
        self.requests: list[str] = []
        self.console: list[str] = []
        self.window = window
        self._socket: ClientConnection | None = None
        self._browser_socket: ClientConnection | None = None
        self._context: str | None = None  # (the page's browser context, by fresh_page)
        self._exit_stack = ExitStack()
        self._page_stack = ExitStack()
        self._next_id = 0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> Self:
        self.process.start()
        target = wait_until(
            self._page_target, timeout=START_TIMEOUT, what="Chromium's DevTools page"
        )
        assert target is not None  # wait_until returns only what is truthy
        self._open_page(target)
        return self

    def _open_page(self, target: str) -> None:
        """Talk to the page at ``target`` (its DevTools websocket) from now on."""
        self._page_stack.close()  # (the page before it, if any)
        # Entered as a context manager, as websockets wants; closed by close().
        self._socket = self._page_stack.enter_context(
            connect(target, max_size=None, open_timeout=10)
        )
        self.requests, self.console = [], []
        for domain in self.enable:
            self.call(f"{domain}.enable")

    def fresh_page(self, workdir: Path) -> None:
        """A new page in a browser context of its own, as a new browser's: cookies,
        storage, cache and connections of its own, no script run on its loads; the page
        and context before it closed. One browser then serves test after test (each
        started its own, a second apiece); screenshots go to ``workdir``."""
        if self._browser_socket is None:
            version = httpx.get(f"http://127.0.0.1:{self.debug_port}/json/version", timeout=5)
            self._browser_socket = self._exit_stack.enter_context(
                connect(version.json()["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
            )
        if self._context is not None:
            self._page_stack.close()
            self._on_browser("Target.disposeBrowserContext", browserContextId=self._context)
        self._context = self._on_browser("Target.createBrowserContext")["browserContextId"]
        size = {"width": self.window[0], "height": self.window[1]} if self.window else {}
        page = self._on_browser(
            "Target.createTarget", url="about:blank", browserContextId=self._context, **size
        )["targetId"]
        self._open_page(f"ws://127.0.0.1:{self.debug_port}/devtools/page/{page}")
        self.workdir = workdir

    def _on_browser(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._browser_socket is not None
        return self._call(self._browser_socket, method, params)

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
        return self._call(self._socket, method, params)

    def _call(
        self, socket: ClientConnection, method: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        """A command's result over ``socket`` (the page's, or the browser's own)."""
        self._next_id += 1
        call_id = self._next_id
        socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + CALL_TIMEOUT
        reply = wait_until(
            lambda: self._reply(socket, call_id, deadline),
            timeout=CALL_TIMEOUT,
            what=f"DevTools to answer {method}",
            interval=0,  # each try blocks on the socket until a message or the deadline
        )
        assert reply is not None  # wait_until returns only what is truthy
        if "error" in reply:
            raise AssertionError(f"DevTools {method} failed: {reply['error']}")
        return dict(reply.get("result", {}))

    def _reply(
        self, socket: ClientConnection, call_id: int, deadline: float
    ) -> dict[str, Any] | None:
        """The next message if it answers ``call_id``; an event is recorded, and None."""
        try:
            raw = socket.recv(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return None
        message: dict[str, Any] = json.loads(raw)
        if message.get("id") == call_id:
            return message
        self._record(message)
        return None

    def _record(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(str(params["request"]["url"]))
        elif method == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(a.get("value", "")) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            self.console.append(f"exception: {params['exceptionDetails'].get('text')}")

    def evaluate(self, expression: str) -> Any:
        """The expression's value in the page (a promise's, once it settles)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = LOAD_TIMEOUT, what: str = "") -> Any:
        """Poll a page expression until it is truthy (and return it)."""
        return wait_until(
            lambda: self.evaluate(expression), timeout=timeout, what=what or expression
        )

    def navigate(self, url: str) -> None:
        """Open ``url`` in the page and wait until it has loaded."""
        self.call("Page.navigate", url=url)
        self._wait_loaded(
            f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
            what=f"{url} to load",
        )

    def reload(self) -> None:
        marker = f"reload-{self._next_id}"
        self.evaluate(f"window.__reloadMarker = {json.dumps(marker)}")
        self.call("Page.reload")
        self._wait_loaded(
            f"window.__reloadMarker !== {json.dumps(marker)} && document.readyState === 'complete'",
            what="the page to reload",
        )

    def _wait_loaded(self, expression: str, *, what: str) -> None:
        """``wait_for`` while the page loads: an evaluation that the navigation overtook
        (DevTools: "Inspected target navigated or closed", or no context yet) is a
        "not yet", not a failure."""

        def loaded() -> Any:
            try:
                return self.evaluate(expression)
            except AssertionError as error:
                if NAVIGATING.search(str(error)):
                    return False
                raise

        wait_until(loaded, timeout=LOAD_TIMEOUT, what=what)

    def run_on_every_load(self, source: str) -> None:
        self.call("Page.addScriptToEvaluateOnNewDocument", source=source)

    def set_cookie(self, name: str, value: str, url: str) -> None:
        """A cookie for ``url``, sent by every request the page makes there."""
        self.call("Network.enable")
        self.call("Network.setCookie", name=name, value=value, url=url)

    def screenshot(self, name: str) -> Path:
        """The page as ``workdir/<name>.png``."""
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
            self._page_stack.close()
            self._exit_stack.close()
        finally:
            self.process.close()
            shutil.rmtree(self.profile, ignore_errors=True)
