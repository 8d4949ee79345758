"""The npm ``eventsource`` client on a stream whose heartbeats are ``broker.beat`` events.

``?heartbeat=event`` (what /client.js asks for) sends each heartbeat as an event with no
id line. A client that does not listen for that type must see nothing of it, and its
Last-Event-ID must stay the last event's: a beat that reset it would have the next
reconnect start from now, and lose what was published meanwhile in silence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerclient import Publisher
from brokerclient.direct import DirectPublisher
from tests.e2e.clients import NodeEventSourceClient, Record
from tests.http.helpers import new_topic
from tests.support.broker_process import BrokerProcess
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e


@pytest.fixture
def beating_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """A broker of this test's own (it restarts it), beating every 0.5 s."""
    process = BrokerProcess(redis_url=redis_server.url, env={"BROKER_HEARTBEAT_SECONDS": "0.5"})
    process.start()
    yield process
    process.close()


async def _publish_directly(redis_url: str, topic: str, data: int) -> str:
    """An event published while no broker is up (straight to Redis): its id."""
    async with DirectPublisher(redis_url) as publisher:
        [event_id] = (await publisher.publish(topic, data)).ids
        return event_id


def _events(client: NodeEventSourceClient, event_type: str) -> list[Record]:
    client.poll()
    return [r for r in client.records if r["kind"] == "event" and r["type"] == event_type]


@pytest.mark.timeout(90)
def test_npm_eventsource_resumes_past_beats_with_the_last_events_id(
    beating_broker: BrokerProcess, tmp_path: Path
) -> None:
    """Beats heard between the first event and a restart of the broker: the client's
    reconnect resumes after that event (the beats, with no id, moved nothing), and it
    gets the event published while the broker was down, once. Its "message" listener
    hears no beat; a listener of "broker.beat" hears them, with the interval."""
    topic = new_topic()
    url = f"{beating_broker.url}/topics/{topic}/events?from=earliest&heartbeat=event"
    client = NodeEventSourceClient("npm-beats", url, tmp_path, types=("broker.beat",))
    try:
        client.start()
        with Publisher(beating_broker.url) as publisher:
            [first] = publisher.publish(topic, 1).ids
            wait_until(lambda: _events(client, "message"), timeout=20, what="the first event")
            seen = len(_events(client, "broker.beat"))
            wait_until(
                lambda: len(_events(client, "broker.beat")) >= seen + 3,
                timeout=10,
                what="three beats after the first event",
            )
            beating_broker.terminate()  # (drains: the stream ends, the client comes back)
            second = asyncio.run(_publish_directly(beating_broker.redis_url, topic, 2))
            beating_broker.start()
            wait_until(
                lambda: len(_events(client, "message")) >= 2, timeout=20, what="the second event"
            )
    finally:
        client.close()
    messages = _events(client, "message")
    assert [(r["id"], r["data"]) for r in messages] == [(first, "1"), (second, "2")]
    beats = _events(client, "broker.beat")
    assert {(r["data"], r["id"]) for r in beats} == {("0.5", "")}, beats[:3]
