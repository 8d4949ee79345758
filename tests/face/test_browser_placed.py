"""/client.js's onOpen: told once the broker has placed the stream, not on EventSource's open.

A broker that cannot read its store when a stream comes answers a 200 with only a
``retry:`` hint and a body that ends at once (come back later). EventSource fires
``open`` for it, and (a stream from now) its reconnect started from a later "now": a
page that starts its producer when its stream opens (open the stream, then POST the
prompt) lost the first events, told nothing. The helper tells ``onOpen`` at the
stream's first ``broker.position`` or event instead, where "now" is; and opens a
stream from now only once it knows where its topics end.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from brokerclient import Publisher
from tests.face.client_page import open_client_page, page_received, wait_received
from tests.support.broker_process import BrokerProcess
from tests.support.chromium import Chromium
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

EVENTS = 5

# Before the page's scripts: counts every "open" its EventSources fire (the helper keeps
# its own out of reach), and defines the page's producer: one batch of EVENTS events,
# POSTed again (same Idempotency-Key: stored once) while the broker cannot store it,
# a bounded number of times. %(url)s: the topic's events URL.
COUNT_OPENS_AND_PRODUCE = """
window.__sourceOpens = 0;
const NativeEventSource = window.EventSource;
window.EventSource = class extends NativeEventSource {
  constructor(url, init) {
    super(url, init);
    this.addEventListener("open", () => { window.__sourceOpens += 1; });
  }
};
window.__produce = async () => {
  const batch = JSON.stringify([...Array(%(events)d).keys()].map((n) => ({data: n})));
  const init = {
    method: "POST",
    headers: {"Content-Type": "application/json", "Idempotency-Key": "produce-once"},
    body: batch,
  };
  for (let attempt = 0; attempt < 100; attempt++) {  // 10 s at most
    const answer = await fetch(%(url)s, init).catch(() => null);
    if (answer && answer.ok) { window.__published = (await answer.json()).ids; return; }
    await new Promise((retry) => setTimeout(retry, 100));
  }
  window.__published = "gave up";
};
"""

# onOpen notes when it was told (after how many EventSource opens), then starts the producer.
START_PRODUCER_ON_OPEN = """{
  onOpen: () => {
    keep({type: "open", data: String(window.__sourceOpens)});
    window.__produce();
  },
}"""


@pytest.fixture
def broker_of_private_redis(private_redis: RedisServer) -> Iterator[BrokerProcess]:
    """A broker on this test's own redis-server, which the test stops and starts again."""
    process = BrokerProcess(redis_url=private_redis.url, env={"BROKER_HEARTBEAT_SECONDS": "1"})
    process.start()
    yield process
    process.close()


def _told(browser: Chromium, kind: str) -> list[dict[str, str]]:
    return [entry for entry in page_received(browser) if entry["type"] == kind]


def test_on_open_waits_for_the_stream_to_be_placed_and_a_producer_started_there_loses_nothing(
    broker_of_private_redis: BrokerProcess, private_redis: RedisServer, browser: Chromium
) -> None:
    """Redis is down when the page subscribes after an id it kept: the stream is
    answered come back later, on which EventSource fires open. onOpen is not told then
    (it was, and a producer started there, from now, lost its first events). Once
    Redis is back, the reconnect is placed, onOpen is told once, and every event the
    producer started there sends is received."""
    broker = broker_of_private_redis
    topic = f"face.placed.{uuid.uuid4().hex[:8]}"
    with Publisher(broker.url) as publisher:
        kept = publisher.publish(topic, "before").id  # (the page's place: not for it)
    url = f"/topics/{topic}/events?last_event_id={kept}"
    private_redis.stop()
    browser.run_on_every_load(COUNT_OPENS_AND_PRODUCE % {"events": EVENTS, "url": json.dumps(url)})
    open_client_page(browser, broker, url, START_PRODUCER_ON_OPEN)
    browser.wait_for("window.__sourceOpens >= 1", what="EventSource's open on the come-back")
    assert _told(browser, "open") == [], "onOpen told for a stream the broker did not place"

    private_redis.start()  # (the same port: the broker's store answers again)
    published = _produced(browser)
    wait_received(browser, 1 + EVENTS, "onOpen, then every event the producer sent")

    opens = _told(browser, "open")
    assert len(opens) == 1 and int(opens[0]["data"]) >= 2, opens  # on a later connection
    messages = _told(browser, "message")
    assert [e["data"] for e in messages] == [str(n) for n in range(EVENTS)]
    assert [e["id"] for e in messages] == published
    assert _told(browser, "error") == [] and _told(browser, "broker.gap") == []


def test_a_stream_from_now_is_opened_only_once_placed_and_its_producer_loses_nothing(
    broker_of_private_redis: BrokerProcess, private_redis: RedisServer, browser: Chromium
) -> None:
    """Redis is down when the page subscribes from now: where the topic ends cannot be
    learnt (503), and the helper asks again (told onError, not fatal) without opening
    a stream (one opened from now was placed only once Redis was back, after events
    published meanwhile). Once Redis is back, the stream opens where the topic ends,
    onOpen is told on its first connection, and the producer started there loses
    nothing."""
    broker = broker_of_private_redis
    topic = f"face.placed.{uuid.uuid4().hex[:8]}"
    url = f"/topics/{topic}/events"
    private_redis.stop()
    browser.run_on_every_load(COUNT_OPENS_AND_PRODUCE % {"events": EVENTS, "url": json.dumps(url)})
    open_client_page(browser, broker, url, START_PRODUCER_ON_OPEN)
    wait_received(browser, 1, "the topic's end that could not be learnt, told")
    assert browser.evaluate("window.__sourceOpens") == 0, "a stream opened with no place"

    private_redis.start()  # (the same port: the broker's store answers again)
    published = _produced(browser)
    browser.wait_for(
        "JSON.parse(sessionStorage.getItem('received') || '[]')"
        f".filter(e => e.type === 'message').length >= {EVENTS}",
        timeout=30,
        what="every event the producer sent",
    )

    opens = _told(browser, "open")
    assert len(opens) == 1 and int(opens[0]["data"]) == 1, opens  # its first connection
    messages = _told(browser, "message")
    assert [e["data"] for e in messages] == [str(n) for n in range(EVENTS)]
    assert [e["id"] for e in messages] == published
    errors = [json.loads(e["data"]) for e in _told(browser, "error")]
    assert errors and all(not e["fatal"] and e["status"] == 503 for e in errors), errors
    assert _told(browser, "broker.gap") == []


def _produced(browser: Chromium) -> list[str]:
    """The ids of the producer's batch, once stored."""
    browser.wait_for("window.__published !== undefined", timeout=30, what="the producer's batch")
    published = browser.evaluate("window.__published")
    assert isinstance(published, list) and len(published) == EVENTS, published
    return [str(id_) for id_ in published]
