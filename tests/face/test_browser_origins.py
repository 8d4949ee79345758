"""/client.js at the origin of an expiring topic, in Chromium: the place it keeps for a
page reload is where the stream stands (its ``broker.position`` events), so a page
that comes back after a log came and expired is told, and one that stayed open at
a quiet topic past its TTL is told nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import pytest

from brokerclient import Publisher
from tests.face.client_page import open_client_page, page_received, wait_received
from tests.support.broker_process import BrokerProcess
from tests.support.chromium import Chromium
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

TTL_S = 2
EXPIRING = "face.ttl."
POLICIES = [{"pattern": EXPIRING + "*", "ttl_seconds": TTL_S}]

KEPT_PLACE = """(() => {
  const key = Object.keys(sessionStorage).find((k) => k.startsWith("broker-client:last-event-id:"));
  return key ? sessionStorage.getItem(key) : null;
})()"""


@pytest.fixture(scope="module")
def expiring_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """Topics named ``face.ttl.*`` live TTL_S unused; others are kept."""
    env = {"BROKER_HEARTBEAT_SECONDS": "1", "BROKER_TOPIC_POLICIES": json.dumps(POLICIES)}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


def origin_ms(place: str | None, topic: str | None = None) -> int:
    """The store's time an origin in the kept place carries (0: none kept, or no time);
    ``topic``: its part of a multi-topic place."""
    if place and topic is not None:
        parts = dict(part.split("~", 1) for part in place.split("!"))
        place = parts.get(topic)
    if not place or not place.startswith("0."):
        return 0
    return int(place[2:].split("-")[0])


def kept_origin_ms(browser: Chromium, topic: str | None = None) -> int:
    return origin_ms(browser.evaluate(KEPT_PLACE), topic)


def wait_for_a_kept_origin(browser: Chromium, topic: str | None = None, after: int = 0) -> int:
    """Until the helper keeps an origin with a time later than ``after``; that time."""
    wait_until(
        lambda: kept_origin_ms(browser, topic) > after,
        timeout=TTL_S * 4,
        what=f"the helper to keep an origin later than {after}",
    )
    return kept_origin_ms(browser, topic)


def test_a_page_back_after_a_log_came_and_expired_is_told(
    expiring_broker: BrokerProcess, browser: Chromium
) -> None:
    """It subscribed "from now" to a topic with no event, went away, and a log came,
    was published to and expired meanwhile: the reload is told ``unknown`` (it came
    back ``?from=earliest`` and waited in silence), then gets what comes next."""
    topic = f"{EXPIRING}{uuid.uuid4().hex[:8]}"
    open_client_page(browser, expiring_broker, f"/topics/{topic}/events")
    wait_for_a_kept_origin(browser)
    browser.evaluate("window.__stream.close()")  # the page went away
    with (
        Publisher(expiring_broker.url) as publisher,
        httpx.Client(base_url=expiring_broker.url, timeout=5) as client,
    ):
        publisher.publish(topic, "lost")
        wait_until(
            lambda: client.get(f"/topics/{topic}").status_code == 404,
            timeout=TTL_S + 5,
            what="the log to expire whole",
        )
        browser.reload()
        wait_received(browser, 1, "the reload's unknown gap")
        publisher.publish(topic, "next")
        wait_received(browser, 2, "the event after the gap")
    gap, event = page_received(browser)
    assert gap["type"] == "broker.gap" and json.loads(gap["data"])["reason"] == "unknown", gap
    assert json.loads(event["data"]) == "next"


@pytest.mark.parametrize("multi", [False, True], ids=["one-topic", "two-topics"])
def test_a_page_that_stayed_at_a_quiet_topic_past_its_ttl_is_told_nothing_on_reload(
    expiring_broker: BrokerProcess, browser: Chromium, multi: bool
) -> None:
    """Open at a topic with no log for longer than its TTL, it missed nothing: the later
    origins its stream sent are kept, and a reload is told nothing (a place as old as
    the stream's start, or its last event, was told ``unknown`` for nothing). Two
    topics: the quiet one expires, the other (which had an event) does not."""
    quiet = f"{EXPIRING}{uuid.uuid4().hex[:8]}"
    other = f"face.kept.{uuid.uuid4().hex[:8]}"
    url = f"/events?topic={other}&topic={quiet}" if multi else f"/topics/{quiet}/events"
    part = quiet if multi else None
    with Publisher(expiring_broker.url) as publisher:
        open_client_page(browser, expiring_broker, url)
        first = wait_for_a_kept_origin(browser, part)
        if multi:  # the place is then the event's cursor, with the quiet topic's origin
            publisher.publish(other, "other")
            wait_received(browser, 1, "the other topic's event")
        # Kept fresh past the TTL: the helper holds a later origin than it began with.
        wait_for_a_kept_origin(browser, part, after=first + TTL_S * 1000)
        browser.reload()
        browser.wait_for(
            "window.__stream && window.__stream.source && window.__stream.source.readyState === 1",
            what="the reloaded page's stream to open",
        )
        publisher.publish(quiet, "first")
        wait_received(browser, 2 if multi else 1, "the quiet topic's first event")
    received = page_received(browser)
    assert [entry["type"] for entry in received] == ["message"] * len(received), received
    assert json.loads(received[-1]["data"]) == "first"
