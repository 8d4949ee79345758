"""A streaming ingest the client went on with as a stream of its own (the broker said
its lines up to line n were kept, the rest to go under ``K+n``), then ended otherwise,
against a real broker process on a real redis-server: whatever it raises says the
stream was sent in parts, under which keys, so that a caller resending it stores no
line twice."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis

from broker import constants as c
from brokerclient import AsyncPublisher, Publisher, RequestFailed, event
from tests.support.broker_process import BrokerProcess
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer

BAD_LINE = {"data": 4, "retry": "soon"}  # (refused by the broker: 400, naming its line)


def _topic(kind: str) -> str:
    return f"face.split.{kind}.{uuid.uuid4().hex[:8]}"


def _history(url: str, topic: str) -> list[Any]:
    response = httpx.get(
        f"{url}/topics/{topic}/events", headers={"Accept": "application/json"}, timeout=5
    )
    return [e["data"] for e in response.json()["events"]] if response.status_code == 200 else []


class LapsesAfterTwoLines:
    """A stream whose line records lapse once its lines 1-2 are stored: the broker ends
    its request at line 3 with 409 ``ingest-records-lapsed`` (``resend: after_line``,
    2), and the client goes on with lines 3.. under ``K+2``."""

    def __init__(self, url: str, redis_url: str, topic: str, key: str) -> None:
        self.url, self.redis_url, self.topic, self.key = url, redis_url, topic, key

    def lapse_after_two(self) -> None:
        wait_until(lambda: len(_history(self.url, self.topic)) == 2, timeout=10, what="2 lines")
        with redis.Redis.from_url(self.redis_url) as admin:
            admin.zadd(c.line_times_key(self.topic), {self.key: 0})

    def then_a_bad_line(self) -> Iterator[dict[str, Any]]:
        yield from (event(1), event(2))
        self.lapse_after_two()
        yield from (event(3), BAD_LINE)

    async def async_then_a_bad_line(self) -> AsyncIterator[dict[str, Any]]:
        for item in self.then_a_bad_line():  # (its waits are short: the loop may block)
            yield item


def _assert_names_the_parts(error: RequestFailed, key: str) -> None:
    """Lines 1-2 under K, line 3 under K+2 (its line 1), the bad line its line 2."""
    assert error.status == 400, error
    assert (error.after_line, error.idempotency_key) == (2, f"{key}+2"), vars(error)
    said = str(error)
    assert f"lines 1..2 were stored under {key}," in said, said
    assert f"under {key}+2" in said and "never the whole stream" in said, said


def test_a_stream_refused_after_it_went_on_alone_names_its_parts_and_their_keys(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """The refusal of the ``K+2`` part (a bad line, 400) was a plain ``RequestFailed``
    that said neither that lines 1-2 were stored under K nor that its own line numbers
    count from the stream's line 3: a caller who resent the whole stream under K stored
    lines 1-2 twice. It carries ``after_line`` and the part's key now, and says so."""
    topic, key = _topic("bad-line"), "split-bad-line"
    fault = LapsesAfterTwoLines(face_broker.url, redis_server.url, topic, key)
    with Publisher(face_broker.url) as publisher, pytest.raises(RequestFailed) as refused:
        publisher.stream(topic, fault.then_a_bad_line(), idempotency_key=key)
    _assert_names_the_parts(refused.value, key)
    assert "line 2" in str(refused.value) and "count from the stream's line 3" in str(refused.value)
    assert _history(face_broker.url, topic) == [1, 2, 3]


async def test_an_async_stream_refused_after_it_went_on_alone_names_its_parts_too(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    topic, key = _topic("bad-line-async"), "split-bad-line-async"
    fault = LapsesAfterTwoLines(face_broker.url, redis_server.url, topic, key)
    async with AsyncPublisher(face_broker.url) as publisher:
        with pytest.raises(RequestFailed) as refused:
            await publisher.stream(topic, fault.async_then_a_bad_line(), idempotency_key=key)
    _assert_names_the_parts(refused.value, key)
