"""The face in a real browser: headless Chromium on pages a real broker process serves.

Every test also checks the URL of every request the page made: none may leave
the broker's own origin on 127.0.0.1 (no CDN, no validator badge, no fonts).
Screenshots are kept in the ``artifacts`` folder (printed in the test's output).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from brokerclient import Publisher
from tests.face.client_page import open_client_page, page_received, wait_received
from tests.support.broker_process import BrokerProcess
from tests.support.chromium import Chromium
from tests.support.polling import WaitTimeout
from tests.support.redis_server import RedisServer
from tests.support.tokens import JWT_SETTINGS, claims, hs_token

pytestmark = pytest.mark.e2e


def _rows(browser: Chromium, selector: str) -> list[list[str]]:
    return list(
        browser.evaluate(
            f"[...document.querySelectorAll({json.dumps(selector)})]"
            ".map(row => [...row.children].map(cell => cell.textContent))"
        )
    )


# Every Content-Security-Policy violation of a page, kept from before its first script.
RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__violations.push(e.effectiveDirective + " " + e.blockedURI));
"""


def test_live_page_lists_topics_and_tails_them_live(
    face_broker: BrokerProcess, browser: Chromium, artifacts: Path
) -> None:
    topic = f"face.page.{uuid.uuid4().hex[:8]}"
    browser.run_on_every_load(RECORD_VIOLATIONS)
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topic, {"n": 0})
        browser.navigate(face_broker.url + "/")
        browser.evaluate(
            f"document.getElementById('tail-topic').value = {json.dumps(topic)};"
            "document.querySelector('#tail-form button[type=submit]').click()"
        )
        browser.wait_for("document.getElementById('tail-status').textContent.startsWith('Live')")
        # The topic is listed, with this instance's subscriber (the page's own tail).
        listed = f"""[...document.querySelectorAll('#topics tbody tr')]
            .some(r => r.dataset.topic === {json.dumps(topic)} && r.cells[3].textContent === '1')"""
        try:
            browser.wait_for(listed, what="the topic listed with one subscriber")
        except WaitTimeout as timeout:  # what the page showed instead, to tell why
            shown = browser.evaluate(
                "JSON.stringify({note: document.getElementById('topics-note').textContent,"
                " tail: document.getElementById('tail-status').textContent,"
                " rows: [...document.querySelectorAll('#topics tbody tr')]"
                ".map(r => [...r.cells].map(c => c.textContent))})"
            )
            raise AssertionError(f"{timeout}; the page showed {shown}") from None

        first = publisher.publish(topic, {"n": 1})
        publisher.publish_text(topic, "two\nlines", event="greeting")
        browser.wait_for("document.querySelectorAll('#tail-log li').length >= 2")
        rows = _rows(browser, "#tail-log li")
        assert rows[0] == [first.id, "message", '{"n":1}']
        assert rows[1][1:] == ["greeting", "two\nlines"]

        # The publish form: JSON with a type, answered with its id, seen by the tail.
        browser.evaluate(
            f"document.getElementById('publish-topic').value = {json.dumps(topic)};"
            "document.getElementById('publish-event').value = 'from-form';"
            "document.getElementById('publish-data').value = '{\"via\": \"form\"}';"
            "document.querySelector('#publish-form button[type=submit]').click()"
        )
        browser.wait_for(
            "document.getElementById('publish-result').textContent.startsWith('Stored')"
        )
        browser.wait_for("document.querySelectorAll('#tail-log li').length >= 3")
        assert _rows(browser, "#tail-log li")[2][1:] == ["from-form", '{"via":"form"}']
        rate = f"""[...document.querySelectorAll('#topics tbody tr')]
            .find(r => r.dataset.topic === {json.dumps(topic)}).cells[2].textContent"""
        browser.wait_for(f"parseFloat({rate}) > 0", what="a non-zero event rate")

    shot = browser.screenshot("live-page")
    print(f"screenshot: {shot}")
    (artifacts / "live-page.png").write_bytes(shot.read_bytes())
    assert browser.requests_leaving(face_broker.url) == []
    assert any(url.endswith(f"/topics/{topic}/events") for url in browser.requests)
    assert browser.evaluate("window.__violations") == [], "the page's own policy got in its way"


def test_the_live_page_may_make_no_outside_request(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """The page's policy lets it reach its own origin only: a script that found its way
    in (or a future change) cannot send what it reads elsewhere."""
    browser.run_on_every_load(RECORD_VIOLATIONS)
    browser.navigate(face_broker.url + "/")
    outside = face_broker.url.replace("127.0.0.1", "localhost") + "/healthz"
    refused = browser.evaluate(f"fetch({json.dumps(outside)}).then(() => false, () => true)")
    assert refused is True
    assert browser.evaluate("window.__violations") == [f"connect-src {outside}"]


def test_docs_render_the_routes_offline(
    face_broker: BrokerProcess, browser: Chromium, artifacts: Path
) -> None:
    browser.navigate(face_broker.url + "/docs")
    paths = browser.wait_for(
        "[...document.querySelectorAll('.opblock-summary-path')].map(e => e.textContent)",
        what="Swagger UI to render the operations",
    )
    assert "/topics/{topic}/events" in [p.replace("\u200b", "") for p in paths]
    shot = browser.screenshot("docs")
    (artifacts / "docs.png").write_bytes(shot.read_bytes())
    assert browser.requests_leaving(face_broker.url) == []


def test_docs_try_it_out_works_under_its_policy(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """/docs has a Content-Security-Policy of its own: Swagger UI still renders, with its
    icons, and "Try it out" still sends its request."""
    browser.run_on_every_load(RECORD_VIOLATIONS)
    browser.navigate(face_broker.url + "/docs")
    browser.wait_for(
        "document.getElementById('operations-health-healthz') !== null"
        " || document.querySelector('[id$=\"-healthz\"]') !== null",
        what="the /healthz operation",
    )
    browser.evaluate(
        "document.querySelector('[id$=\"-healthz\"] .opblock-summary-control').click()"
    )
    browser.wait_for("document.querySelector('.try-out__btn') !== null", what="Try it out")
    browser.evaluate("document.querySelector('.try-out__btn').click()")
    browser.wait_for("document.querySelector('.execute') !== null", what="Execute")
    browser.evaluate("document.querySelector('.execute').click()")
    status = browser.wait_for(
        "document.querySelector('.live-responses-table tbody .response-col_status')?.textContent",
        what="the response to show",
    )
    assert status.strip() == "200"
    assert browser.evaluate("window.__violations") == []
    assert browser.requests_leaving(face_broker.url) == []


FRAME = """new Promise((resolve) => {
  const frame = document.createElement("iframe");
  frame.src = %(path)s;
  frame.onload = () => resolve(Boolean(frame.contentDocument && frame.contentDocument.body
    && frame.contentDocument.body.children.length));
  document.body.appendChild(frame);
})"""


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_the_pages_may_not_be_framed(
    face_broker: BrokerProcess, browser: Chromium, path: str
) -> None:
    """Framed by a page of the same site, /docs let a visitor's clicks on "Try it out"
    close a topic with the visitor's cookie (its requests come from the broker's own
    origin, which the Origin check lets through). No page may frame either page, not
    even one of the broker's own origin."""
    browser.navigate(face_broker.url + "/healthz")
    assert browser.evaluate(FRAME % {"path": json.dumps(path)}) is False
    response = httpx.get(face_broker.url + path, timeout=10)
    assert response.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


@pytest.mark.parametrize(
    "path",
    ["/", "/docs", "/client.js", "/static/page.js", "/static/swagger-ui/swagger-ui.css", "/stats"],
)
def test_the_face_says_its_types_are_not_to_be_sniffed(
    face_broker: BrokerProcess, path: str
) -> None:
    response = httpx.get(face_broker.url + path, timeout=10)
    assert response.status_code == 200
    assert response.headers["x-content-type-options"] == "nosniff"


def _wait_closed(browser: Chromium, what: str) -> None:
    # (source is null until a stream from now has asked where its topic ends)
    browser.wait_for(
        "window.__stream && window.__stream.source && window.__stream.source.readyState === 2",
        what=what,
    )


def test_client_js_page_reloads_mid_stream_and_loses_nothing(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    topic = f"face.reload.{uuid.uuid4().hex[:8]}"
    total = 60
    url = f"/topics/{topic}/events?from=earliest"
    open_client_page(browser, face_broker, url)
    stop = threading.Event()

    def publish_slowly() -> None:
        with Publisher(face_broker.url) as publisher:
            for n in range(total):
                publisher.publish(topic, n)
                if stop.wait(0.04):
                    return

    publishing = threading.Thread(target=publish_slowly)
    publishing.start()
    try:
        for seen in (10, 25, 40):
            browser.wait_for(
                f"JSON.parse(sessionStorage.getItem('received') || '[]').length >= {seen}"
            )
            browser.reload()
        browser.wait_for(
            f"JSON.parse(sessionStorage.getItem('received') || '[]').length >= {total}",
            timeout=30,
        )
    finally:
        stop.set()
        publishing.join(timeout=30)

    received = page_received(browser)
    assert [entry["type"] for entry in received] == ["message"] * total  # no gap
    assert [json.loads(entry["data"]) for entry in received] == list(range(total))
    ids = [entry["id"] for entry in received]
    assert len(set(ids)) == total
    # Each reload resumed with the id the helper kept, not from the beginning.
    assert sum("last_event_id=" in request for request in browser.requests) >= 3


def test_a_closed_topic_ends_the_helpers_stream_for_good(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    topic = f"face.end.{uuid.uuid4().hex[:8]}"
    url = f"/topics/{topic}/events?from=earliest"
    open_client_page(browser, face_broker, url)
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topic, 1)
        publisher.publish(topic, 2, close=True)
    _wait_closed(browser, "the helper to close its EventSource")
    received = page_received(browser)
    assert [(e["type"], e["data"]) for e in received] == [
        ("message", "1"), ("message", "2"), ("broker.end", "{}"),
    ]  # fmt: skip
    # A reload resumes past the end: the broker answers 204 and EventSource stops for
    # good; the helper tells the page that its stream is over (onEnd, the end's id),
    # not that it failed.
    browser.reload()
    _wait_closed(browser, "the reloaded page's EventSource to stop")
    wait_received(browser, len(received) + 1, "onEnd after the reload (once the 204 is checked)")
    assert page_received(browser) == [*received, received[-1]]


def test_a_multi_topic_stream_goes_on_past_one_topics_end(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """The helper closes a multi-topic stream once each of its topics has ended."""
    first, second = (f"face.ends.{uuid.uuid4().hex[:8]}" for _ in range(2))
    url = f"/events?topic={first}&topic={second}&from=earliest"
    open_client_page(browser, face_broker, url)
    with Publisher(face_broker.url) as publisher:
        publisher.publish(first, 1, close=True)
        publisher.publish(second, 2)
        wait_received(browser, 3, "the first topic's end and the second topic's event")
        assert browser.evaluate("window.__stream.source.readyState") != 2, "closed at one end"
        publisher.publish(second, 3, close=True)
    _wait_closed(browser, "the helper to close its EventSource")
    received = [(e["type"], e["data"]) for e in page_received(browser)]
    # Each topic in its order; across topics a stream promises no order (two logs: the
    # live reader may read them on two connections).
    messages = [data for kind, data in received if kind == "message"]
    assert sorted(messages) == ["1", "2", "3"] and messages.index("2") < messages.index("3")
    ends = [n for n, (kind, _) in enumerate(received) if kind == "broker.end"]
    assert len(ends) == 2 and ends[-1] == len(received) - 1, received
    assert received.index(("message", "1")) < ends[0], received  # the first topic's end


def test_a_deleted_topic_ends_the_helpers_stream(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """A DELETE ends the stream with a ``deleted`` gap: the helper shows it and stops
    (reconnecting would be told again, then wait for ever on a log that is gone)."""
    topic = f"face.deleted.{uuid.uuid4().hex[:8]}"
    url = f"/topics/{topic}/events?from=earliest"
    open_client_page(browser, face_broker, url)
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topic, 1)
        wait_received(browser, 1, "the topic's event")
    assert httpx.delete(f"{face_broker.url}/topics/{topic}", timeout=10).status_code == 204
    _wait_closed(browser, "the helper to close its EventSource")
    received = page_received(browser)
    assert [e["type"] for e in received] == ["message", "broker.gap"], received
    assert json.loads(received[1]["data"])["reason"] == "deleted"
    # A reload comes back at the gap's id, is answered 204: the page is told onEnd (it
    # was onError, as for a refusal).
    browser.reload()
    _wait_closed(browser, "the reloaded page's EventSource to stop")
    wait_received(browser, 3, "onEnd after the reload (once the 204 is checked)")
    assert [e["type"] for e in page_received(browser)] == ["message", "broker.gap", "broker.end"]


def test_a_stream_from_now_of_a_closed_topic_ends_at_once(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """From now on a topic closed already: the broker answers 204, and the helper told
    the page onError, as for a refusal, not onEnd."""
    topic = f"face.closed.{uuid.uuid4().hex[:8]}"
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topic, 1, close=True)
    open_client_page(browser, face_broker, f"/topics/{topic}/events")
    _wait_closed(browser, "the helper's EventSource to stop")
    browser.wait_for(
        "JSON.parse(sessionStorage.getItem('received') || '[]').length === 1", what="onEnd"
    )
    assert [e["type"] for e in page_received(browser)] == ["broker.end"]


def test_a_multi_topic_stream_told_again_of_an_ended_topic_goes_on(
    own_broker: BrokerProcess, face_broker: BrokerProcess, browser: Chromium
) -> None:
    """The helper counted ends, not topics: a stream that saw its first topic's end, then
    was told of that topic's deletion on reconnecting (the broker was redeployed
    meanwhile), took the second topic for ended too, and closed: the page missed the
    rest of it."""
    first, second = (f"face.again.{uuid.uuid4().hex[:8]}" for _ in range(2))
    open_client_page(browser, own_broker, f"/events?topic={first}&topic={second}&from=earliest")
    with Publisher(own_broker.url) as publisher:
        publisher.publish(first, 1, close=True)
        publisher.publish(second, 2)
    wait_received(browser, 3, "the first topic's end and the second topic's event")
    own_broker.terminate()  # the page's EventSource reconnects, in vain for now
    assert httpx.delete(f"{face_broker.url}/topics/{first}", timeout=10).status_code == 204
    own_broker.start()
    wait_received(browser, 4, "the deletion, told on reconnecting")
    assert browser.evaluate("window.__stream.source.readyState") != 2, "closed at the deletion"
    with Publisher(own_broker.url) as publisher:
        publisher.publish(second, 3, close=True)
    _wait_closed(browser, "the helper to close its EventSource at the second topic's end")
    received = [(e["type"], e["data"]) for e in page_received(browser)]
    assert received[3][0] == "broker.gap" and received[4:] == [
        ("message", "3"), ("broker.end", "{}"),
    ], received  # fmt: skip


def test_a_multi_topic_stream_whose_other_topic_ended_before_it_ends_quietly(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """From now on two topics, the first closed already (the page never sees its end).
    At the second's end the broker ends the stream and answers the reconnect 204: the
    helper told the page onError, as for a refusal, after onEnd; and so on every
    reload. It is an end: no error, and a reload is told onEnd."""
    first, second = (f"face.before.{uuid.uuid4().hex[:8]}" for _ in range(2))
    with Publisher(face_broker.url) as publisher:
        publisher.publish(first, 1, close=True)
        open_client_page(browser, face_broker, f"/events?topic={first}&topic={second}")
        browser.wait_for(
            "window.__stream && window.__stream.source && window.__stream.source.readyState === 1",
            what="the helper's stream to open",
        )
        publisher.publish(second, 2, close=True)
    _wait_closed(browser, "the stream to end")
    wait_received(browser, 2, "the second topic's event and end")
    browser.wait_for(ENDED_KEPT, what="the helper to keep the end (once the 204 is checked)")
    received = page_received(browser)
    assert [e["type"] for e in received] == ["message", "broker.end"]
    browser.reload()
    _wait_closed(browser, "the reloaded page's EventSource to stop")
    wait_received(browser, 3, "onEnd after the reload")
    assert [e["type"] for e in page_received(browser)] == ["message", "broker.end", "broker.end"]


ENDED_KEPT = "Object.keys(sessionStorage).some(k => k.startsWith('broker-client:ended-at:'))"


@pytest.fixture
def auth_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    env = {
        "BROKER_HEARTBEAT_SECONDS": "1",
        **JWT_SETTINGS,
    }
    process = BrokerProcess(redis_url=redis_server.url, env=env)
    process.start()
    yield process
    process.close()


def test_a_refusal_after_one_topics_end_is_told_as_a_refusal(
    auth_broker: BrokerProcess, browser: Chromium
) -> None:
    """After one topic's end the helper took any stop of the stream for the end of the
    others (EventSource tells a 204 from a 401 in no way): the stream's token expired,
    the reconnect was refused, and the page was told nothing. It asks again: a 204 is
    an end, anything else onError."""
    first, second = (f"face.refused.{uuid.uuid4().hex[:8]}" for _ in range(2))
    rights = claims(publish=[first, second], subscribe=[first, second], expires_in=10)
    token = hs_token(rights)
    url = f"/events?topic={first}&topic={second}&from=earliest&access_token={token}"
    open_client_page(browser, auth_broker, url)
    with Publisher(auth_broker.url, token=hs_token(claims(publish=[first, second]))) as publisher:
        publisher.publish(second, 2)
        wait_received(browser, 1, "the second topic's event")
        publisher.publish(first, 1, close=True)
    wait_received(browser, 3, "the first topic's event and end")
    assert page_received(browser)[-1]["type"] == "broker.end"
    # The end delivered last, then the token expires (10 s: time enough for the page to
    # get its events on a busy machine): the broker ends the stream, and
    # the reconnect, with the same token, is 401.
    browser.wait_for(
        "JSON.parse(sessionStorage.getItem('received')).some(e => e.type === 'error')",
        timeout=30,
        what="onError once the token expired",
    )
    assert browser.evaluate(ENDED_KEPT) is False
    _assert_told_unauthorized(browser)


def _assert_told_unauthorized(browser: Chromium) -> None:
    """onError says why (it said only ``fatal``: a page could not tell an expired token,
    which a fresh cookie and a new subscribe mend, from a refusal for good)."""
    [error] = [json.loads(e["data"]) for e in page_received(browser) if e["type"] == "error"]
    assert error["fatal"] is True and error["status"] == 401, error
    assert error["problem"]["type"] == "/problems#unauthorized", error


def test_a_stream_whose_token_expired_is_told_why(
    auth_broker: BrokerProcess, browser: Chromium
) -> None:
    topic = f"face.expired.{uuid.uuid4().hex[:8]}"
    token = hs_token(claims(subscribe=[topic], expires_in=5))
    open_client_page(browser, auth_broker, f"/topics/{topic}/events?access_token={token}")
    with Publisher(auth_broker.url, token=hs_token(claims(publish=[topic]))) as publisher:
        publisher.publish(topic, 1)
    wait_received(browser, 1, "the event")
    browser.wait_for(
        "JSON.parse(sessionStorage.getItem('received')).some(e => e.type === 'error')",
        timeout=30,
        what="onError once the token expired",
    )
    _assert_told_unauthorized(browser)


def test_a_refused_stream_closed_by_the_page_tells_it_nothing_more(
    auth_broker: BrokerProcess, browser: Chromium
) -> None:
    """Asking the broker why it refused takes a round trip: a page that called close()
    meanwhile (it left that view) was told onError after it."""
    topic = f"face.closed.{uuid.uuid4().hex[:8]}"
    open_client_page(browser, auth_broker, "/healthz")  # (a page of the origin, no stream)
    refused = json.dumps(f"/topics/{topic}/events?from=earliest")  # no token: 401
    browser.evaluate(
        f"""(() => {{
          window.__told = [];
          const closing = BrokerClient.subscribe({refused}, {{
            onError: (e) => window.__told.push(["closed", e.status]),
          }});
          // The page's own listener, after the helper's: close() before the answer.
          closing.source.addEventListener("error", () => closing.close());
          BrokerClient.subscribe({refused}, {{
            onError: (e) => window.__told.push(["open", e.status]),
          }});
        }})()"""
    )
    told = browser.wait_for(
        "window.__told.some(t => t[0] === 'open') && window.__told",
        timeout=15,
        what="the refusal told to the page that kept its stream",
    )
    assert told == [["open", 401]], told


def test_the_live_pages_tail_resumes_from_its_cursor_before_its_first_event(
    own_broker: BrokerProcess, face_broker: BrokerProcess, browser: Chromium
) -> None:
    """The page's tail of a topic "from now" kept a place only from events: dropped
    before its first one, it came back "from now" again, and the events published
    meanwhile never showed. The broker's cursor (an id with no data) is its place.
    After a DELETE the page said "closed"; it says "deleted"."""
    topic = f"face.tail.{uuid.uuid4().hex[:8]}"
    with Publisher(own_broker.url) as publisher:
        publisher.publish(topic, 0)  # before the tail: not for it
    browser.navigate(own_broker.url + "/")
    browser.evaluate(
        f"document.getElementById('tail-topic').value = {json.dumps(topic)};"
        "document.querySelector('#tail-form button[type=submit]').click()"
    )
    browser.wait_for("document.getElementById('tail-status').textContent.startsWith('Live')")
    own_broker.terminate()
    with Publisher(face_broker.url) as publisher:
        published = [publisher.publish(topic, n).id for n in (1, 2, 3)]
    own_broker.start()
    browser.wait_for("document.querySelectorAll('#tail-log li').length >= 3", timeout=20)
    assert [row[0] for row in _rows(browser, "#tail-log li")] == published
    assert httpx.delete(f"{face_broker.url}/topics/{topic}", timeout=10).status_code == 204
    browser.wait_for(
        "document.getElementById('tail-status').textContent === 'The topic was deleted.'",
        what="the page to say the topic was deleted",
    )


SUBSCRIBE_AGAIN = "window.__stream = BrokerClient.subscribe(%(url)s, {onEvent: window.__keep});"


def test_the_helper_keeps_its_place_across_a_new_token(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """A page that subscribes again with a fresh ``?access_token=`` (the old one
    expired) resumes where it was: the token is not part of where the helper keeps
    its place."""
    topic = f"face.token.{uuid.uuid4().hex[:8]}"
    first = f"/topics/{topic}/events?from=earliest&access_token=old"
    open_client_page(browser, face_broker, first)
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topic, 1)
        wait_received(browser, 1, "the topic's first event")
        browser.evaluate("window.__stream.close()")
        publisher.publish(topic, 2)  # while the page has no stream
    second = f"/topics/{topic}/events?from=earliest&access_token=new"
    browser.evaluate(SUBSCRIBE_AGAIN % {"url": json.dumps(second)})
    wait_received(browser, 2, "the event published while the page had no stream")
    assert [json.loads(e["data"]) for e in page_received(browser)] == [1, 2]
    assert any("access_token=new" in r and "last_event_id=" in r for r in browser.requests)


@pytest.mark.parametrize("had_events", [True, False], ids=["topic-with-events", "new-topic"])
def test_a_stream_from_now_keeps_its_place_before_its_first_event(
    face_broker: BrokerProcess, browser: Chromium, had_events: bool
) -> None:
    """A stream "from now" that stops before its first event (a reload, a close) and
    comes back loses nothing published meanwhile: the helper kept where the topic
    ended when it began (a topic with no event yet: its beginning)."""
    topic = f"face.now.{uuid.uuid4().hex[:8]}"
    url = f"/topics/{topic}/events"
    with Publisher(face_broker.url) as publisher:
        if had_events:
            publisher.publish(topic, 0)  # before the stream: not for it
        open_client_page(browser, face_broker, url)
        browser.wait_for(
            "window.__stream && window.__stream.source && window.__stream.source.readyState === 1",
            what="the helper's stream to open",
        )
        browser.evaluate("window.__stream.close()")
        publisher.publish(topic, 1)  # while the page has no stream
        browser.evaluate(SUBSCRIBE_AGAIN % {"url": json.dumps(url)})
        browser.wait_for(
            "window.__stream.source && window.__stream.source.readyState === 1",
            what="the helper's second stream to open",
        )
        publisher.publish(topic, 2)
        wait_received(browser, 2, "the event published between the streams, and the next")
    assert [json.loads(e["data"]) for e in page_received(browser)] == [1, 2]


def test_a_multi_topic_stream_from_now_keeps_its_place_before_its_first_event(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """As for one topic: a multi-topic stream "from now" that stops before its first
    event comes back where its topics ended when it began (it came back "from now"
    again, and the events published meanwhile never showed); a topic with no event
    yet is read from its beginning, a topic that had events from its end."""
    old, new = (f"face.now-multi.{uuid.uuid4().hex[:8]}" for _ in range(2))
    url = f"/events?topic={old}&topic={new}"
    with Publisher(face_broker.url) as publisher:
        publisher.publish(old, 0)  # before the stream: not for it
        open_client_page(browser, face_broker, url)
        browser.wait_for(
            "window.__stream && window.__stream.source && window.__stream.source.readyState === 1",
            what="the helper's stream to open",
        )
        browser.evaluate("window.__stream.close()")
        publisher.publish(old, 1)  # while the page has no stream
        publisher.publish(new, 2)
        browser.evaluate(SUBSCRIBE_AGAIN % {"url": json.dumps(url)})
        browser.wait_for(
            "window.__stream.source && window.__stream.source.readyState === 1",
            what="the helper's second stream to open",
        )
        publisher.publish(new, 3)
        wait_received(browser, 3, "the events published between the streams, and the next")
    data = [json.loads(e["data"]) for e in page_received(browser)]
    assert sorted(data[:2]) == [1, 2] and data[2] == 3, data
    assert any("last_event_id=" in request for request in browser.requests)


def test_the_live_page_says_when_it_lists_only_some_topics(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """The page lists one page of topics (50): with more, it said nothing of the rest,
    and showed them in the order of a SCAN. It says there are more, in name order."""
    prefix = f"face.many.{uuid.uuid4().hex[:8]}."
    with Publisher(face_broker.url) as publisher:
        for n in range(60):
            publisher.publish(f"{prefix}{n:02d}", n)
    browser.navigate(face_broker.url + "/")
    browser.evaluate(
        f"document.getElementById('topics-prefix').value = {json.dumps(prefix)};"
        "document.getElementById('topics-prefix').dispatchEvent(new Event('input'))"
    )
    # (the page refreshes every 2 s: its list from before the prefix may be shown yet,
    # and with the other tests' topics it is more than a page too)
    shown = f"""[...document.querySelectorAll('#topics tbody tr')]
        .every(row => row.dataset.topic.startsWith({json.dumps(prefix)}))"""
    browser.wait_for(
        "document.getElementById('topics-note').textContent.includes('narrow them') && "
        f"document.querySelectorAll('#topics tbody tr').length > 0 && {shown}",
        what="the page to say it shows only some of the topics of the prefix",
    )
    names = [row[0] for row in _rows(browser, "#topics tbody tr")]
    assert names == sorted(names) and all(name.startswith(prefix) for name in names), names


def test_a_multi_topic_stream_reloaded_just_after_its_last_end_is_told_on_end(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """The helper counted a multi-topic stream's ended topics on one page only: a page
    reloaded after the first topic's end did not count it at the second's, so it kept
    no end; reloaded again before the broker's 204, it resumed past both ends, and
    that 204 was taken for a refusal: onError, on that load and every later one."""
    first, second = (f"face.reend.{uuid.uuid4().hex[:8]}" for _ in range(2))
    open_client_page(browser, face_broker, f"/events?topic={first}&topic={second}")
    browser.wait_for(STREAM_OPEN, what="the helper's stream to open")
    assert httpx.post(f"{face_broker.url}/topics/{first}/close", timeout=10).status_code == 201
    wait_received(browser, 1, "the first topic's end")
    browser.reload()
    browser.wait_for(STREAM_OPEN, what="the reloaded page's stream to open")
    assert httpx.post(f"{face_broker.url}/topics/{second}/close", timeout=10).status_code == 201
    wait_received(browser, 2, "the second topic's end")
    browser.reload()  # (before the broker ends the stream and answers the reconnect 204)
    wait_received(browser, 3, "onEnd after the reload")
    browser.reload()
    wait_received(browser, 4, "onEnd after another reload")
    assert [e["type"] for e in page_received(browser)] == ["broker.end"] * 4


STREAM_OPEN = "window.__stream && window.__stream.source && window.__stream.source.readyState === 1"


# Subscribes the helper "from now" to `count` topics in turn, each stream closed once it
# kept its place (so that the page never holds more than one open).
SUBSCRIBE_MANY = """(async () => {
  for (let n = 0; n < %(count)d; n++) {
    const stream = BrokerClient.subscribe("/topics/" + %(prefix)s + n + "/events", {});
    while (!stream.source) { await new Promise((resolve) => setTimeout(resolve, 5)); }
    stream.close();
  }
  return Object.keys(sessionStorage).filter(k => k.startsWith(%(places)s)).length;
})()"""
PLACE_PREFIX = "broker-client:last-event-id:"


def test_the_helper_keeps_the_places_of_a_bounded_number_of_streams(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """The helper kept one place per stream URL (and one per end) for ever: a page that
    opens a stream per item filled sessionStorage (~44,000 places), then nothing
    resumed, and the page's own setItem threw. It keeps the 200 used most recently."""
    prefix = f"face.places.{uuid.uuid4().hex[:8]}."
    topic = f"{prefix}kept"
    open_client_page(browser, face_broker, f"/topics/{topic}/events?from=earliest")

    def subscribe_many(batch: str, count: int) -> int:
        script = {"prefix": json.dumps(prefix + batch), "places": json.dumps(PLACE_PREFIX)}
        return int(browser.evaluate(SUBSCRIBE_MANY % {**script, "count": count}))

    with Publisher(face_broker.url) as publisher:
        publisher.publish(topic, 1)
        wait_received(browser, 1, "the stream's first event")
        assert subscribe_many("a.", 150) == 151
        browser.reload()  # the stream is subscribed again: the most recently used
        publisher.publish(topic, 2)
        wait_received(browser, 2, "the event after the reload")
        assert subscribe_many("b.", 100) == 200  # 251 used: the 51 oldest forgotten
        kept = browser.evaluate(
            f"Object.keys(sessionStorage).filter(k => k.startsWith('{PLACE_PREFIX}'))"
        )
        assert any(key.endswith(f"/topics/{topic}/events?from=earliest") for key in kept)
        assert not any(key.endswith(f"/topics/{prefix}a.50/events") for key in kept)
        assert any(key.endswith(f"/topics/{prefix}a.51/events") for key in kept)
        browser.reload()  # and the stream still resumes where it was
        publisher.publish(topic, 3)
        wait_received(browser, 3, "the event after the second reload")
    assert [json.loads(e["data"]) for e in page_received(browser)] == [1, 2, 3]


FILL_STORAGE = """(() => {
  let n = 0;
  for (const size of [1 << 20, 1 << 16, 1 << 10, 64, 1]) {
    try { for (;;) { sessionStorage.setItem("filler." + n++, "x".repeat(size)); } } catch (e) {}
  }
  return n;
})()"""
LOAD_CLIENT = """new Promise((resolve) => {
  const script = document.createElement("script");
  script.src = "/client.js";
  script.onload = resolve;
  document.head.appendChild(script);
})"""


def test_the_helper_warns_when_it_cannot_keep_a_place(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """A full sessionStorage refused the helper's place silently: reloads no longer
    resumed, and nothing said why. It warns on the console (once)."""
    topic = f"face.full.{uuid.uuid4().hex[:8]}"
    browser.navigate(face_broker.url + "/healthz")
    browser.evaluate(LOAD_CLIENT)
    browser.evaluate(FILL_STORAGE)
    browser.evaluate(
        "window.__got = []; BrokerClient.subscribe("
        f"{json.dumps(f'/topics/{topic}/events?from=earliest')},"
        " {onEvent: (e) => window.__got.push(e.data)})"
    )
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topic, 1)
        publisher.publish(topic, 2)
    browser.wait_for("window.__got.length === 2", what="the stream's events")
    warnings = [line for line in browser.console if "BrokerClient" in line]
    assert len(warnings) == 1 and "will not resume" in warnings[0], browser.console


def test_the_helper_resumes_after_the_id_its_caller_gives(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """A caller's ``?last_event_id=`` was dropped from where the helper keeps a stream's
    place: asked again after an earlier id than its place (the page's own record lost an
    event), the helper resumed after its place, and skipped the events between. The
    caller's id is part of the stream: a place kept for another id does not win."""
    topic = f"face.caller.{uuid.uuid4().hex[:8]}"
    with Publisher(face_broker.url) as publisher:
        first, second, _ = (publisher.publish(topic, n).id for n in (1, 2, 3))
        open_client_page(browser, face_broker, f"/topics/{topic}/events?last_event_id={first}")
        wait_received(browser, 2, "the events after the first")
        browser.evaluate("window.__stream.close()")
        publisher.publish(topic, 4)
        again = f"/topics/{topic}/events?last_event_id={second}"
        browser.evaluate(SUBSCRIBE_AGAIN % {"url": json.dumps(again)})
        wait_received(browser, 4, "the events after the second")
        # The page reloaded subscribes to its first stream again (after the first id):
        # that one resumes after its own place (3), not after the first id.
        browser.reload()
        publisher.publish(topic, 5)
        wait_received(browser, 6, "the first stream's events after its place")
    assert [json.loads(e["data"]) for e in page_received(browser)] == [2, 3, 3, 4, 4, 5]


def test_the_live_page_says_when_it_needs_a_token(
    auth_broker: BrokerProcess, browser: Chromium
) -> None:
    """With authorization on and no cookie, the page said "Showing 0 of more topics:
    narrow them with the prefix", and a refused token or tail showed its status
    alone ("The broker did not answer: 401 ..."). It says a token is needed."""
    topic = f"face.token-needed.{uuid.uuid4().hex[:8]}"
    with Publisher(auth_broker.url, token=hs_token(claims(publish=[topic]))) as publisher:
        publisher.publish(topic, 1)
    browser.navigate(auth_broker.url + "/")
    browser.wait_for(
        "document.getElementById('topics-note').textContent.includes('sent none')",
        what="the page to say it sent no token",
    )
    browser.evaluate(
        f"document.getElementById('tail-topic').value = {json.dumps(topic)};"
        "document.querySelector('#tail-form button[type=submit]').click()"
    )
    tail = "document.getElementById('tail-status').textContent"
    browser.wait_for(f"{tail}.startsWith('Refused')", what="the tail to be refused")
    assert "needs a valid token" in browser.evaluate(tail)
    expired = hs_token(claims(subscribe=[topic], expires_in=-60))
    browser.set_cookie("broker_token", expired, auth_broker.url)
    note = "document.getElementById('topics-note').textContent"
    browser.wait_for(f"{note}.includes('401')", what="the expired token to be refused")
    assert browser.evaluate(note).startswith("Refused: this needs a valid token")


def test_the_live_page_publishes_with_the_cookie(
    auth_broker: BrokerProcess, browser: Chromium
) -> None:
    """The page publishes by same-origin fetch, the token in the cookie: the forgery
    check takes it as the broker's own page (Chromium names the page's origin on a
    POST, same-origin too), as text and as JSON, and the events are stored."""
    topic = f"face.cookie-publish.{uuid.uuid4().hex[:8]}"
    browser.set_cookie("broker_token", hs_token(claims(publish=[topic])), auth_broker.url)
    browser.navigate(auth_broker.url + "/")
    result = "document.getElementById('publish-result').textContent"
    for kind, data in (("text", "plain words"), ("json", '{"via": "form"}')):
        browser.evaluate(
            f"document.getElementById('publish-topic').value = {json.dumps(topic)};"
            f"document.querySelector('input[name=publish-kind][value={kind}]').checked = true;"
            f"document.getElementById('publish-data').value = {json.dumps(data)};"
            "document.getElementById('publish-result').textContent = '';"
            "document.querySelector('#publish-form button[type=submit]').click()"
        )
        shown = browser.wait_for(result, what=f"the {kind} publish to be answered")
        assert shown.startswith("Stored"), shown
    history = httpx.get(
        f"{auth_broker.url}/topics/{topic}/events?from=earliest",
        headers={
            "Accept": "application/json",
            "Authorization": f"Bearer {hs_token(claims(subscribe=[topic]))}",
        },
        timeout=10,
    )
    assert history.status_code == 200, history.text
    assert [event["data"] for event in history.json()["events"]] == ["plain words", {"via": "form"}]


# A proxy before the broker that answers GET /topics/{t} with a 404 page of its own.
PROXYS_404_FOR_TOPIC_INFO = """
(function () {
  var fetch = window.fetch;
  window.fetch = function (url, init) {
    if (/\\/topics\\/[^/?]+([?]|$)/.test(String(url))) {
      return Promise.resolve(new Response("<h1>Not Found</h1>",
        {status: 404, headers: {"Content-Type": "text/html"}}));
    }
    return fetch.call(window, url, init);
  };
})();
"""


@pytest.mark.parametrize("multi", [False, True], ids=["one-topic", "two-topics"])
def test_a_stream_from_now_takes_only_the_brokers_404_for_no_event_yet(
    face_broker: BrokerProcess, browser: Chromium, multi: bool
) -> None:
    """Asked where a topic ends, a proxy's own 404 page (not the broker's problem) was
    taken for "no event yet": the stream "from now" replayed the topic's history. It is
    no answer, and not one coming back mends: the page is told onError({fatal: true})
    with its status, and no stream is opened (one opened "from now", as a plain
    EventSource, missed what was published before the broker placed it; the Python
    client raises too)."""
    topic = f"face.proxy404.{uuid.uuid4().hex[:8]}"
    other = f"face.proxy404.{uuid.uuid4().hex[:8]}"
    url = f"/events?topic={topic}&topic={other}" if multi else f"/topics/{topic}/events"
    browser.run_on_every_load(PROXYS_404_FOR_TOPIC_INFO)
    with Publisher(face_broker.url) as publisher:
        publisher.publish(topic, "before")  # before the stream: not for it
        open_client_page(browser, face_broker, url)
        wait_received(browser, 1, "the refusal, told")
    [told] = page_received(browser)
    assert told["type"] == "error", told
    assert json.loads(told["data"]) == {"fatal": True, "status": 404, "problem": None}
    assert browser.evaluate("window.__stream.source") is None
