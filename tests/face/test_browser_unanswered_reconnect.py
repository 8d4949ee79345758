"""/client.js bounds a reconnect that is never answered, in headless Chromium.

A proxy, or a half-dead path, that takes a stream's request and answers nothing (or a
SYN into a route that was dropped) left the page's EventSource CONNECTING for as long
as the browser cared to wait: for ever, in Chromium. The helper watched a stream only
while it was open. It now closes an EventSource that stays connecting longer than a
silence would be allowed (two heartbeat intervals and a second, and the browser's own
reconnect its 2 s retry: wait), and opens the stream again from its place through its
own reopenings (1 s, 2 s... apart): one EventSource at a time, each told
``onError({fatal: false, status: 0})``.

But never sooner than a live broker may take to answer a stream's head while its store
is slow (21 s): with the face broker's 1 s heartbeat, the bound was 3 s, and a store
stall the broker rode out was given up on again and again until the page was told its
stream had ended for good. The pages that wait out the bound give it as ``connectFloorMs``
(5 s, still more than a silence: the floor is what bounds them), not to wait 21 s each;
the slow store's is the default's. Before any beat, the bound is by the heartbeat the page
assumes (``heartbeatMs``, by default the broker's default 15 s: 31 s).
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from brokerclient import Publisher
from tests.face.client_page import (
    MARK_SOURCE,
    RECEIVED,
    SAME_SOURCE,
    open_client_page,
    page_messages,
    page_received,
    wait_messages,
)
from tests.support.broker_process import BrokerProcess
from tests.support.chromium import Chromium
from tests.support.older_broker_proxy import OlderBrokerProxy
from tests.support.polling import wait_until
from tests.support.silencing_proxy import SilencingProxy

pytestmark = pytest.mark.e2e

HEARTBEAT_SECONDS = 1  # face_broker's
SILENCE_LIMIT = 2 * HEARTBEAT_SECONDS + 1  # an open stream, once a beat was heard
CONNECT_FLOOR = 5  # connecting, at least, as these pages set it (client.js's default: 21 s)
GIVEN_FLOOR = f"{{connectFloorMs: {CONNECT_FLOOR * 1000}}}"
RETRY_HINT = 2  # the broker's retry: (BROKER_RETRY_MS), the browser's wait before reconnecting
# Connecting before any beat told the interval, by the one a page assumes (heartbeatMs:
# client.js's default 15 s, 31 s; the face broker's 1 s here, and the floor is the bound).
ASSUMED_BEAT_SECONDS = HEARTBEAT_SECONDS
UNBEATEN_CONNECT_LIMIT = max(2 * ASSUMED_BEAT_SECONDS + 1, CONNECT_FLOOR)
BUSY_MACHINE = 3  # seconds more, for a shared machine
WAIT_ON_BASE = 20  # how long the page is given: the base waited for ever
SLOW_HEAD = 5  # how late a broker whose store is slow answers a stream's head, here


def _message_ids(browser: Chromium) -> list[str]:
    return [e["id"] for e in page_received(browser) if e["type"] == "message"]


def _errors(browser: Chromium) -> list[tuple[bool, int, int]]:
    told = [json.loads(e["data"]) for e in page_received(browser) if e["type"] == "error"]
    return [(error["fatal"], error["status"], error.get("retryInMs")) for error in told]


def _first_event_on_a_stream(
    browser: Chromium, proxy: SilencingProxy, publisher: Publisher, topic: str
) -> None:
    open_client_page(browser, proxy, f"/topics/{topic}/events?from=earliest", GIVEN_FLOOR)
    publisher.publish(topic, 1)
    wait_messages(browser, 1, "the first event")  # (after the stream's first beat)
    browser.evaluate(MARK_SOURCE)


def _held_closed_by_the_page(proxy: SilencingProxy) -> None:
    """The page let go of each connection that was never answered: one EventSource at a
    time (an abandoned one would still hold its connection open)."""
    wait_until(
        lambda: proxy.held_still_open() == 0,
        timeout=5,
        what="the page to close the stream it gave up on",
    )


def test_the_browsers_own_reconnect_never_answered_is_given_up_and_the_stream_reopened(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """The stream's connection ends (a FIN), the EventSource reconnects by itself, and the
    proxy takes that request and answers nothing. The page closes that EventSource after
    the retry: wait and the connecting bound (the page's floor, 5 s: more than two
    intervals and a second), opens the stream again from its place a second later, and
    gets the event published meanwhile, once. (The base of 370f215 left the browser
    waiting, for ever.)"""
    topic = f"face.unanswered.{uuid.uuid4().hex[:8]}"
    with SilencingProxy(face_broker.port) as proxy, Publisher(face_broker.url) as publisher:
        _first_event_on_a_stream(browser, proxy, publisher, topic)
        proxy.hold_next_streams(1)
        assert proxy.end_streams() == 1
        ended_at = time.monotonic()
        publisher.publish(topic, 2)
        wait_messages(browser, 2, "the event published meanwhile", timeout=WAIT_ON_BASE)
        took = time.monotonic() - ended_at
        assert page_messages(browser) == [1, 2]
        assert len(set(_message_ids(browser))) == 2, _message_ids(browser)
        # One reopening by the helper, after 1 s, as after no answer.
        assert _errors(browser) == [(False, 0, 1000)]
        assert browser.evaluate(SAME_SOURCE) is not True  # a new EventSource
        # The first stream, the browser's reconnect (held), the helper's: no more.
        assert proxy.streams_asked() == 3
        _held_closed_by_the_page(proxy)
    assert took < RETRY_HINT + CONNECT_FLOOR + 1 + BUSY_MACHINE, took


def test_a_reopening_never_answered_is_given_up_and_the_next_spaced_further(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """The stream goes silent; the helper's reopening (after 1 s) is taken and never
    answered. The page closes it after the connecting bound (its floor, 5 s), reopens
    2 s later (its backoff goes on: no storm), and gets the event published meanwhile,
    once. (The base of 370f215 never looked at a stream that did not open.)"""
    topic = f"face.unanswered.{uuid.uuid4().hex[:8]}"
    with SilencingProxy(face_broker.port) as proxy, Publisher(face_broker.url) as publisher:
        _first_event_on_a_stream(browser, proxy, publisher, topic)
        proxy.hold_next_streams(1)
        assert proxy.silence_streams() == 1
        silenced_at = time.monotonic()
        publisher.publish(topic, 2)
        wait_messages(browser, 2, "the event published meanwhile", timeout=WAIT_ON_BASE)
        took = time.monotonic() - silenced_at
        assert page_messages(browser) == [1, 2]
        assert len(set(_message_ids(browser))) == 2, _message_ids(browser)
        assert _errors(browser) == [(False, 0, 1000), (False, 0, 2000)]
        # The first stream, the reopening held, the next: no more.
        assert proxy.streams_asked() == 3
        _held_closed_by_the_page(proxy)
    # Silent (3 s from the last beat), 1 s, connecting (the floor, 5 s), 2 s.
    assert took < SILENCE_LIMIT + 1 + CONNECT_FLOOR + 2 + BUSY_MACHINE, took


def test_a_first_stream_never_answered_is_given_up_by_the_heartbeat_the_page_assumes(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """No beat heard yet, a stream connecting is bounded by two of the heartbeat the page
    assumes (``heartbeatMs``, 2 s here, with no floor: 5 s; by default 15 s: 31 s) and a
    second. Its first request, taken and never answered, is given up then, the stream
    opened again a second later, and the event published meanwhile delivered, once."""
    topic = f"face.unanswered.{uuid.uuid4().hex[:8]}"
    assumed_beat = 2
    with SilencingProxy(face_broker.port) as proxy, Publisher(face_broker.url) as publisher:
        proxy.hold_next_streams(1)
        page_options = f"{{connectFloorMs: 0, heartbeatMs: {assumed_beat * 1000}}}"
        opened_at = time.monotonic()
        open_client_page(browser, proxy, f"/topics/{topic}/events?from=earliest", page_options)
        publisher.publish(topic, 1)
        wait_messages(browser, 1, "the event published meanwhile", timeout=WAIT_ON_BASE)
        took = time.monotonic() - opened_at
        assert page_messages(browser) == [1]
        assert _errors(browser) == [(False, 0, 1000)]
        # The first stream (held), the helper's reopening: no more.
        assert proxy.streams_asked() == 2
        _held_closed_by_the_page(proxy)
    # Connecting (2 * 2 s + 1 s), then reopened after 1 s.
    assert took < 2 * assumed_beat + 1 + 1 + BUSY_MACHINE, took


def test_a_reconnect_answered_late_by_a_slow_store_is_waited_for(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """Redis is slow: the broker answers each stream's head 5 s after its request (well
    within what it may take: 20 s), for the next three streams; the page leaves
    ``connectFloorMs`` at its default (21 s). The stream's connection ends, and the
    browser's own reconnect is waited for: no error, the event published
    meanwhile delivered once, on the first stream asked again. (Bounded at 3 s, 5 s for
    the browser's own reconnect, each of the three was given up on as a retry, and with
    ``retries: 2`` the page was told its stream had ended for good: fatal.)"""
    topic = f"face.slowhead.{uuid.uuid4().hex[:8]}"
    with SilencingProxy(face_broker.port) as proxy, Publisher(face_broker.url) as publisher:
        open_client_page(browser, proxy, f"/topics/{topic}/events?from=earliest", "{retries: 2}")
        publisher.publish(topic, 1)
        wait_messages(browser, 1, "the first event")
        browser.evaluate(MARK_SOURCE)
        proxy.delay_next_streams(3, SLOW_HEAD)
        assert proxy.end_streams() == 1
        publisher.publish(topic, 2)
        browser.wait_for(  # (or the page told its stream ended: no use waiting more)
            f"{RECEIVED}.filter(e => e.type === 'message').length >= 2"
            f" || {RECEIVED}.some(e => e.type === 'error' && JSON.parse(e.data).fatal)",
            timeout=RETRY_HINT + SLOW_HEAD + 15,
            what="the event published meanwhile",
        )
        assert _errors(browser) == []
        assert page_messages(browser) == [1, 2]
        assert len(set(_message_ids(browser))) == 2, _message_ids(browser)
        assert browser.evaluate(SAME_SOURCE) is True  # (the browser's own reconnect)
        # The first stream, and the browser's reconnect, answered late: no more.
        assert proxy.streams_asked() == 2


def test_an_older_brokers_stream_with_no_beat_is_left_open(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """A broker older than ?heartbeat=event beats with comments, which a page does not
    see: no interval is learnt, and its open stream, quiet past the bound a connecting
    one has before any beat (the page's, 5 s: its floor, over two of the 1 s heartbeat it
    is told to assume and a second; 31 s by default), is kept, not reopened again and
    again."""
    topic = f"face.older.{uuid.uuid4().hex[:8]}"
    with OlderBrokerProxy(face_broker.port) as proxy, Publisher(face_broker.url) as publisher:
        page_options = (
            f"{{connectFloorMs: {CONNECT_FLOOR * 1000},"
            f" heartbeatMs: {ASSUMED_BEAT_SECONDS * 1000}}}"
        )
        open_client_page(browser, proxy, f"/topics/{topic}/events?from=earliest", page_options)
        publisher.publish(topic, 1)
        wait_messages(browser, 1, "the first event")
        browser.evaluate(MARK_SOURCE)
        quiet_until = time.monotonic() + UNBEATEN_CONNECT_LIMIT + 2
        while time.monotonic() < quiet_until:  # (bounded: 7 s)
            assert browser.evaluate(SAME_SOURCE) is True, _errors(browser)
            time.sleep(0.5)
        publisher.publish(topic, 2)
        wait_messages(browser, 2, "the next event, on the same stream")
        assert browser.evaluate(SAME_SOURCE) is True
        assert _errors(browser) == []
        assert page_messages(browser) == [1, 2]
        assert browser.evaluate("window.__stream.source.readyState") == 1  # (OPEN)


def test_the_helpers_own_events_are_told_to_no_callback_even_when_named(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """A page that names broker.beat and broker.position in ``types`` is handed neither
    (the helper promises them to no callback; named, they went to onEvent, a beat
    counted as an event delivered)."""
    topic = f"face.control.{uuid.uuid4().hex[:8]}"
    with Publisher(face_broker.url) as publisher:
        open_client_page(
            browser,
            face_broker,
            f"/topics/{topic}/events?from=earliest",
            '{types: ["broker.beat", "broker.position", "created"]}',
        )
        # A log with no event yet: the stream's start comes as a broker.position.
        publisher.publish(topic, 1)
        wait_messages(browser, 1, "the first event")
        # A listener of the page's own, after the helper's: when it has heard two beats,
        # the helper's listeners have had them.
        browser.evaluate(
            "window.__beats = 0; window.__stream.source.addEventListener("
            "'broker.beat', () => { window.__beats += 1; })"
        )
        browser.wait_for("window.__beats >= 2", timeout=10, what="two beats")
        assert [e["type"] for e in page_received(browser)] == ["message"]


def test_a_connecting_bound_past_what_a_browser_timer_holds_does_not_fire_at_once(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """``connectFloorMs`` past 2^31 - 1 ms (a page that means "wait as long as it takes",
    25 days): a browser's setTimeout fires a delay past that at once, so the bound was
    over before the stream's head came. Every stream was closed as never answered and
    opened again, 1 s, 2 s, 4 s... later, until the page was told its stream had ended
    for good. The bound is kept at the longest a timer holds: the stream stays open."""
    topic = f"face.longfloor.{uuid.uuid4().hex[:8]}"
    with Publisher(face_broker.url) as publisher:
        open_client_page(
            browser,
            face_broker,
            f"/topics/{topic}/events?from=earliest",
            "{connectFloorMs: 2 ** 31}",
        )
        publisher.publish(topic, 1)
        wait_messages(browser, 1, "the first event")
        browser.evaluate(MARK_SOURCE)
        quiet_until = time.monotonic() + 3
        while time.monotonic() < quiet_until:  # (bounded: 3 s)
            assert browser.evaluate(SAME_SOURCE) is True, _errors(browser)
            time.sleep(0.5)
        publisher.publish(topic, 2)
        wait_messages(browser, 2, "the next event, on the same stream")
        assert _errors(browser) == []
        assert page_messages(browser) == [1, 2]
        assert browser.evaluate(SAME_SOURCE) is True
