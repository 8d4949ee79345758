"""A streaming ingest whose own iterator raises midway, against a real broker process.

The lines sent before the error are stored; the caller must learn the stream's
Idempotency-Key (made up by the client when none was given), or a resend of the
stream stores those lines a second time."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from brokerclient import (
    AsyncPublisher,
    Publisher,
    RequestFailed,
    StreamInterrupted,
    StreamKeyboardInterrupt,
    event,
)
from brokerclient.publisher import EventObject
from tests.support.broker_process import BrokerProcess
from tests.support.polling import wait_until

LINES_BEFORE_THE_ERROR = 3


class ModelDied(Exception):
    """The caller's own error, raised by its iterator."""


def _topic() -> str:
    return f"face.interrupted.{uuid.uuid4().hex[:8]}"


def _history(url: str, topic: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{url}/topics/{topic}/events", headers={"Accept": "application/json"}, timeout=5
    )
    return list(response.json()["events"]) if response.status_code == 200 else []


def _generation(total: int) -> list[EventObject]:
    return [event({"n": n}, event="token") for n in range(total)]


def _dies_midway(cause: OSError) -> Iterator[EventObject]:
    yield from _generation(LINES_BEFORE_THE_ERROR)
    raise ModelDied("the model's process died") from cause


async def _async_dies_midway(cause: OSError) -> AsyncIterator[EventObject]:
    for item in _generation(LINES_BEFORE_THE_ERROR):
        yield item
    raise ModelDied("the model's process died") from cause


def _assert_the_callers_error_is_kept(interrupted: StreamInterrupted, cause: OSError) -> None:
    """The caller's error, its own cause still on it (httpcore re-raises what passes
    through it ``from None``), and the key made up for the stream."""
    assert isinstance(interrupted.__cause__, ModelDied)
    assert interrupted.__cause__.__cause__ is cause
    assert interrupted.lines_sent == LINES_BEFORE_THE_ERROR
    assert interrupted.idempotency_key.startswith("bc-")


def _assert_first_lines_stored_and_left_open(url: str, topic: str) -> None:
    """Stored as they arrived; the body was broken off, not ended: ``close=true`` did
    not close the topic (no broker.end)."""
    stored = wait_until(
        lambda: len(_history(url, topic)) >= LINES_BEFORE_THE_ERROR and _history(url, topic),
        timeout=5,
        what="the lines sent before the error",
    )
    assert [e["data"] for e in stored] == [{"n": n} for n in range(LINES_BEFORE_THE_ERROR)]


def _assert_each_line_stored_once(url: str, topic: str, total: int) -> None:
    stored = _history(url, topic)
    assert [e["data"] for e in stored] == [{"n": n} for n in range(total)] + [{}]
    assert stored[-1]["event"] == "broker.end"


def test_a_stream_whose_iterator_raises_tells_the_key_a_resend_stores_once_under(
    face_broker: BrokerProcess,
) -> None:
    """It raised the iterator's own error, and the key made up for the stream was known
    nowhere: a resend under a new key stored the first 3 lines twice."""
    topic, cause = _topic(), OSError("the GPU fell off the bus")
    with Publisher(face_broker.url) as publisher:
        with pytest.raises(StreamInterrupted) as raised:
            publisher.stream(topic, _dies_midway(cause), close=True)
        _assert_the_callers_error_is_kept(raised.value, cause)
        _assert_first_lines_stored_and_left_open(face_broker.url, topic)
        key = raised.value.idempotency_key
        again = publisher.stream(topic, _generation(5), idempotency_key=key, close=True)
    assert again.count == 5 and again.end_id is not None
    _assert_each_line_stored_once(face_broker.url, topic, total=5)


async def test_an_async_stream_whose_iterator_raises_tells_the_key_too(
    face_broker: BrokerProcess,
) -> None:
    topic, cause = _topic(), OSError("the GPU fell off the bus")
    async with AsyncPublisher(face_broker.url) as publisher:
        with pytest.raises(StreamInterrupted) as raised:
            await publisher.stream(topic, _async_dies_midway(cause), close=True)
        _assert_the_callers_error_is_kept(raised.value, cause)
        _assert_first_lines_stored_and_left_open(face_broker.url, topic)
        key = raised.value.idempotency_key
        again = await publisher.stream(topic, _generation(5), idempotency_key=key, close=True)
    assert again.count == 5 and again.end_id is not None
    _assert_each_line_stored_once(face_broker.url, topic, total=5)


def test_a_stream_given_its_key_is_interrupted_under_that_key(
    face_broker: BrokerProcess,
) -> None:
    with Publisher(face_broker.url) as publisher, pytest.raises(StreamInterrupted) as raised:
        publisher.stream(_topic(), _dies_midway(OSError()), idempotency_key="gen-7")
    assert raised.value.idempotency_key == "gen-7"


def test_a_keyboard_interrupt_in_the_iterator_stays_one_saying_its_key(
    face_broker: BrokerProcess,
) -> None:
    """A BaseException (Ctrl-C, a cancellation) is no error of the stream's to wrap as
    one (``StreamInterrupted``): a Ctrl-C stays a ``KeyboardInterrupt``, one that says
    the key to resend under (``StreamKeyboardInterrupt``)."""

    def interrupted() -> Iterator[EventObject]:
        yield event(1)
        raise KeyboardInterrupt

    with Publisher(face_broker.url) as publisher, pytest.raises(KeyboardInterrupt) as raised:
        publisher.stream(_topic(), interrupted(), idempotency_key="gen-8")
    assert isinstance(raised.value, StreamKeyboardInterrupt)
    assert (raised.value.idempotency_key, raised.value.after_line) == ("gen-8", 0)


def test_an_event_that_is_not_json_interrupts_the_stream_too(face_broker: BrokerProcess) -> None:
    """As the README says: the stream's own ValueError (a NaN has no JSON form) is the
    cause, the lines before it stored."""
    topic = _topic()
    events = [*_generation(LINES_BEFORE_THE_ERROR), event(float("nan"))]
    with Publisher(face_broker.url) as publisher:
        with pytest.raises(StreamInterrupted) as raised:
            publisher.stream(topic, events, close=True)
        assert isinstance(raised.value.__cause__, ValueError)
        assert raised.value.lines_sent == LINES_BEFORE_THE_ERROR
        _assert_first_lines_stored_and_left_open(face_broker.url, topic)
        publisher.publish(topic, "after")  # (TopicClosed, had close=true been done)


def test_other_events_resent_under_the_key_are_refused_not_spliced(
    face_broker: BrokerProcess,
) -> None:
    """Why the README says "the same events, from the first". Line n of a key was
    stored once whatever it held, so a model asked again (another answer) under the key
    left the topic with the dead answer's start, then the new answer's rest; the broker
    now refuses a resent line that is not the one stored, and stores nothing of it."""
    topic, cause = _topic(), OSError("the GPU fell off the bus")
    regenerated = [event({"again": n}, event="token") for n in range(5)]
    with Publisher(face_broker.url) as publisher:
        with pytest.raises(StreamInterrupted) as raised:
            publisher.stream(topic, _dies_midway(cause), close=True)
        _assert_first_lines_stored_and_left_open(face_broker.url, topic)
        key = raised.value.idempotency_key
        with pytest.raises(RequestFailed) as refused:
            publisher.stream(topic, regenerated, idempotency_key=key, close=True)
    assert refused.value.status == 400 and "line 1" in str(refused.value)
    stored = [e["data"] for e in _history(face_broker.url, topic)]
    assert stored == [{"n": n} for n in range(LINES_BEFORE_THE_ERROR)]  # and not closed
