"""CORS with credentials in headless Chromium, the way a web app uses the broker.

A page served from one origin (a static server on 127.0.0.1:A) subscribes with
``EventSource(url, {withCredentials: true})`` to the broker on 127.0.0.1:B and
publishes with ``fetch(..., {credentials: "include"})`` (a preflighted request),
the token in the ``broker_token`` cookie. The same page from an origin the broker
does not list gets nothing. Screenshots and DOM dumps are kept under the test's
tmp dir.
"""

from __future__ import annotations

import base64
import http.server
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.e2e.clients import CHROMIUM_FLAGS, chromium_executable
from tests.e2e.procs import ManagedProcess, tail
from tests.support.broker_process import BrokerProcess
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer, free_port
from tests.support.tokens import SECRET, claims, hs_token

pytestmark = pytest.mark.e2e  # needs Chromium: not in make test-fast

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>broker CORS test</title></head>
<body><h1>events</h1><ol id="log"></ol>
<script>
window.__log = [];
function record(entry) {
  window.__log.push(entry);
  const item = document.createElement("li");
  item.textContent = JSON.stringify(entry);
  document.getElementById("log").appendChild(item);
}
window.subscribe = (url) => {
  const source = new EventSource(url, {withCredentials: true});
  window.__source = source;
  source.onopen = () => record({kind: "open"});
  source.onerror = () => record({kind: "error", readyState: source.readyState});
  source.onmessage = (e) => record({kind: "event", id: e.lastEventId, data: e.data});
};
window.publish = (url, body) => fetch(url, {
    method: "POST", credentials: "include", body,
    headers: {"Content-Type": "application/json", "Idempotency-Key": "browser-1"},
  })
  .then(async (r) => record({kind: "published", status: r.status, body: await r.text()}))
  .catch((e) => record({kind: "publish-failed", error: String(e)}));
</script></body></html>
"""


@contextmanager
def static_site() -> Iterator[str]:
    """The page on its own origin, http://127.0.0.1:<port>."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.debug_port = free_port()
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-cors-"))
        args = [
            chromium_executable(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={self.profile}",
            f"--remote-debugging-port={self.debug_port}",
            "about:blank",
        ]
        self.process = ManagedProcess("chromium", args, workdir / "chromium.log")
        self._exits = ExitStack()
        self._socket: ClientConnection | None = None
        self._next_id = 0

    def start(self) -> Browser:
        self.process.start()
        target = wait_until(self._page_target, timeout=30, what="Chromium's DevTools page")
        self._socket = self._exits.enter_context(connect(target, max_size=None, open_timeout=10))
        return self

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
        assert self._socket is not None
        self._next_id += 1
        self._socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = json.loads(self._socket.recv(timeout=max(0.0, deadline - time.monotonic())))
            if message.get("id") != self._next_id:
                continue
            if "error" in message:
                raise AssertionError(f"DevTools {method} failed: {message['error']}")
            return dict(message["result"])
        raise TimeoutError(f"DevTools did not answer {method} in 10s")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        origin = url.split("/", 3)[:3]
        wait_until(
            lambda: (
                self.evaluate("[location.origin, document.readyState]")
                == ["/".join(origin), "complete"]
            ),
            timeout=15,
            what=f"the page {url}",
        )

    def log(self) -> list[dict[str, Any]]:
        return list(self.evaluate("window.__log"))

    def keep(self, name: str) -> None:
        """A screenshot and the DOM, as artifacts of the test."""
        shot = self.call("Page.captureScreenshot", format="png")
        (self.workdir / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
        (self.workdir / f"{name}.html").write_text(
            str(self.evaluate("document.documentElement.outerHTML"))
        )

    def close(self) -> None:
        try:
            self._exits.close()
        finally:
            self.process.close()
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def sites() -> Iterator[tuple[str, str]]:
    """Two origins serving the page: the one the broker lists, and another."""
    with static_site() as listed, static_site() as other:
        yield listed, other


@pytest.fixture(scope="module")
def cors_broker(redis_server: RedisServer, sites: tuple[str, str]) -> Iterator[BrokerProcess]:
    env = {
        "BROKER_JWT_SECRET": SECRET,
        "BROKER_CORS_ORIGINS": sites[0],
        "BROKER_HEARTBEAT_SECONDS": "1",
    }
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    instance = Browser(tmp_path).start()
    yield instance
    instance.close()


def _with_cookie(browser: Browser, broker: BrokerProcess, token: str) -> None:
    browser.call("Network.enable")
    browser.call("Network.setCookie", name="broker_token", value=token, url=broker.url)


def _publish_from_outside(broker: BrokerProcess, topic: str, data: str) -> str:
    token = hs_token(claims(publish=[topic]))
    response = httpx.post(
        f"{broker.url}/topics/{topic}/events",
        json={"data": data},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _event_data(browser: Browser) -> list[str]:
    return [entry["data"] for entry in browser.log() if entry["kind"] == "event"]


def test_a_listed_origin_subscribes_and_publishes_with_the_cookie(
    browser: Browser, cors_broker: BrokerProcess, sites: tuple[str, str], tmp_path: Path
) -> None:
    topic = f"cors-{time.time_ns()}"
    _with_cookie(browser, cors_broker, hs_token(claims(publish=[topic], subscribe=[topic])))
    browser.open(f"{sites[0]}/page.html")
    browser.evaluate(f"subscribe({json.dumps(f'{cors_broker.url}/topics/{topic}/events')})")
    wait_until(lambda: {"kind": "open"} in browser.log(), timeout=15, what="the stream to open")
    event_id = _publish_from_outside(cors_broker, topic, "from-outside")
    # A preflighted publish from the page itself (JSON, Idempotency-Key, the cookie).
    body = json.dumps({"data": "from-the-page"})
    browser.evaluate(
        f"publish({json.dumps(f'{cors_broker.url}/topics/{topic}/events')}, {json.dumps(body)})"
    )
    try:
        events = wait_until(
            lambda: (
                [e["data"] for e in browser.log() if e["kind"] == "event"][:2] or None
                if len([e for e in browser.log() if e["kind"] == "event"]) >= 2
                else None
            ),
            timeout=15,
            what="both events in the page",
        )
    finally:
        browser.keep("listed-origin")
    assert events == ['"from-outside"', '"from-the-page"'], browser.log()
    assert any(e["kind"] == "event" and e["id"] == event_id for e in browser.log())
    published = [e for e in browser.log() if e["kind"] == "published"]
    assert published and published[0]["status"] == 201, browser.log()
    assert (tmp_path / "listed-origin.png").stat().st_size > 0


def test_an_origin_not_listed_gets_nothing(
    browser: Browser, cors_broker: BrokerProcess, sites: tuple[str, str]
) -> None:
    """Same page, same cookie, another origin: the browser refuses the stream (CORS), and
    EventSource gives up (readyState 2) without an event."""
    topic = f"cors-{time.time_ns()}"
    _with_cookie(browser, cors_broker, hs_token(claims(publish=[topic], subscribe=[topic])))
    browser.open(f"{sites[1]}/page.html")
    browser.evaluate(f"subscribe({json.dumps(f'{cors_broker.url}/topics/{topic}/events')})")
    try:
        wait_until(
            lambda: browser.evaluate("window.__source.readyState") == 2,
            timeout=15,
            what="EventSource to give up",
        )
        _publish_from_outside(cors_broker, topic, "not-for-this-origin")
        browser.evaluate(
            f"publish({json.dumps(f'{cors_broker.url}/topics/{topic}/events')}, '{{}}')"
        )
        wait_until(
            lambda: any(e["kind"] == "publish-failed" for e in browser.log()),
            timeout=15,
            what="the page's publish to fail (preflight refused)",
        )
    finally:
        browser.keep("other-origin")
    assert not [e for e in browser.log() if e["kind"] in ("open", "event")], browser.log()


def test_a_listed_origin_without_a_token_is_refused(
    browser: Browser, cors_broker: BrokerProcess, sites: tuple[str, str]
) -> None:
    """No cookie: 401, which EventSource treats as final (readyState 2)."""
    topic = f"cors-{time.time_ns()}"
    browser.open(f"{sites[0]}/page.html")
    browser.evaluate(f"subscribe({json.dumps(f'{cors_broker.url}/topics/{topic}/events')})")
    try:
        wait_until(
            lambda: browser.evaluate("window.__source.readyState") == 2,
            timeout=15,
            what="EventSource to give up on the 401",
        )
    finally:
        browser.keep("no-token")
    assert not [e for e in browser.log() if e["kind"] in ("open", "event")], browser.log()
