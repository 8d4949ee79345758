"""/client.js places a stream "from now" where its topics end, and opens it only there.

It asks ``GET /topics/{t}`` for each topic's newest id first. When that failed (a
proxy's 502 in a redeploy, the broker's 503 while its Redis is away) the helper opened
a bare stream "from now" instead: with no place until the broker placed it, its first
passing refusal was told fatal (see test_browser_reconnect.py), and a page reloaded
before then kept nothing. It asks again after 1 s, 2 s... as it reopens a refused
stream (the Python client retries that request too), and opens the stream at the
place it learnt: what is published from then on is received, however late the
stream is placed. (What is published before an answer comes is before "now", as
for any stream from now: asking again makes that "now" later by the wait.)

The failing answers come from a stand-in before ``fetch`` in the page (as a proxy's
would); everything else reaches the real broker.
"""

from __future__ import annotations

import json
import uuid

import pytest

from brokerclient import Publisher
from tests.face.client_page import open_client_page, page_received
from tests.support.broker_process import BrokerProcess
from tests.support.chromium import Chromium

pytestmark = pytest.mark.e2e

# Answers GET /topics/{t} with a 503 problem %(failures)d times, then lets it reach the
# broker; the first answer the broker gives is held (window.__held) until the test calls
# window.__release(): the test publishes between the helper's "now" and its stream.
# window.__infoAsked counts the questions.
FAILING_TOPIC_INFO = """
(function () {
  var fetch = window.fetch;
  var released = new Promise(function (release) { window.__release = release; });
  window.__infoAsked = 0;
  window.__held = false;
  window.fetch = function (url, init) {
    if (!/\\/topics\\/[^/?]+([?]|$)/.test(String(url))) { return fetch.call(window, url, init); }
    window.__infoAsked += 1;
    if (window.__infoAsked <= %(failures)d) {
      return Promise.resolve(new Response(JSON.stringify({status: 503, title: "Unavailable"}),
        {status: 503, headers: {"Content-Type": "application/problem+json"}}));
    }
    return fetch.call(window, url, init).then(function (answer) {
      window.__held = true;
      return released.then(function () { return answer; });
    });
  };
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
    broker's answer comes, and an event is published before the stream is placed: it is
    received (the stream opened at the place learnt), not the one before."""
    topic = f"face.topic-end.{uuid.uuid4().hex[:8]}"
    other = f"face.topic-end.{uuid.uuid4().hex[:8]}"
    url = f"/events?topic={topic}&topic={other}" if multi else f"/topics/{topic}/events"
    browser.run_on_every_load(FAILING_TOPIC_INFO % {"failures": 2})
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topic, "before")  # before the helper's "now": not for it
        open_client_page(browser, face_broker, url)
        browser.wait_for(
            f"window.__held || ({STREAM_OPEN})", timeout=30, what="the broker's answer"
        )
        publisher.publish(topic, "meanwhile")  # after it, before the stream is placed
        browser.evaluate("window.__release()")
        browser.wait_for(STREAM_OPEN, timeout=30, what="the stream, at the place learnt")
        publisher.publish(topic, "after")
        _wait_told(browser, "message", 2, "the event published meanwhile, and the next")
    assert [e["data"] for e in page_received(browser) if e["type"] == "message"] == [
        '"meanwhile"',
        '"after"',
    ]
    errors = _errors(browser)
    assert errors and all(error == (False, 503) for error in errors), errors
    assert any("last_event_id=" in request for request in browser.requests)


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
