"""/client.js places a stream "from now" where its topics end, and opens it only there.

It asks ``GET /topics/{t}`` for each topic's newest id first. When that failed (a
proxy's 502 in a redeploy, the broker's 503 while its Redis is away) the helper opened
a bare stream "from now" instead: its "now" was whenever the broker placed it, so what
was published between subscribe() and then was missed, untold (a slow connection, a
proxy that takes its time), and until then it had no place (its first passing refusal
was told fatal: test_browser_reconnect.py). It asks again after 1 s, 2 s... as it
reopens a refused stream (the Python client retries that request too), and opens the
stream at the place it learnt: what is published from then on is received, however
late the stream is placed. (What is published before an answer comes is before "now",
as for any stream from now: asking again makes that "now" later by the wait.)

The failing answers come from a stand-in before ``fetch`` in the page (as a proxy's
would), the slow connection from one before ``EventSource``; everything else reaches
the real broker.
"""

from __future__ import annotations

import json
import uuid

import pytest

from brokerclient import Publisher
from tests.e2e.balancers import LoadBalancer
from tests.face.client_page import open_client_page, page_received
from tests.support.broker_process import BrokerProcess
from tests.support.chromium import Chromium

pytestmark = pytest.mark.e2e

# Answers GET /topics/{t} with a 503 problem %(failures)d times, then lets it reach the
# broker. window.__infoAsked counts the questions.
FAILING_TOPIC_INFO = """
(function () {
  var fetch = window.fetch;
  window.__infoAsked = 0;
  window.fetch = function (url, init) {
    if (!/\\/topics\\/[^/?]+([?]|$)/.test(String(url))) { return fetch.call(window, url, init); }
    window.__infoAsked += 1;
    if (window.__infoAsked <= %(failures)d) {
      return Promise.resolve(new Response(JSON.stringify({status: 503, title: "Unavailable"}),
        {status: 503, headers: {"Content-Type": "application/problem+json"}}));
    }
    return fetch.call(window, url, init);
  };
})();
"""

# A slow connection: the page's EventSources connect only once the test calls
# window.__connect() (window.__streams counts those asked for). Each stands for the real
# one it makes then, as far as the helper uses it.
SLOW_EVENT_SOURCE = """
(function () {
  var Native = window.EventSource;
  var connecting = new Promise(function (connect) { window.__connect = connect; });
  window.__streams = 0;
  function SlowEventSource(url, init) {
    var self = this, listeners = [];
    window.__streams += 1;
    this.readyState = Native.CONNECTING;
    this.addEventListener = function (type, listener) { listeners.push([type, listener]); };
    this.close = function () { self.closed = true; if (self.native) { self.native.close(); } };
    connecting.then(function () {
      if (self.closed) { return; }
      self.native = new Native(url, init);
      listeners.forEach(function (each) { self.native.addEventListener(each[0], each[1]); });
      var state = function () { return self.native.readyState; };
      Object.defineProperty(self, "readyState", { get: state });
    });
  }
  SlowEventSource.CONNECTING = Native.CONNECTING;
  SlowEventSource.OPEN = Native.OPEN;
  SlowEventSource.CLOSED = Native.CLOSED;
  window.EventSource = SlowEventSource;
})();
"""

STREAM_OPEN = "window.__stream && window.__stream.source && window.__stream.source.readyState === 1"


def _told(browser: Chromium, kind: str) -> list[dict[str, object]]:
    return [json.loads(e["data"]) for e in page_received(browser) if e["type"] == kind]


def _errors(browser: Chromium) -> list[tuple[bool, int]]:
    return [(bool(error["fatal"]), int(str(error["status"]))) for error in _told(browser, "error")]


def _wait_told(browser: Chromium, kind: str, count: int, what: str) -> None:
    browser.wait_for(
        "JSON.parse(sessionStorage.getItem('received') || '[]')"
        f".filter(e => e.type === {json.dumps(kind)}).length >= {count}",
        timeout=30,
        what=what,
    )


@pytest.mark.parametrize("multi", [False, True], ids=["one-topic", "two-topics"])
def test_a_stream_from_now_whose_topics_end_failed_opens_where_it_learnt_it(
    face_broker: BrokerProcess, browser: Chromium, multi: bool
) -> None:
    """The first answers are 503s, told onError({fatal: false}), and asked again; the
    helper's stream then takes its time to connect, and an event is published
    meanwhile: it is received (the stream opened at the place learnt), not the one
    before subscribe(). (It opened a bare stream "from now" at the first 503, placed
    once it connected, after that event: missed, untold.)"""
    topic = f"face.topic-end.{uuid.uuid4().hex[:8]}"
    other = f"face.topic-end.{uuid.uuid4().hex[:8]}"
    url = f"/events?topic={topic}&topic={other}" if multi else f"/topics/{topic}/events"
    browser.run_on_every_load(FAILING_TOPIC_INFO % {"failures": 2} + SLOW_EVENT_SOURCE)
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topic, "before")  # before subscribe(): not for the stream
        open_client_page(browser, face_broker, url)
        browser.wait_for("window.__streams === 1", timeout=30, what="the helper's stream")
        publisher.publish(topic, "meanwhile")  # before the stream is placed
        browser.evaluate("window.__connect()")
        browser.wait_for(STREAM_OPEN, timeout=30, what="the stream connected")
        publisher.publish(topic, "after")
        _wait_told(browser, "message", 2, "the event published meanwhile, and the next")
    assert [e["data"] for e in page_received(browser) if e["type"] == "message"] == [
        '"meanwhile"',
        '"after"',
    ]
    errors = _errors(browser)
    assert errors and all(error == (False, 503) for error in errors), errors


def test_a_stream_from_now_closed_while_it_waits_to_ask_again_asks_no_more(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """close() during the wait before asking again: nothing more is asked or opened."""
    topic = f"face.topic-end.{uuid.uuid4().hex[:8]}"
    browser.run_on_every_load(FAILING_TOPIC_INFO % {"failures": 100})
    open_client_page(browser, face_broker, f"/topics/{topic}/events")
    _wait_told(browser, "error", 1, "the first failure, told")
    browser.evaluate(
        "window.__stream.close();"
        # (past the 1 s wait before asking again, had close() not cancelled it)
        "setTimeout(() => { window.__pastRetry = true; }, 2500);"
    )
    browser.wait_for("window.__pastRetry === true", what="the time the helper would ask again")
    assert browser.evaluate("window.__infoAsked") == 1
    assert browser.evaluate("window.__stream.source") is None
    assert _errors(browser) == [(False, 503)]


def test_a_stream_from_now_whose_topics_end_fails_on_is_told_for_good(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """``retries`` failures in a row: told onError({fatal: true}), and no stream opened
    (it opened one "from now", which missed what came meanwhile)."""
    topic = f"face.topic-end.{uuid.uuid4().hex[:8]}"
    browser.run_on_every_load(FAILING_TOPIC_INFO % {"failures": 100})
    open_client_page(browser, face_broker, f"/topics/{topic}/events", "{retries: 1}")
    browser.wait_for(
        "JSON.parse(sessionStorage.getItem('received') || '[]')"
        ".some(e => e.type === 'error' && JSON.parse(e.data).fatal)",
        timeout=15,
        what="the failure told for good",
    )
    assert _errors(browser) == [(False, 503), (True, 503)]
    assert browser.evaluate("window.__infoAsked") == 2
    assert browser.evaluate("window.__stream.source") is None


def test_failures_while_placing_leave_the_stream_its_own_reopenings(
    own_broker: BrokerProcess, nginx: LoadBalancer, browser: Chromium
) -> None:
    """Two 503s while placing, then the broker goes away as the placed stream opens:
    it is reopened ``retries`` (3) times, each nginx's 502, before it is told for good.
    (The count of failures in a row went on from the placing ones, though the broker
    answered in between: one reopening only.)"""
    topic = f"face.topic-end.{uuid.uuid4().hex[:8]}"
    browser.run_on_every_load(FAILING_TOPIC_INFO % {"failures": 2} + SLOW_EVENT_SOURCE)
    open_client_page(browser, nginx, f"/topics/{topic}/events", "{retries: 3}")
    browser.wait_for("window.__streams === 1", timeout=30, what="the stream, placed")
    own_broker.terminate()  # nginx answers the stream, and each reopening, 502
    browser.evaluate("window.__connect()")
    browser.wait_for(
        "JSON.parse(sessionStorage.getItem('received') || '[]')"
        ".some(e => e.type === 'error' && JSON.parse(e.data).fatal)",
        timeout=30,
        what="the failure told for good",
    )
    placing = [(False, 503)] * 2
    assert _errors(browser) == placing + [(False, 502)] * 3 + [(True, 502)]
    assert browser.evaluate("window.__infoAsked") == 3
    assert browser.evaluate("window.__streams") == 4  # (the first, and three reopenings)
