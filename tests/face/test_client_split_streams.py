"""A streaming ingest the client went on with as a stream of its own (the broker said
its lines up to line n were kept, the rest to go under ``K+n``), or whose iterator
raised once the broker had refused it, against a real broker process on a real
redis-server: whatever it raises says what a resend must do (the stream's parts and
their keys, or the broker's refusal), so that a caller resending it stores no line
twice."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from broker import constants as c
from brokerclient import (
    AsyncPublisher,
    Publisher,
    RequestFailed,
    StreamInterrupted,
    StreamPartFailed,
    TopicClosed,
    event,
)
from tests.http.helpers import read_metric
from tests.support.broker_process import BrokerProcess
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer
from tests.support.resetting_proxy import ResettingProxy

BAD_LINE = {"data": 4, "retry": "soon"}  # (refused by the broker: 400, naming its line)


def _topic(kind: str) -> str:
    return f"face.split.{kind}.{uuid.uuid4().hex[:8]}"


def _history(url: str, topic: str) -> list[Any]:
    response = httpx.get(
        f"{url}/topics/{topic}/events", headers={"Accept": "application/json"}, timeout=5
    )
    return [e["data"] for e in response.json()["events"]] if response.status_code == 200 else []


class ModelDied(Exception):
    """The caller's own error, raised by its iterator."""


def _ingest_refusals(url: str) -> float:
    """The 409s the broker has answered ingests with (counted as each is written)."""
    return read_metric(url, "broker_http_responses_total", {"route": "ingest", "status": "409"})


def _wait_for_a_refusal_after(url: str, refusals: float) -> None:
    """Until the broker has written its 409 to the stream's request (its body still
    open): what the client reads once its iterator raises."""
    wait_until(lambda: _ingest_refusals(url) > refusals, timeout=10, what="the broker's 409")


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

    def then_the_rest(self) -> Iterator[dict[str, Any]]:
        """Lines 1-2 under K, lines 3-5 (line 3 refused under K) under ``K+2``."""
        yield from (event(1), event(2))
        self.lapse_after_two()
        yield from (event(3), event(4), event(5))

    async def async_then_the_rest(self) -> AsyncIterator[dict[str, Any]]:
        for item in self.then_the_rest():
            yield item

    def then_dies_once_refused(self) -> Iterator[dict[str, Any]]:
        """Line 3 is refused (409, ``after_line`` 2), and the iterator raises after the
        broker's answer is written, before the client has read it."""
        yield from (event(1), event(2))
        self.lapse_after_two()
        refusals = _ingest_refusals(self.url)
        yield event(3)
        _wait_for_a_refusal_after(self.url, refusals)
        raise ModelDied("the model's process died")

    async def async_then_dies_once_refused(self) -> AsyncIterator[dict[str, Any]]:
        for item in self.then_dies_once_refused():
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
    assert _history(face_broker.url, topic) == [1, 2, 3]  # (1,2,1,2,3: its 409 was lost)


def _assert_told_to_go_on_after_two(interrupted: StreamInterrupted, key: str) -> None:
    """The broker's refusal, read: the events after line 2 go under ``K+2``."""
    assert isinstance(interrupted.__cause__, ModelDied), repr(interrupted.__cause__)
    assert (interrupted.after_line, interrupted.idempotency_key) == (2, f"{key}+2"), vars(
        interrupted
    )
    said = str(interrupted)
    assert "409" in said and "the events after the first 2" in said, said
    assert f"under idempotency key {key}+2" in said, said


def test_a_stream_whose_iterator_raises_once_the_broker_refused_it_tells_what_it_said(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """The broker had ended the request (409 ``ingest-records-lapsed``: lines 1-2 kept,
    the rest to go as a stream of their own) when the iterator raised: the client broke
    the request off unread and advised resending the same events, from the first, under
    K, which stores lines 1-2 twice (their records lapsed). It reads the answer now and
    says what it said; a resend as told stores each line once."""
    topic, key = _topic("refused-then-died"), "refused-then-died"
    fault = LapsesAfterTwoLines(face_broker.url, redis_server.url, topic, key)
    with Publisher(face_broker.url) as publisher:
        with pytest.raises(StreamInterrupted) as raised:
            publisher.stream(topic, fault.then_dies_once_refused(), idempotency_key=key)
        _assert_told_to_go_on_after_two(raised.value, key)
        rest = [event(n) for n in (3, 4, 5)]
        result = publisher.stream(topic, rest, idempotency_key=raised.value.idempotency_key)
    assert result.count == 3
    assert _history(face_broker.url, topic) == [1, 2, 3, 4, 5]


async def test_an_async_stream_whose_iterator_raises_once_refused_tells_what_it_said_too(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    topic, key = _topic("refused-then-died-async"), "refused-then-died-async"
    fault = LapsesAfterTwoLines(face_broker.url, redis_server.url, topic, key)
    async with AsyncPublisher(face_broker.url) as publisher:
        with pytest.raises(StreamInterrupted) as raised:
            await publisher.stream(topic, fault.async_then_dies_once_refused(), idempotency_key=key)
    _assert_told_to_go_on_after_two(raised.value, key)


def test_a_stream_whose_iterator_raises_once_its_topic_closed_raises_topic_closed(
    face_broker: BrokerProcess,
) -> None:
    """The topic was closed under the stream (409 at its line 2) before the iterator
    raised: ``StreamInterrupted`` advised resending under the key, which the broker
    refuses. The broker's answer is what is raised now, the caller's error its cause."""
    topic = _topic("closed-then-died")

    def closed_then_dies() -> Iterator[dict[str, Any]]:
        yield event(1)
        wait_until(lambda: _history(face_broker.url, topic) == [1], timeout=10, what="line 1")
        refusals = _ingest_refusals(face_broker.url)
        closed = httpx.post(f"{face_broker.url}/topics/{topic}/close", timeout=5)
        assert closed.status_code == 201, closed.text
        yield event(2)
        _wait_for_a_refusal_after(face_broker.url, refusals)
        raise ModelDied("the model's process died")

    with Publisher(face_broker.url) as publisher, pytest.raises(TopicClosed) as refused:
        publisher.stream(topic, closed_then_dies(), idempotency_key="closed-then-died")
    assert isinstance(refused.value.__cause__, ModelDied), repr(refused.value.__cause__)
    assert refused.value.status == 409 and refused.value.end_id is not None


class LapsesThenItsLogIsLost(LapsesAfterTwoLines):
    """Lines 1-2 stored, their records lapse, line 3 refused (409, ``after_line`` 2); the
    client goes on with lines 3.. under ``K+2``. Once it stored lines 3-5, the topic's
    log is lost whole (a Redis restarted without its data: every key of the topic gone),
    and line 6 is answered 503 ``ingest-log-lost`` (``resend: whole``)."""

    def then_lost(self) -> Iterator[dict[str, Any]]:
        yield from self._until_the_log_is_lost()
        yield from (event(6), event(7))

    def then_dies_once_lost(self) -> Iterator[dict[str, Any]]:
        """Line 6 answered 503 ``ingest-log-lost``, then the iterator raises, before the
        client has read the answer."""
        yield from self._until_the_log_is_lost()
        lost = _ingest_503s(self.url)
        yield event(6)
        wait_until(lambda: _ingest_503s(self.url) > lost, timeout=10, what="the broker's 503")
        raise ModelDied("the model's process died")

    def _until_the_log_is_lost(self) -> Iterator[dict[str, Any]]:
        yield from (event(1), event(2))
        self.lapse_after_two()
        refusals, lingered = _ingest_refusals(self.url), _lingering_timed_out(self.url)
        yield event(3)
        _wait_for_a_refusal_after(self.url, refusals)
        # The broker read and dropped what came after its 409 for a while (api.lingering),
        # then closed: lines 4-5, written to the connection it closed, fail there (the
        # second write), and the client reads the 409, and sends lines 3-5 under K+2
        # before it asks for line 6.
        wait_until(lambda: _lingering_timed_out(self.url) > lingered, timeout=10, what="the close")
        yield from (event(4), event(5))
        wait_until(
            lambda: _history(self.url, self.topic) == [1, 2, 3, 4, 5], timeout=10, what="3-5"
        )
        with redis.Redis.from_url(self.redis_url) as admin:
            admin.delete(*c.topic_keys(self.topic))


def _lingering_timed_out(url: str) -> float:
    """The connections the broker closed lingering that the client did not end."""
    return read_metric(url, "broker_lingering_closes_total", {"ending": "time"})


def _ingest_503s(url: str) -> float:
    return read_metric(url, "broker_http_responses_total", {"route": "ingest", "status": "503"})


def test_a_stream_gone_on_alone_whose_log_is_lost_is_sent_again_whole(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """A log lost under the ``K+2`` part took the stream's lines 1-2 with it (stored by the
    first part): the client resent only the part, lines 3.., under ``K+2``, and answered
    the caller the whole stream stored, its lines 1-2 missing from the topic for good,
    untold. The whole stream is sent again under K (its records went with the log)."""
    topic, key = _topic("log-lost"), "split-log-lost"
    fault = LapsesThenItsLogIsLost(face_broker.url, redis_server.url, topic, key)
    with Publisher(face_broker.url) as publisher:
        result = publisher.stream(topic, fault.then_lost(), idempotency_key=key)
    assert _history(face_broker.url, topic) == [1, 2, 3, 4, 5, 6, 7]
    assert (result.count, result.after_line, result.idempotency_key) == (7, 0, key)


def test_a_stream_gone_on_alone_whose_iterator_raises_once_its_log_was_lost_says_resend_whole(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """The iterator raised once the broker had answered the ``K+2`` part that its log was
    lost: the advice was to resend the events after the first 2 under ``K+2`` (lines 1-2,
    lost with the log, never sent again). It is the whole stream, under K."""
    topic, key = _topic("log-lost-died"), "split-log-lost-died"
    fault = LapsesThenItsLogIsLost(face_broker.url, redis_server.url, topic, key)
    with Publisher(face_broker.url) as publisher:
        with pytest.raises(StreamInterrupted) as raised:
            publisher.stream(topic, fault.then_dies_once_lost(), idempotency_key=key)
        interrupted = raised.value
        assert (interrupted.after_line, interrupted.idempotency_key) == (0, key), vars(interrupted)
        assert "the same events, from the first," in str(interrupted), str(interrupted)
        whole = [event(n) for n in range(1, 7)]
        publisher.stream(topic, whole, idempotency_key=interrupted.idempotency_key)
    assert _history(face_broker.url, topic) == [1, 2, 3, 4, 5, 6]


class TokenServiceDown(Exception):
    """The caller's token callable's own error."""


def _token_down_after(calls: int) -> Callable[[], str | None]:
    """A token callable that gives no token ``calls`` times, then raises."""
    asked = itertools.count(1)

    def token() -> str | None:
        if next(asked) > calls:
            raise TokenServiceDown("the token service is down")
        return None

    return token


def _assert_failed_naming_the_parts(failed: StreamPartFailed, key: str) -> None:
    assert isinstance(failed.__cause__, TokenServiceDown), repr(failed.__cause__)
    assert (failed.after_line, failed.idempotency_key) == (2, f"{key}+2"), vars(failed)
    assert failed.lines_sent >= 3  # (lines 4-5 may have gone before the refusal came)
    said = str(failed)
    assert "TokenServiceDown" in said and f"lines 1..2 were stored under {key}," in said, said
    assert f"after line 2 under {key}+2" in said and "never the whole stream" in said, said


def test_a_token_that_fails_once_a_stream_went_on_alone_names_its_parts(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """The token callable raised as the part ``K+2`` was to be sent: its own error went
    through as it was, with no word of the parts nor of ``K+2``, and a caller who resent
    the whole stream under K stored lines 1-2 twice. It is ``StreamPartFailed`` now,
    the token's error its cause, naming ``after_line`` and ``K+2``; resent as it says,
    each line is stored once."""
    topic, key = _topic("token-down"), "split-token-down"
    fault = LapsesAfterTwoLines(face_broker.url, redis_server.url, topic, key)
    with Publisher(face_broker.url, token=_token_down_after(1)) as publisher:
        with pytest.raises(StreamPartFailed) as failed:
            publisher.stream(topic, fault.then_the_rest(), idempotency_key=key)
    _assert_failed_naming_the_parts(failed.value, key)
    assert _history(face_broker.url, topic) == [1, 2]
    with Publisher(face_broker.url) as publisher:
        rest = [event(n) for n in (3, 4, 5)]
        publisher.stream(topic, rest, idempotency_key=failed.value.idempotency_key)
    assert _history(face_broker.url, topic) == [1, 2, 3, 4, 5]


async def test_an_async_token_that_fails_once_a_stream_went_on_alone_names_its_parts_too(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    topic, key = _topic("token-down-async"), "split-token-down-async"
    fault = LapsesAfterTwoLines(face_broker.url, redis_server.url, topic, key)
    async with AsyncPublisher(face_broker.url, token=_token_down_after(1)) as publisher:
        with pytest.raises(StreamPartFailed) as failed:
            await publisher.stream(topic, fault.async_then_the_rest(), idempotency_key=key)
    _assert_failed_naming_the_parts(failed.value, key)


def test_a_stream_in_parts_whose_last_part_was_replayed_is_not_said_replayed(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """The answer to the part ``K+2`` is lost (its connection reset as it came), so the
    part is sent again under ``K+2`` and replayed: each line is stored once (the reset
    of a part resends that part, exactly), but the result said ``replayed`` (nothing
    new stored) for a stream whose every line this call stored."""
    topic, key = _topic("part-replayed"), "split-part-replayed"
    fault = LapsesAfterTwoLines(face_broker.url, redis_server.url, topic, key)
    with ResettingProxy(face_broker.port) as proxy, Publisher(proxy.url) as publisher:
        proxy.reset_next_answer(b"201")
        result = publisher.stream(topic, fault.then_the_rest(), idempotency_key=key)
        assert proxy.resets == 1
    assert _history(face_broker.url, topic) == [1, 2, 3, 4, 5]
    assert (result.count, result.after_line, result.idempotency_key) == (5, 2, f"{key}+2")
    assert not result.replayed


WRITTEN_ON = 40
"""Lines of ``PAD`` a producer writes on once the broker answered (some 320 KB, within
what the broker reads and drops after an answer: api.lingering.LINGER_MAX_BYTES)."""
PAD = "x" * 8000


def test_a_stream_writing_on_after_the_answer_to_go_on_alone_reads_it_and_stores_once(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """Line 3 is refused (409, ``after_line`` 2, the connection closed) while the
    producer writes on, directly to the broker: it reads that answer, not a reset
    (a reset hides it where a middlebox or a system drops what it had not handed up;
    the broker closes lingering), and goes on with lines 3.. under ``K+2``, each
    stored once."""
    topic, key = _topic("writes-on"), "split-writes-on"
    fault = LapsesAfterTwoLines(face_broker.url, redis_server.url, topic, key)

    def lines() -> Iterator[dict[str, Any]]:
        yield from (event({"n": 1}), event({"n": 2}))
        fault.lapse_after_two()
        refusals = _ingest_refusals(face_broker.url)
        yield event({"n": 3})
        _wait_for_a_refusal_after(face_broker.url, refusals)
        yield from (event({"n": n, "pad": PAD}) for n in range(4, 4 + WRITTEN_ON))

    with Publisher(face_broker.url) as publisher:
        result = publisher.stream(topic, lines(), idempotency_key=key)
    assert [data["n"] for data in _history(face_broker.url, topic)] == list(
        range(1, 4 + WRITTEN_ON)
    )
    assert (result.count, result.after_line, result.idempotency_key) == (
        3 + WRITTEN_ON,
        2,
        f"{key}+2",
    )
