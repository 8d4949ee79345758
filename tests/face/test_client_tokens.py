"""The Python client with a token given as a callable, against a real broker with
authorization on: a token that expires ends the stream (the broker's contract), and
the client goes on with a fresh one, from where it was."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from brokerclient import (
    AsyncPublisher,
    AsyncSubscriber,
    Event,
    Publisher,
    RequestFailed,
    RetryPolicy,
    Subscriber,
    event,
)
from tests.support.broker_process import BROKER_BIN, BrokerProcess
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer
from tests.support.tokens import JWT_SETTINGS, claims, hs_token

SHORT_S = 3  # a short token's life: its exp is an integer, so 2 to 3 s from its minting
WAIT_S = 20.0  # the longest any step may take


@pytest.fixture(scope="module")
def auth_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """A broker with authorization on; a 1 s heartbeat, so a stream ends within a third
    of a second of its token's exp."""
    process = BrokerProcess(
        redis_url=redis_server.url, env={"BROKER_HEARTBEAT_SECONDS": "1", **JWT_SETTINGS}
    )
    process.start()
    yield process
    process.close()


def _topic() -> str:
    return f"tokens.{uuid.uuid4().hex[:8]}"


def _publisher_token(topic: str) -> str:
    return hs_token(claims(publish=[topic], subscribe=[topic]))


def _exp(token: str) -> float:
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


def _history_ids(url: str, topic: str) -> list[str]:
    return [str(e["id"]) for e in _history(url, topic)]


def _history(url: str, topic: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{url}/topics/{topic}/events",
        headers={
            "Accept": "application/json",
            "Authorization": f"Bearer {_publisher_token(topic)}",
        },
        timeout=5,
    )
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


class Minter:
    """A token callable as an application writes one: it hands out a short-lived token
    first, then (once asked after it expired) fresh ones. On its second call, made when
    the stream has ended, it publishes ``while_away`` first: events the subscriber must
    get though no stream was open when they were stored (a restart "from now" loses
    them, one from the earliest repeats the first ones). ``stale_once``: the second call
    hands out the expired token once more (a cache a moment late), so the reconnect is
    refused 401 and the token asked again."""

    def __init__(
        self, topic: str, publish: Callable[[], None], *, stale_once: bool = False
    ) -> None:
        self.topic, self.publish, self.stale_once = topic, publish, stale_once
        self.short = hs_token(claims(subscribe=[topic], expires_in=SHORT_S))
        self.calls: list[float] = []  # when it was called

    def __call__(self) -> str:
        self.calls.append(time.time())
        if len(self.calls) == 1:
            return self.short
        if len(self.calls) == 2:
            assert time.time() >= _exp(self.short), "asked again before the token expired"
            self.publish()
            if self.stale_once:
                return self.short
        return hs_token(claims(subscribe=[self.topic]))


@pytest.mark.parametrize("stale_once", [False, True], ids=["fresh", "stale-then-fresh"])
def test_a_subscriber_whose_token_expires_goes_on_with_a_fresh_one(
    auth_broker: BrokerProcess, stale_once: bool
) -> None:
    topic = _topic()
    ids: list[str] = []
    received: queue.Queue[Event | BaseException] = queue.Queue()
    with Publisher(auth_broker.url, token=_publisher_token(topic)) as publisher:

        def publish(*data: int, close: bool = False) -> None:
            result = publisher.publish_batch(topic, [event(n) for n in data], close=close)
            ids.extend(result.ids)

        publish(0, 1, 2)
        minter = Minter(topic, lambda: publish(3, 4), stale_once=stale_once)
        subscriber = Subscriber(topic, auth_broker.url, from_earliest=True, token=minter)

        def follow() -> None:
            try:
                for item in subscriber:
                    received.put(item)
            except BaseException as error:  # (handed to the test's thread)
                received.put(error)

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        try:
            got = [received.get(timeout=WAIT_S) for _ in range(5)]  # 0-2, then 3-4 after the end
            assert all(isinstance(e, Event) for e in got), got
            assert len(minter.calls) == (3 if stale_once else 2)
            publish(5, 6, close=True)
            got += [received.get(timeout=WAIT_S) for _ in range(3)]  # 5, 6, broker.end
            reader.join(timeout=WAIT_S)
            assert not reader.is_alive()
        finally:
            subscriber.close()
    events = [e for e in got if isinstance(e, Event)]
    assert [e.event for e in events[-1:]] == ["broker.end"]
    assert [e.id for e in events[:-1]] == ids  # every event once, in order: no gap, no repeat
    assert [e.json() for e in events[:-1]] == list(range(7))
    assert ids == _history_ids(auth_broker.url, topic)[: len(ids)]
    assert received.empty()


async def test_an_async_subscriber_whose_token_expires_goes_on_with_a_fresh_one(
    auth_broker: BrokerProcess,
) -> None:
    """The same with an ``async def`` callable, which refreshes once it is refused
    (it hands out the expired token once more: the reconnect is answered 401)."""
    topic = _topic()
    short = hs_token(claims(subscribe=[topic], expires_in=SHORT_S))
    ids: list[str] = []
    calls: list[str] = []
    async with AsyncPublisher(auth_broker.url, token=_publisher_token(topic)) as publisher:

        async def publish(*data: int, close: bool = False) -> None:
            result = await publisher.publish_batch(topic, [event(n) for n in data], close=close)
            ids.extend(result.ids)

        async def token() -> str:
            calls.append("asked")
            if len(calls) == 2:  # the stream ended: its token expired
                assert time.time() >= _exp(short)
                await publish(3, 4)  # (while no stream is open)
            return short if len(calls) <= 2 else hs_token(claims(subscribe=[topic]))

        await publish(0, 1, 2)
        seen: list[Event] = []
        async with (
            asyncio.timeout(3 * WAIT_S),
            AsyncSubscriber(topic, auth_broker.url, from_earliest=True, token=token) as sub,
        ):
            async for item in sub:
                seen.append(item)
                if len(seen) == 5:  # 3 and 4 came after the refresh
                    assert len(calls) == 3
                    await publish(5, 6, close=True)
    assert [e.event for e in seen[-1:]] == ["broker.end"]
    assert [e.id for e in seen[:-1]] == ids
    assert [e.json() for e in seen[:-1]] == list(range(7))
    assert len(calls) == 3


def test_a_subscriber_whose_callable_keeps_giving_the_expired_token_fails_after_one_retry(
    auth_broker: BrokerProcess,
) -> None:
    """The stream ends at the token's exp; the reconnect is refused, the callable asked
    once more, refused again: RequestFailed(401), its cursor kept for a later resume."""
    topic = _topic()
    short = hs_token(claims(subscribe=[topic], expires_in=SHORT_S))
    calls: list[float] = []

    def token() -> str:
        calls.append(time.time())
        return short

    with Publisher(auth_broker.url, token=_publisher_token(topic)) as publisher:
        ids = publisher.publish_batch(topic, [event(0), event(1)]).ids
    seen: list[Event] = []
    started = time.monotonic()
    with (
        Subscriber(topic, auth_broker.url, from_earliest=True, token=token) as subscriber,
        pytest.raises(RequestFailed) as refused,
    ):
        for item in subscriber:  # (bounded: the token's exp ends the stream)
            seen.append(item)
    assert refused.value.status == 401
    assert len(calls) == 3  # the stream, its reconnect, one retry: never a loop
    assert calls[1] >= _exp(short)
    assert time.monotonic() - started < WAIT_S
    assert [e.id for e in seen] == ids
    assert subscriber.last_event_id == ids[-1]


async def test_an_async_subscriber_whose_async_callable_gives_an_expired_token_fails_after_one_retry(  # noqa: E501
    auth_broker: BrokerProcess,
) -> None:
    topic = _topic()
    expired = hs_token(claims(subscribe=[topic], expires_in=-60))
    calls: list[str] = []

    async def token() -> str:
        calls.append("asked")
        return expired

    async with AsyncSubscriber(topic, auth_broker.url, token=token) as subscriber:
        with pytest.raises(RequestFailed) as refused:
            async with asyncio.timeout(WAIT_S):
                async for _ in subscriber:
                    pass
    assert refused.value.status == 401
    assert calls == ["asked", "asked"]


class Tokens:
    """A callable handing out the tokens given, then the last one again."""

    def __init__(self, *tokens: str) -> None:
        self.tokens, self.calls = list(tokens), 0

    def __call__(self) -> str:
        self.calls += 1
        return self.tokens[min(self.calls, len(self.tokens)) - 1]


def test_a_publisher_with_a_callable_token_retries_a_401_once_with_a_fresh_one(
    auth_broker: BrokerProcess,
) -> None:
    topic = _topic()
    expired = hs_token(claims(publish=[topic], expires_in=-60))
    tokens = Tokens(expired, _publisher_token(topic))
    with Publisher(auth_broker.url, token=tokens) as publisher:
        first = publisher.publish(topic, "first")
        assert tokens.calls == 2  # refused, asked again, stored
        second = publisher.publish(topic, "second")
        assert tokens.calls == 3  # asked at each publish
    assert not first.replayed
    assert _history_ids(auth_broker.url, topic) == [first.id, second.id]


def test_a_publisher_whose_token_is_refused_twice_raises_401(auth_broker: BrokerProcess) -> None:
    topic = _topic()
    tokens = Tokens(hs_token(claims(publish=[topic], expires_in=-60)))
    with Publisher(auth_broker.url, token=tokens) as publisher, pytest.raises(RequestFailed) as e:
        publisher.publish(topic, "never")
    assert e.value.status == 401
    assert tokens.calls == 2


async def test_an_async_publisher_takes_an_async_token_and_retries_a_401_once(
    auth_broker: BrokerProcess,
) -> None:
    topic = _topic()
    tokens = Tokens(hs_token(claims(publish=[topic], expires_in=-60)), _publisher_token(topic))

    async def token() -> str:
        await asyncio.sleep(0)
        return tokens()

    async with AsyncPublisher(auth_broker.url, token=token) as publisher:
        result = await publisher.publish_text(topic, "stored")
    assert tokens.calls == 2
    assert _history_ids(auth_broker.url, topic) == [result.id]


def test_a_stream_whose_token_expires_midway_goes_on_with_a_fresh_one_storing_each_line_once(
    auth_broker: BrokerProcess,
) -> None:
    """A streaming ingest stores no line past its token's exp (401, the lines before
    stored): the publisher resends the stream under the same key with a fresh token,
    and goes on (line n is K:n: nothing is stored twice)."""
    topic = _topic()
    short = hs_token(claims(publish=[topic], expires_in=SHORT_S))
    tokens = Tokens(short, _publisher_token(topic))

    def lines() -> Iterator[dict[str, Any]]:
        for n in range(3):
            yield event(n)
        wait_until(lambda: _stored(auth_broker.url, topic) == 3, timeout=WAIT_S, what="3 lines")
        # The next lines come after the token's exp (the clock is the condition here).
        wait_until(lambda: time.time() >= _exp(short) + 0.1, timeout=WAIT_S, what="the exp")
        for n in range(3, 6):
            yield event(n)

    retry = RetryPolicy(attempts=3, backoff=0.05)
    with Publisher(auth_broker.url, token=tokens, retry=retry) as publisher:
        result = publisher.stream(topic, lines(), idempotency_key="gen-1")
    assert tokens.calls == 2
    stored = _history(auth_broker.url, topic)
    assert [e["data"] for e in stored] == list(range(6))  # each line once, in order
    assert result.last_id == stored[-1]["id"]


def test_a_stream_whose_token_expires_midway_goes_on_before_its_end(
    auth_broker: BrokerProcess,
) -> None:
    """The broker refusing a line past the token's exp (401) read and dropped the rest of
    the body: the producer learnt of it only at its body's end, and a generation's
    tokens past the exp reached its viewers only then (review). The connection now
    closes: the producer's next writes fail, and it resends with a fresh token while its
    tokens still come (paced, as a generation's are: bounded in count)."""
    topic = _topic()
    short = hs_token(claims(publish=[topic], expires_in=SHORT_S))
    tokens = Tokens(short, _publisher_token(topic))
    live_before_the_end: list[int] = []

    def lines() -> Iterator[dict[str, Any]]:
        yield event(0)
        wait_until(lambda: time.time() >= _exp(short) + 0.1, timeout=WAIT_S, what="the exp")
        for n in range(1, 60):
            yield event(n)
            if _stored(auth_broker.url, topic) > 1:  # a line past the exp stored, live
                live_before_the_end.append(n)
                return
            time.sleep(0.1)  # (a generation's pace)

    retry = RetryPolicy(attempts=3, backoff=0.05)
    with Publisher(auth_broker.url, token=tokens, retry=retry) as publisher:
        publisher.stream(topic, lines(), idempotency_key="gen-live")
    assert live_before_the_end, "nothing past the exp was stored before the stream ended"
    stored = _history(auth_broker.url, topic)
    assert [e["data"] for e in stored] == list(range(live_before_the_end[0] + 1))


def _stored(url: str, topic: str) -> int:
    return len(_history_ids(url, topic))


def test_tail_reads_its_token_file_again_at_each_connection(
    auth_broker: BrokerProcess, tmp_path: Path
) -> None:
    """``broker tail --token-file``: the file is read at each connection, so a tail goes
    on past its token's exp once something renewed the file (a mounted secret), from
    where it was.

    The file is a FIFO until the tail's reconnection, so that each read waits for the
    test: its first connection gets a short token minted as it reads (the tail's start,
    seconds under load, came before), and its reconnection is seen to read the file."""
    topic = _topic()
    token_file = tmp_path / "token"
    for fifo in (token_file, tmp_path / "first-connection", tmp_path / "reconnection"):
        os.mkfifo(fifo)
    renewed = tmp_path / "renewed"
    renewed.write_text(hs_token(claims(subscribe=[topic])))  # (a mounted secret, renewed)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    command = [str(BROKER_BIN), "tail", topic, "--from", "earliest", "--url", auth_broker.url]
    tail = subprocess.Popen(
        [*command, "--token-file", str(token_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
    )  # fmt: skip
    with Publisher(auth_broker.url, token=_publisher_token(topic)) as publisher:
        try:
            assert tail.stdout is not None
            first = publisher.publish(topic, "before").first_id
            _answer_a_read(token_file, _short_token(topic), then=tmp_path / "first-connection")
            short = _answer_a_read(token_file, _short_token(topic), then=tmp_path / "reconnection")
            assert json.loads(tail.stdout.readline())["id"] == first
            _answer_a_read(token_file, renewed.read_text(), then=renewed)  # past the exp
            assert time.time() >= _exp(short)  # (what ended its first connection)
            second = publisher.publish(topic, "after", close=True).first_id
            out, err = tail.communicate(timeout=WAIT_S)
        finally:
            tail.kill()
            tail.communicate()
    assert tail.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["id"], e["data"]) for e in events[:1]] == [(second, '"after"')], err
    assert [e["event"] for e in events[1:]] == ["broker.end"], events


def _short_token(topic: str) -> Callable[[], str]:
    return lambda: hs_token(claims(subscribe=[topic], expires_in=SHORT_S))


def _answer_a_read(token_file: Path, token: str | Callable[[], str], *, then: Path) -> str:
    """Waits for the tail to open ``token_file`` (a FIFO), puts ``then`` in its place for
    its next read, and answers this one with ``token`` (minted now, if a callable)."""
    writer = wait_until(
        lambda: _opened_by_a_reader(token_file), timeout=WAIT_S, what="the tail reading its token"
    )
    os.replace(then, token_file)  # (the reader holds the FIFO it opened)
    answer = token() if callable(token) else token
    with os.fdopen(writer, "w") as fifo:
        fifo.write(answer + "\n")
    return answer


def _opened_by_a_reader(fifo: Path) -> int | None:
    """The FIFO's write end, once a reader has opened it (``ENXIO`` until then)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
        if error.errno != errno.ENXIO:
            raise
        return None
