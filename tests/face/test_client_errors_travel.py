"""The client's errors leave the process they were raised in, against a real broker.

A publisher run in a worker process (``concurrent.futures.ProcessPoolExecutor``,
``multiprocessing.Pool``) hands its error to the parent pickled. Rebuilt from its
message alone, as ``Exception`` is, an error whose ``__init__`` takes more (a status, a
key, the last line kept) could not be unpickled: the executor broke (every future
after it failed too), and a ``multiprocessing.Pool``'s result thread died, its caller
waiting for ever. ``copy.copy`` failed the same way."""

from __future__ import annotations

import concurrent.futures
import copy
import multiprocessing
import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from broker import constants as c
from brokerclient import (
    Publisher,
    RequestFailed,
    StreamInterrupted,
    StreamStopped,
    TopicClosed,
    event,
)
from brokerclient.publisher import EventObject
from tests.support.broker_process import BrokerProcess
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer


def _topic(kind: str) -> str:
    return f"face.travel.{kind}.{uuid.uuid4().hex[:8]}"


def _publish(url: str, topic: str) -> str:
    """In a worker process: one publish (to a closed topic: refused)."""
    with Publisher(url) as publisher:
        return publisher.publish(topic, "late").id


def _closed_topic(url: str) -> str:
    topic = _topic("closed")
    with Publisher(url) as publisher:
        publisher.publish(topic, "last", close=True)
    return topic


def _members(error: BaseException) -> tuple[type[BaseException], tuple[Any, ...], dict[str, Any]]:
    return type(error), error.args, vars(error)


def _assert_travels(error: BaseException) -> None:
    """Pickled and copied, the same error: its class, message and every member."""
    assert _members(pickle.loads(pickle.dumps(error))) == _members(error)
    assert _members(copy.copy(error)) == _members(error)


def test_a_refusal_raised_in_a_worker_process_reaches_its_parent(
    face_broker: BrokerProcess,
) -> None:
    """A publish to a closed topic in a ``ProcessPoolExecutor``: the parent gets its
    ``TopicClosed`` (409, the topic's end id), and the pool still works."""
    topic = _closed_topic(face_broker.url)
    context = multiprocessing.get_context("spawn")  # (no fork of the suite's threads)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        refused = pool.submit(_publish, face_broker.url, topic)
        with pytest.raises(TopicClosed) as closed:
            refused.result(timeout=60)
        assert closed.value.status == 409 and closed.value.end_id is not None
        assert pool.submit(str, 7).result(timeout=60) == "7"  # (not broken)


def test_a_refusal_is_pickled_and_copied_whole(face_broker: BrokerProcess) -> None:
    topic = _closed_topic(face_broker.url)
    with pytest.raises(RequestFailed) as refused:
        _publish(face_broker.url, topic)
    assert isinstance(refused.value, TopicClosed)
    _assert_travels(refused.value)


def test_a_stream_whose_own_iterator_raised_is_pickled_and_copied_whole(
    face_broker: BrokerProcess,
) -> None:
    def dies() -> Iterator[EventObject]:
        yield event(1)
        raise RuntimeError("the model died")

    with Publisher(face_broker.url) as publisher, pytest.raises(StreamInterrupted) as stopped:
        publisher.stream(_topic("interrupted"), dies(), idempotency_key="travel-interrupted")
    assert stopped.value.idempotency_key == "travel-interrupted"
    _assert_travels(stopped.value)


def test_a_stream_stopped_after_its_records_lapsed_is_pickled_and_copied_whole(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """Its line records lapse after line 2, under a key too long to derive ``K+2``
    from: the client stops, naming the last line kept (``StreamStopped``)."""
    topic, key = _topic("stopped"), "k" * 199

    def lines() -> Iterator[EventObject]:
        yield event(1)
        yield event(2)
        wait_until(lambda: _stored(face_broker.url, topic) == 2, timeout=10, what="2 lines")
        with redis.Redis.from_url(redis_server.url) as admin:
            admin.zadd(c.line_times_key(topic), {key: 0})  # (the records lapse)
        yield event(3)

    with Publisher(face_broker.url) as publisher, pytest.raises(StreamStopped) as stopped:
        publisher.stream(topic, lines(), idempotency_key=key)
    assert (stopped.value.last_line_kept, stopped.value.exact) == (2, True)
    _assert_travels(stopped.value)


def _stored(url: str, topic: str) -> int:
    response = httpx.get(
        f"{url}/topics/{topic}/events", headers={"Accept": "application/json"}, timeout=5
    )
    return len(response.json()["events"]) if response.status_code == 200 else 0
