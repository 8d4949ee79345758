"""A page that uses /client.js the way a user's page would, for the browser tests."""

from __future__ import annotations

import json
from typing import Protocol

from tests.support.chromium import Chromium

# Subscribes on every load, and keeps what it received in sessionStorage, so that what a
# reload interrupts is still counted. %(options)s: more of subscribe's options.
CLIENT_PAGE = """
document.addEventListener("DOMContentLoaded", () => {
  const keep = (entry) => {
    const log = JSON.parse(sessionStorage.getItem("received") || "[]");
    log.push(entry);
    sessionStorage.setItem("received", JSON.stringify(log));
  };
  window.__keep = keep;
  const script = document.createElement("script");
  script.src = "/client.js";
  script.onload = () => {
    window.__stream = BrokerClient.subscribe(%(url)s, Object.assign({
      onEvent: (e) => keep(e),
      onGap: (gap) => keep({type: "broker.gap", data: JSON.stringify(gap)}),
      onEnd: (e) => keep(e),
      onError: (e) => keep({type: "error", data: JSON.stringify(e)}),
    }, %(options)s));
  };
  document.head.appendChild(script);
});
"""


class Origin(Protocol):
    """What serves the page: a broker, or a proxy before one."""

    @property
    def url(self) -> str: ...


RECEIVED = "JSON.parse(sessionStorage.getItem('received') || '[]')"
"""What the page kept, as a JavaScript expression."""
MARK_SOURCE = "window.__stream.source.__marked = true"
SAME_SOURCE = "window.__stream.source.__marked === true"
"""Whether the page's stream is still the EventSource marked by ``MARK_SOURCE``."""


def page_received(browser: Chromium) -> list[dict[str, str]]:
    return list(browser.evaluate(RECEIVED))


def page_messages(browser: Chromium) -> list[object]:
    """The data of the events the page was handed, parsed."""
    return [json.loads(e["data"]) for e in page_received(browser) if e["type"] == "message"]


def wait_messages(browser: Chromium, count: int, what: str, timeout: float = 15) -> None:
    browser.wait_for(
        f"{RECEIVED}.filter(e => e.type === 'message').length >= {count}",
        timeout=timeout,
        what=what,
    )


def open_client_page(browser: Chromium, origin: Origin, url: str, options: str = "{}") -> None:
    """A page of ``origin`` that subscribes to ``url`` with /client.js on every load
    (CLIENT_PAGE, with ``options``, a JavaScript object), and keeps what it receives."""
    browser.run_on_every_load(CLIENT_PAGE % {"url": json.dumps(url), "options": options})
    browser.navigate(origin.url + "/healthz")


def wait_received(browser: Chromium, count: int, what: str) -> None:
    browser.wait_for(
        f"JSON.parse(sessionStorage.getItem('received') || '[]').length === {count}", what=what
    )
