"""/client.js notices a stream that died in silence, in headless Chromium.

A connection that dies with no FIN or RST (a phone's NAT mapping dropped, a laptop
that slept, a middlebox that timed the flow out) is noticed by no one: the browser
sends nothing on an event stream, so TCP never finds out, and an EventSource sees
neither the broker's heartbeat comments nor its Broker-Heartbeat header. The page
waited for ever. The helper asks for the heartbeats as ``broker.beat`` events and
opens the stream again from its place when they stop.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from brokerclient import Publisher
from tests.face.client_page import (
    MARK_SOURCE,
    SAME_SOURCE,
    open_client_page,
    page_messages,
    page_received,
    wait_messages,
)
from tests.support.broker_process import BrokerProcess
from tests.support.chromium import Chromium
from tests.support.silencing_proxy import SilencingProxy

pytestmark = pytest.mark.e2e

HEARTBEAT_SECONDS = 1  # face_broker's


def _errors(browser: Chromium) -> list[tuple[bool, int]]:
    told = [json.loads(e["data"]) for e in page_received(browser) if e["type"] == "error"]
    return [(error["fatal"], error["status"]) for error in told]


def test_a_stream_gone_silent_is_opened_again_from_its_place(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """The proxy between page and broker stops passing the stream's bytes, and closes
    nothing (the broker writes on). The page opens the stream again within two
    heartbeat intervals, a second, and its first reopening's second, and gets the event
    published meanwhile, once. (Before the watchdog it waited for ever: bounded here.)"""
    topic = f"face.silent.{uuid.uuid4().hex[:8]}"
    with SilencingProxy(face_broker.port) as proxy, Publisher(face_broker.url) as publisher:
        open_client_page(browser, proxy, f"/topics/{topic}/events?from=earliest")
        publisher.publish(topic, 1)
        wait_messages(browser, 1, "the first event")  # (after the stream's first beat)
        browser.evaluate(MARK_SOURCE)
        assert proxy.silence_streams() == 1
        silenced_at = time.monotonic()
        publisher.publish(topic, 2)
        wait_messages(browser, 2, "the event published while the stream was silent")
        took = time.monotonic() - silenced_at
        # (Looked at before the proxy closes: its end is one more reopening.)
        assert page_messages(browser) == [1, 2]
        ids = [e["id"] for e in page_received(browser) if e["type"] == "message"]
        assert len(set(ids)) == 2, ids
        assert _errors(browser) == [(False, 0)]  # one reopening, as after no answer
        assert browser.evaluate(SAME_SOURCE) is not True  # a new EventSource
    # Silent for 2 intervals and a second (3 s), then reopened after 1 s: up to 4 s from
    # the last beat before the silence; 3 s more for a busy machine.
    assert took < 4 * HEARTBEAT_SECONDS + 3, took


def test_a_quiet_stream_that_beats_is_left_open(
    face_broker: BrokerProcess, browser: Chromium
) -> None:
    """No event for five heartbeat intervals (more than one silence's limit, 3 s), and
    the page keeps its stream: the beats it hears are signs of life."""
    topic = f"face.quiet.{uuid.uuid4().hex[:8]}"
    with SilencingProxy(face_broker.port) as proxy, Publisher(face_broker.url) as publisher:
        open_client_page(browser, proxy, f"/topics/{topic}/events?from=earliest")
        publisher.publish(topic, 1)
        wait_messages(browser, 1, "the first event")
        browser.evaluate(MARK_SOURCE)
        quiet_until = time.monotonic() + 5 * HEARTBEAT_SECONDS
        while time.monotonic() < quiet_until:  # (bounded: five seconds)
            assert browser.evaluate(SAME_SOURCE) is True, _errors(browser)
            time.sleep(0.25)
        publisher.publish(topic, 2)
        wait_messages(browser, 2, "the next event, on the same stream")
        assert browser.evaluate(SAME_SOURCE) is True  # (before the proxy closes it)
        assert _errors(browser) == []
        assert page_messages(browser) == [1, 2]
