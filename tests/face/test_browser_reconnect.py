"""/client.js behind a real nginx (the shipped configuration) whose broker goes away.

An EventSource stops for good when a reconnect is answered anything but 200: nginx's
502 while no broker is up (a rolling redeploy) ended the page's stream, and the helper
told it onError fatal, though the broker came back a moment later. The helper opens
the stream again from its place, and tells the page for good only of a refusal that
coming back will not mend (a 403), or of passing ones that go on too long.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerclient import Publisher
from tests.e2e.balancers import LoadBalancer, nginx_before
from tests.face.client_page import open_client_page, page_received
from tests.support.broker_process import BrokerProcess
from tests.support.chromium import Chromium
from tests.support.redis_server import RedisServer
from tests.support.tokens import JWT_SETTINGS, claims, hs_token

pytestmark = pytest.mark.e2e

STREAM_OPEN = "window.__stream && window.__stream.source && window.__stream.source.readyState === 1"
TOLD_ERROR = "JSON.parse(sessionStorage.getItem('received') || '[]').some(e => e.type === 'error')"
TOLD_FATAL = (
    "JSON.parse(sessionStorage.getItem('received') || '[]')"
    ".some(e => e.type === 'error' && JSON.parse(e.data).fatal)"
)


@pytest.fixture
def auth_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    process = BrokerProcess(
        redis_url=redis_server.url, env={"BROKER_HEARTBEAT_SECONDS": "1", **JWT_SETTINGS}
    )
    process.start()
    yield process
    process.close()


@pytest.fixture
def auth_nginx(auth_broker: BrokerProcess, tmp_path: Path) -> Iterator[LoadBalancer]:
    yield from nginx_before(auth_broker, tmp_path)


def _messages(browser: Chromium) -> list[object]:
    return [json.loads(e["data"]) for e in page_received(browser) if e["type"] == "message"]


def _errors(browser: Chromium) -> list[tuple[bool, int]]:
    told = [json.loads(e["data"]) for e in page_received(browser) if e["type"] == "error"]
    return [(error["fatal"], error["status"]) for error in told]


def _wait_messages(browser: Chromium, count: int, what: str) -> None:
    browser.wait_for(
        "JSON.parse(sessionStorage.getItem('received') || '[]')"
        f".filter(e => e.type === 'message').length >= {count}",
        timeout=30,
        what=what,
    )


def test_a_proxys_502_on_reconnect_is_outlasted(
    own_broker: BrokerProcess, nginx: LoadBalancer, face_broker: BrokerProcess, browser: Chromium
) -> None:
    """The broker behind nginx goes away and comes back: the page gets every event
    published meanwhile and after, once each, in order, and is told nothing fatal."""
    topic = f"face.redeploy.{uuid.uuid4().hex[:8]}"
    open_client_page(browser, nginx, f"/topics/{topic}/events?from=earliest")
    with Publisher(face_broker.url) as publisher:  # (the same Redis, not behind nginx)
        publisher.publish(topic, 1)
        _wait_messages(browser, 1, "the first event")
        own_broker.terminate()  # the stream ends; nginx answers its reconnect 502
        publisher.publish(topic, 2)
        publisher.publish(topic, 3)
        browser.wait_for(TOLD_ERROR, timeout=30, what="the 502 on reconnecting, told")
        own_broker.start()
        _wait_messages(browser, 3, "the events published while the broker was down")
        publisher.publish(topic, 4)
        _wait_messages(browser, 4, "the event published once it was back")
    assert _messages(browser) == [1, 2, 3, 4]
    ids = [e["id"] for e in page_received(browser) if e["type"] == "message"]
    assert len(set(ids)) == 4
    errors = _errors(browser)
    assert errors and all(error == (False, 502) for error in errors), errors
    assert browser.evaluate(STREAM_OPEN) is True


def test_a_403_after_a_passing_502_is_told_at_once(
    auth_broker: BrokerProcess, auth_nginx: LoadBalancer, browser: Chromium
) -> None:
    """While the broker is away the page's token loses its right to the topic: the
    reconnect, once the broker is back, is 403, which coming back will not mend. The
    page is told so (with the problem) at once, and the helper stops there."""
    topic = f"face.forbidden.{uuid.uuid4().hex[:8]}"
    browser.set_cookie("broker_token", hs_token(claims(subscribe=[topic])), auth_nginx.url)
    open_client_page(browser, auth_nginx, f"/topics/{topic}/events?from=earliest")
    with Publisher(auth_broker.url, token=hs_token(claims(publish=[topic]))) as publisher:
        publisher.publish(topic, 1)
    _wait_messages(browser, 1, "the event")
    auth_broker.terminate()
    browser.wait_for(TOLD_ERROR, timeout=30, what="the 502 on reconnecting, told")
    other = hs_token(claims(subscribe=[f"{topic}.other"]))
    browser.set_cookie("broker_token", other, auth_nginx.url)
    auth_broker.start()
    browser.wait_for(TOLD_FATAL, timeout=30, what="the 403 told")
    errors = _errors(browser)
    assert errors[-1] == (True, 403) and set(errors[:-1]) == {(False, 502)}, errors
    told = [json.loads(e["data"]) for e in page_received(browser) if e["type"] == "error"]
    assert told[-1]["problem"]["type"] == "/problems#forbidden", told[-1]
    # Nothing after it: a 403 taken for a passing refusal would have been told
    # fatal: false first (above); and for two seconds the page asks for nothing more.
    browser.evaluate("1")  # (collect the requests made so far)
    asked = len(browser.requests)
    time.sleep(2)
    browser.evaluate("1")
    assert browser.requests[asked:] == []
    assert browser.evaluate("window.__stream.source.readyState") == 2


def test_passing_refusals_that_go_on_are_told_for_good(
    own_broker: BrokerProcess, nginx: LoadBalancer, face_broker: BrokerProcess, browser: Chromium
) -> None:
    """The broker does not come back: after `retries` reopenings in a row (here 2, at
    1 s then 2 s), the page is told onError fatal with the last status."""
    topic = f"face.gone.{uuid.uuid4().hex[:8]}"
    open_client_page(browser, nginx, f"/topics/{topic}/events?from=earliest", "{retries: 2}")
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topic, 1)
    _wait_messages(browser, 1, "the event")
    own_broker.terminate()
    browser.wait_for(TOLD_FATAL, timeout=30, what="the page told for good")
    assert _errors(browser) == [(False, 502), (False, 502), (True, 502)]
    told = [json.loads(e["data"]) for e in page_received(browser) if e["type"] == "error"]
    assert [(e["attempt"], e["retryInMs"]) for e in told[:2]] == [(1, 1000), (2, 2000)]
    assert browser.evaluate("window.__stream.source.readyState") == 2


def test_a_stream_from_now_opened_while_no_broker_is_up_outlasts_it(
    own_broker: BrokerProcess, nginx: LoadBalancer, face_broker: BrokerProcess, browser: Chromium
) -> None:
    """A page subscribes "from now" while nginx has no broker up: where the topic ends
    cannot be learnt (502). The helper opened a stream with no place, which nginx
    refused too, and told the page that for good at once (reopened with no place, it
    would start from a later "now"). It asks where the topic ends again instead, as it
    reopens a refused stream (told onError, not fatal), and once the broker is back
    opens the stream there."""
    topic = f"face.placeless.{uuid.uuid4().hex[:8]}"
    browser.navigate(nginx.url + "/healthz")  # (a page of the origin, no stream yet)
    browser.evaluate(LOAD_HELPER)
    browser.wait_for("window.BrokerClient !== undefined", what="the helper loaded")
    own_broker.terminate()
    url = json.dumps(f"/topics/{topic}/events")
    browser.evaluate(
        f"window.__stream = BrokerClient.subscribe({url}, {{"
        "onError: window.__keep,"
        "onEvent: () => { window.__events = (window.__events || 0) + 1; },"
        "})"
    )
    browser.wait_for(TOLD_ERROR, timeout=30, what="the 502 told")
    assert browser.evaluate("window.__stream.source") is None  # (no stream with no place)
    own_broker.start()
    browser.wait_for(STREAM_OPEN, timeout=30, what="the stream, once the broker is back")
    with Publisher(face_broker.url) as publisher:  # (the same Redis, not behind nginx)
        publisher.publish(topic, 1)
        browser.wait_for("window.__events === 1", timeout=30, what="the event published then")
    errors = _errors(browser)
    assert errors and all(error == (False, 502) for error in errors), errors


def test_a_stream_from_now_keeps_the_place_its_stream_told_it_and_reopens_there(
    own_broker: BrokerProcess, nginx: LoadBalancer, face_broker: BrokerProcess, browser: Chromium
) -> None:
    """A stream whose topic's end could not be learnt at first (the page's fetch of GET
    /topics/{t} fails once) opens where it ends once that is learnt: that is its place,
    and refused later (nginx's 502 while the broker is down) it opens again from
    there, and gets what was published meanwhile."""
    topic = f"face.placeless.{uuid.uuid4().hex[:8]}"
    browser.run_on_every_load(FAILING_TOPIC_INFO)
    open_client_page(browser, nginx, f"/topics/{topic}/events")
    browser.wait_for(STREAM_OPEN, timeout=30, what="the stream open")
    browser.wait_for(
        "Object.keys(sessionStorage).some(k => k.startsWith('broker-client:last-event-id:'))",
        what="the place the stream told",
    )
    own_broker.terminate()
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topic, 1)  # (what a stream reopened "from now" would miss)
        browser.wait_for(TOLD_ERROR, timeout=30, what="the 502 told")
        own_broker.start()
        _wait_messages(browser, 1, "the event published while the broker was down")
    assert _messages(browser) == [1]
    assert _errors(browser) and all(not fatal for fatal, _ in _errors(browser)), _errors(browser)


# The helper on a page, and what it tells kept as the client page keeps it.
LOAD_HELPER = """
window.__keep = (e) => {
  const log = JSON.parse(sessionStorage.getItem("received") || "[]");
  log.push({type: "error", data: JSON.stringify(e)});
  sessionStorage.setItem("received", JSON.stringify(log));
};
const script = document.createElement("script");
script.src = "/client.js";
document.head.appendChild(script);
"""

# The page's first fetch of GET /topics/{t} fails (no answer), the next reach the broker.
FAILING_TOPIC_INFO = """
(function () {
  var fetch = window.fetch;
  var failed = false;
  window.fetch = function (url, init) {
    if (!failed && /\\/topics\\/[^/]+$/.test(String(url))) {
      failed = true;
      return Promise.reject(new TypeError("down"));
    }
    return fetch.call(window, url, init);
  };
})();
"""


def test_a_reload_of_a_stream_of_many_long_topic_names_fits_the_brokers_head(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """The helper resumes a reloaded stream by ``?last_event_id=``: built with
    URLSearchParams, every ":" of the topics and the cursor, and each "~" and "!", was
    percent-encoded, and 32 long names made a head past the broker's 16 KiB: 431, told
    fatal (review). The query is kept as written and the cursor added unencoded."""
    tag = uuid.uuid4().hex[:8]
    topics = [f"face:{tag}:{n:02d}" + ":x" * 90 for n in range(32)]  # 195 characters
    url = "/events?" + "&".join(f"topic={topic}" for topic in topics)
    open_client_page(browser, face_broker, url)
    browser.wait_for(STREAM_OPEN, timeout=30, what="the stream open")
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topics[3], 1)
        _wait_messages(browser, 1, "the first event")
        browser.reload()
        browser.wait_for(STREAM_OPEN, timeout=30, what="the stream open again")
        publisher.publish(topics[7], 2)
        _wait_messages(browser, 2, "the event after the reload")
    assert _messages(browser) == [1, 2]
    assert _errors(browser) == []
    resumed = [r for r in browser.requests if "last_event_id=" in r]
    assert resumed and "%3A" not in resumed[-1] and "%7E" not in resumed[-1], resumed[-1][:300]


def test_a_reconnect_past_the_head_limit_is_outlasted_by_reopening(
    own_broker: BrokerProcess, face_broker: BrokerProcess, browser: Chromium
) -> None:
    """A stream the helper opened by ``?last_event_id=`` is reconnected by the browser
    with its newer id in ``Last-Event-ID`` too: the cursor twice, and for 32 long topic
    names a head past the broker's limit (431; review). The helper asks again with the
    cursor once (200), and opens the stream again from its place: nothing missed."""
    tag = uuid.uuid4().hex[:8]
    topics = [f"face.{tag}.{n:02d}" + "x" * 180 for n in range(32)]
    url = "/events?" + "&".join(f"topic={topic}" for topic in topics)
    open_client_page(browser, own_broker, url)
    browser.wait_for(STREAM_OPEN, timeout=30, what="the stream open")
    with Publisher(face_broker.url) as publisher:  # (the same Redis)
        publisher.publish(topics[0], 1)
        _wait_messages(browser, 1, "the first event")
        own_broker.terminate()
        publisher.publish(topics[1], 2)
        own_broker.start()
        _wait_messages(browser, 2, "the event published while the broker was down")
        publisher.publish(topics[2], 3)
        _wait_messages(browser, 3, "the event after")
    assert _messages(browser) == [1, 2, 3]
    assert all(not fatal for fatal, _ in _errors(browser)), _errors(browser)
    assert (False, 200) in _errors(browser), "the reconnect was not refused: nothing tested"
