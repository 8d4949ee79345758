"""/client.js's onOpen: told once the broker has placed the stream, not on EventSource's open.

A broker that cannot read its store when a stream "from now" comes answers a 200 with
only a ``retry:`` hint and a body that ends at once (come back later). EventSource
fires ``open`` for it, and its reconnect starts from a later "now": a page that starts
its producer when its stream opens (open the stream, then POST the prompt) lost the
first events, told nothing. The helper tells ``onOpen`` at the stream's first
``broker.position`` or event instead, where "now" is.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

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
    """Redis is down when the page subscribes from now: the topic's end cannot be learnt
    (503), and the stream is answered come back later, on which EventSource fires open.
    onOpen is not told then (it was, and the producer's events, stored once Redis was
    back, came before the reconnect's "now"). Once Redis is back, the reconnect is placed,
    onOpen is told once, and every event the producer started there sends is received."""
    broker = broker_of_private_redis
    topic = f"face.placed.{uuid.uuid4().hex[:8]}"
    url = f"/topics/{topic}/events"
    private_redis.stop()
    browser.run_on_every_load(COUNT_OPENS_AND_PRODUCE % {"events": EVENTS, "url": json.dumps(url)})
    open_client_page(browser, broker, url, START_PRODUCER_ON_OPEN)
    browser.wait_for("window.__sourceOpens >= 1", what="EventSource's open on the come-back")
    assert _told(browser, "open") == [], "onOpen told for a stream the broker did not place"

    private_redis.start()  # (the same port: the broker's store answers again)
    browser.wait_for("window.__published !== undefined", timeout=30, what="the producer's batch")
    published = browser.evaluate("window.__published")
    assert isinstance(published, list) and len(published) == EVENTS, published
    wait_received(browser, 1 + EVENTS, "onOpen, then every event the producer sent")

    opens = _told(browser, "open")
    assert len(opens) == 1 and int(opens[0]["data"]) >= 2, opens  # on a later connection
    messages = _told(browser, "message")
    assert [e["data"] for e in messages] == [str(n) for n in range(EVENTS)]
    assert [e["id"] for e in messages] == published
    assert _told(browser, "error") == [] and _told(browser, "broker.gap") == []
