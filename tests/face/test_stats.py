"""``/stats`` and the live page's numbers, from a real broker process."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from brokerclient import Publisher
from tests.support.broker_process import BrokerProcess
from tests.support.chromium import Chromium
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

STREAMED = 120  # topics one stream follows: more than /stats answers of them (100)


@pytest.fixture
def wide_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """A broker whose streams may follow STREAMED topics and more."""
    env = {
        "BROKER_HEARTBEAT_SECONDS": "1",
        "BROKER_MAX_TOPICS_PER_SUBSCRIPTION": "200",
        "BROKER_MAX_HEAD_BYTES": "131072",  # (what the reconnect of such a stream may take)
    }
    process = BrokerProcess(redis_url=redis_server.url, env=env)
    process.start()
    yield process
    process.close()


def _stats(broker: BrokerProcess, topics: list[str] = []) -> dict[str, Any]:  # noqa: B006
    response = httpx.get(f"{broker.url}/stats", params={"topic": topics}, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


@contextmanager
def _streaming(broker: BrokerProcess, topics: list[str]) -> Iterator[None]:
    """One stream "from now" of all ``topics``, open until the block ends, and live on
    each of them (counted by /stats) when the block begins."""
    params = [("topic", topic) for topic in topics]
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{broker.url}/events", params=params) as response,
    ):
        assert response.status_code == 200
        wait_until(
            lambda: sum(row["topic"] in topics for row in _stats(broker)["topics"]) >= 100,
            timeout=10,
            what="the instance to stream the topics",
        )
        yield


def test_stats_answers_the_topics_asked_for_beside_many_streamed(
    wide_broker: BrokerProcess,
) -> None:
    """The topics this instance streams came first, the whole answer cut at 100: past
    100 streamed topics, no topic asked for was answered (the live page showed no rate
    for any listed topic). Each has its own cap."""
    prefix = f"face.stats.{uuid.uuid4().hex[:8]}."
    asked = [f"{prefix}asked.{n}" for n in range(2)]
    with Publisher(wide_broker.url) as publisher:
        for topic in asked:
            publisher.publish(topic, 1)
    with _streaming(wide_broker, [f"{prefix}streamed.{n:03d}" for n in range(STREAMED)]):
        rows = _stats(wide_broker, asked)["topics"]
    assert [row["topic"] for row in rows[:2]] == asked
    assert all(row["events_per_second"] > 0 for row in rows[:2]), rows[:2]
    streamed = [row["topic"] for row in rows[2:]]
    assert len(streamed) == 100 and streamed == sorted(streamed)


def test_the_live_page_shows_a_page_of_topics_streamed_with_no_event(
    wide_broker: BrokerProcess, tmp_path: Path
) -> None:
    """The page added a row for every topic /stats named that no listing has (those
    streamed here with no event yet): an instance streaming many showed them all. It
    shows a page of them (50), and says there are more."""
    prefix = f"face.unlisted.{uuid.uuid4().hex[:8]}."
    streamed = [f"{prefix}{n:03d}" for n in range(STREAMED)]
    with (
        _streaming(wide_broker, streamed),
        Chromium(tmp_path, window=(1400, 900), enable=("Network",)) as browser,
    ):
        browser.navigate(wide_broker.url + "/")
        browser.evaluate(
            f"document.getElementById('topics-prefix').value = {json.dumps(prefix)};"
            "document.getElementById('topics-prefix').dispatchEvent(new Event('input'))"
        )
        rows = f"""[...document.querySelectorAll('#topics tbody tr')]
            .filter(row => row.dataset.topic.startsWith({json.dumps(prefix)})).length"""
        browser.wait_for(
            f"{rows} > 0 && document.getElementById('stats-note').textContent"
            ".includes('narrow them')",
            what="the page to show some of the streamed topics, and say there are more",
        )
        assert browser.evaluate(rows) == 50


@pytest.mark.parametrize("events", [40, 150, 1000])
def test_stats_rate_of_a_burst_is_its_count_over_the_window(
    face_broker: BrokerProcess, events: int
) -> None:
    """Past 100 events in the window, the rate was the first 100's count over the time
    from the window's start to the 100th: a 1000-event batch on a new topic read 3-4/s
    for its 33.3/s (1000 over 30 s). Counted whole, by the entries' numbers."""
    topic = f"face.rate.{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    with Publisher(face_broker.url) as publisher:
        publisher.publish_batch(topic, [{"data": n} for n in range(events)])
    [row] = _stats(face_broker, [topic])["topics"]
    assert time.monotonic() - started < 20, "too slow a machine for a 30 s window"
    assert row["events_per_second"] == pytest.approx(events / 30, abs=0.01)
