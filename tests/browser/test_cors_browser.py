"""CORS with credentials in headless Chromium, the way a web app uses the broker.

A page served from one origin (a static server on 127.0.0.1:A) subscribes with
``EventSource(url, {withCredentials: true})`` to the broker on 127.0.0.1:B and
publishes with ``fetch(..., {credentials: "include"})`` (a preflighted request),
the token in the ``broker_token`` cookie. The same page from an origin the broker
does not list gets nothing. Screenshots and DOM dumps are kept under the test's
tmp dir.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.broker_process import BrokerProcess
from tests.support.chromium import Chromium
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer
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


class Browser(Chromium):
    """Chromium on the page above: what the page logged, and artifacts of the test."""

    def log(self) -> list[dict[str, Any]]:
        return list(self.evaluate("window.__log"))

    def keep(self, name: str) -> None:
        """A screenshot and the DOM, as artifacts of the test."""
        self.screenshot(name)
        (self.workdir / f"{name}.html").write_text(
            str(self.evaluate("document.documentElement.outerHTML"))
        )


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
    browser.set_cookie("broker_token", token, broker.url)


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
    browser.navigate(f"{sites[0]}/page.html")
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
    browser.navigate(f"{sites[1]}/page.html")
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
    browser.navigate(f"{sites[0]}/page.html")
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
