"""A subscriber's waits: its backoff ended by a close; its read timeout from the heartbeat
a broker says (``Broker-Heartbeat``; never under one the caller gave), and, against an
older broker that does not say it, guessed (grown past a longer heartbeat, learnt from
the heartbeats it reads)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerclient import AsyncPublisher, AsyncSubscriber, Event, Publisher, Subscriber
from brokerclient import resume as resume_module
from brokerclient import subscriber as subscriber_module
from tests.support.broker_process import BROKER_BIN, BrokerProcess
from tests.support.holding_proxy import HoldingProxy
from tests.support.older_broker_proxy import OlderBrokerProxy
from tests.support.polling import await_until, wait_until
from tests.support.redis_server import RedisServer, free_port

LONG_BACKOFF_S = 5.0


def _topic(kind: str) -> str:
    return f"face.{kind}.{uuid.uuid4().hex[:8]}"


def _backoff_under_way(caplog: pytest.LogCaptureFixture) -> float:
    """The delay of the backoff the subscriber has begun (0: none yet)."""
    delays = [
        float(record.args[-1])  # type: ignore[index]
        for record in caplog.records
        if record.name == subscriber_module.__name__ and "reconnecting in" in record.msg
    ]
    return delays[-1] if delays else 0.0


@pytest.fixture
def long_backoff(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> pytest.LogCaptureFixture:
    """The first reconnect waits ``LONG_BACKOFF_S`` (the longest backoff); its log
    record tells when it has begun."""
    monkeypatch.setattr(resume_module, "FIRST_DELAY", LONG_BACKOFF_S)
    caplog.set_level(logging.INFO, logger=subscriber_module.__name__)
    return caplog


def test_closing_a_subscriber_during_its_backoff_ends_it_at_once(
    long_backoff: pytest.LogCaptureFixture,
) -> None:
    """It slept the backoff out (``time.sleep``): up to 5 s after ``close()``."""
    subscriber = Subscriber(
        _topic("backoff"), f"http://127.0.0.1:{free_port()}", from_earliest=True
    )
    iterating = threading.Thread(target=lambda: list(subscriber))
    iterating.start()
    delay = wait_until(
        lambda: _backoff_under_way(long_backoff), timeout=10, what="the subscriber's backoff"
    )
    began = time.monotonic()
    subscriber.close()
    iterating.join(timeout=2 * delay)
    elapsed = time.monotonic() - began
    assert not iterating.is_alive()
    assert delay == LONG_BACKOFF_S and elapsed < delay / 5, (elapsed, delay)


async def test_closing_an_async_subscriber_during_its_backoff_ends_it_at_once(
    long_backoff: pytest.LogCaptureFixture,
) -> None:
    """It slept the backoff out (``asyncio.sleep``)."""
    url = f"http://127.0.0.1:{free_port()}"
    subscriber = AsyncSubscriber(_topic("abackoff"), url, from_earliest=True)

    async def iterate() -> None:
        async for _ in subscriber:
            pass

    iterating = asyncio.create_task(iterate())
    delay = await await_until(
        lambda: _backoff_under_way(long_backoff),
        timeout=10,
        what="the subscriber's backoff",
        worker=iterating,
    )
    began = time.monotonic()
    await subscriber.aclose()
    async with asyncio.timeout(2 * delay):
        await iterating
    elapsed = time.monotonic() - began
    assert delay == LONG_BACKOFF_S and elapsed < delay / 5, (elapsed, delay)


HEARTBEAT_S = 3.0
SHORT_READ_TIMEOUT_S = 1.2
"""Under the heartbeat: each stream timed out, for ever; and over ``WORKING_AFTER_S``, as
a stream timed out after 45 s is: each reconnect came at once (its backoff not grown)."""


@pytest.fixture(scope="module")
def slow_heartbeat_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """A broker whose heartbeat is longer than the read timeout of the subscribers here
    (and whose ``retry:`` is short, so that a reconnect follows a timeout at once)."""
    env = {"BROKER_HEARTBEAT_SECONDS": str(HEARTBEAT_S), "BROKER_RETRY_MS": "100"}
    process = BrokerProcess(redis_url=redis_server.url, env=env)
    process.start()
    yield process
    process.close()


@pytest.fixture
def one_second_heartbeat_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    process = BrokerProcess(redis_url=redis_server.url, env={"BROKER_HEARTBEAT_SECONDS": "1"})
    process.start()
    yield process
    process.close()


@pytest.fixture
def older_slow_heartbeat_broker(slow_heartbeat_broker: BrokerProcess) -> Iterator[OlderBrokerProxy]:
    """``slow_heartbeat_broker`` as a subscriber sees an older broker: its heartbeat unsaid."""
    with OlderBrokerProxy(slow_heartbeat_broker.port) as proxy:
        yield proxy


@pytest.fixture
def older_one_second_heartbeat_broker(
    one_second_heartbeat_broker: BrokerProcess,
) -> Iterator[OlderBrokerProxy]:
    """``one_second_heartbeat_broker`` as a subscriber sees an older broker."""
    with OlderBrokerProxy(one_second_heartbeat_broker.port) as proxy:
        yield proxy


def _read_timeouts(caplog: pytest.LogCaptureFixture) -> list[float]:
    """When each stream that timed out reading was given up on (monotonic)."""
    return [
        record.created
        for record in caplog.records
        if "reconnecting in" in record.msg and "ReadTimeout" in str(record.args)
    ]


def _quiet_for(caplog: pytest.LogCaptureFixture, seconds: float) -> bool:
    """No stream has timed out for ``seconds``, after one did: the stream opened after
    it stays open through heartbeats."""
    timeouts = _read_timeouts(caplog)
    return bool(timeouts) and time.time() - timeouts[-1] >= seconds


def test_a_subscriber_reads_longer_once_the_brokers_heartbeat_proves_longer(
    older_slow_heartbeat_broker: OlderBrokerProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """An older broker (its heartbeat unsaid): every stream timed out after the read
    timeout and was reconnected, for as long as the subscriber ran (no event lost, but a
    reconnect each time, for ever)."""
    caplog.set_level(logging.INFO, logger=subscriber_module.__name__)
    topic, url = _topic("heartbeat"), older_slow_heartbeat_broker.url
    subscriber = Subscriber(topic, url, from_earliest=True, read_timeout=SHORT_READ_TIMEOUT_S)
    got: list[Event] = []
    iterating = threading.Thread(target=lambda: got.extend(subscriber))
    iterating.start()
    try:
        wait_until(
            lambda: _quiet_for(caplog, 2 * HEARTBEAT_S),
            timeout=20,
            what="a stream that stays open through two heartbeats",
        )
        assert len(_read_timeouts(caplog)) <= 3  # 1.2 -> 2.4 -> 4.8 s (9.6 s, under load)
        # Heartbeats 2 to 3 s apart: the next streams read for three of the shortest.
        assert 1.5 * HEARTBEAT_S <= subscriber._resume.read_timeout <= 9.6
        with Publisher(url) as publisher:
            publisher.publish(topic, "after", close=True)
        iterating.join(timeout=10)
    finally:
        subscriber.close()
    assert [e.data for e in got] == ['"after"', "{}"]


def test_heartbeats_bring_a_grown_read_timeout_back_to_the_given_one(
    older_one_second_heartbeat_broker: OlderBrokerProxy,
) -> None:
    """An older broker: streams that timed out because their connections died (not for a
    long heartbeat) left the read timeout grown for good: each later dead connection
    noticed up to 8 times later. Heartbeats of a working stream, once they have come for
    as long as the grown read timeout (not a burst of them), show the given one is enough."""
    given = 4.0  # over three heartbeats: kept as it is
    url = older_one_second_heartbeat_broker.url
    subscriber = Subscriber(_topic("regrow"), url, read_timeout=given)
    subscriber._resume.read_timeout = 2 * given  # grown, as by deaths
    iterating = threading.Thread(target=lambda: list(subscriber))
    iterating.start()
    try:
        wait_until(
            lambda: subscriber._resume.read_timeout == given,
            timeout=4 * given,
            what="the read timeout back to the given one after heartbeats for 8 s",
        )
    finally:
        subscriber.close()
        iterating.join(timeout=10)
    assert not iterating.is_alive()


def test_tail_takes_a_read_timeout(
    older_slow_heartbeat_broker: OlderBrokerProxy, tmp_path: Path
) -> None:
    """``broker tail --read-timeout`` (for an older broker): it had none (45 s, whatever
    the broker's heartbeat)."""
    topic, url = _topic("cli-heartbeat"), older_slow_heartbeat_broker.url
    errors = tmp_path / "stderr"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    command = [str(BROKER_BIN), "tail", topic, "--from", "earliest", "--url", url]
    with errors.open("w") as stderr:
        tail = subprocess.Popen(
            [*command, "--read-timeout", str(SHORT_READ_TIMEOUT_S)],
            stdout=subprocess.PIPE, stderr=stderr, env=environment, text=True,
        )  # fmt: skip
        try:
            wait_until(
                lambda: "nothing read for 1.2s" in errors.read_text() or tail.poll() is not None,
                timeout=20,
                what="tail's first stream timed out after 1.2 s",
            )
            with Publisher(url) as publisher:
                publisher.publish(topic, 1, close=True)
            out, _ = tail.communicate(timeout=20)
        finally:
            tail.kill()
            tail.wait()
    assert tail.returncode == 0, errors.read_text()
    assert "reading for up to 2.4s" in errors.read_text()
    assert [json.loads(line)["data"] for line in out.splitlines()] == ["1", "{}"]


HEARTBEAT_LINE = b":\n\n"


def _iterate(subscriber: Subscriber, got: list[Event]) -> threading.Thread:
    iterating = threading.Thread(target=lambda: got.extend(subscriber), daemon=True)
    iterating.start()
    return iterating


def _hold_after_a_heartbeat(subscriber: Subscriber, proxy: HoldingProxy) -> None:
    """Hold what the broker sends from just after a heartbeat was read: the silence the
    subscriber sees is the hold's (give or take the 5 ms this polls at)."""
    read = subscriber._resume._comments_read
    wait_until(
        lambda: subscriber._resume._comments_read > read,
        timeout=5,
        interval=0.005,
        what="a heartbeat",
    )
    proxy.hold()


def test_a_read_timeout_learnt_from_heartbeats_applies_to_the_stream_being_read(
    one_second_heartbeat_broker: BrokerProcess, older_one_second_heartbeat_broker: OlderBrokerProxy
) -> None:
    """An older broker: given 1.2 s, heartbeats 0.67 to 1 s apart teach 2 s or more. The
    stream was read with the 1.2 s it began with, what it learnt applying from the next
    stream only: a silence of 1.6 s (the network held the stream) timed it out, and it
    was reconnected."""
    topic, broker = _topic("learnt-now"), one_second_heartbeat_broker
    with HoldingProxy(older_one_second_heartbeat_broker.port) as proxy:
        subscriber = Subscriber(topic, proxy.url, from_earliest=True, read_timeout=1.2)
        got: list[Event] = []
        iterating = _iterate(subscriber, got)
        try:
            wait_until(
                lambda: (subscriber._resume.read_timeout or 0) >= 2.0 - 1e-9,
                timeout=10,
                what="heartbeats to teach a longer read timeout",
            )
            _hold_after_a_heartbeat(subscriber, proxy)
            time.sleep(1.6)  # (the network's silence: the fault itself, not a wait for a race)
            proxy.release()
            with Publisher(broker.url) as publisher:
                publisher.publish(topic, "after", close=True)
            iterating.join(timeout=10)
        finally:
            subscriber.close()
    assert [e.data for e in got] == ['"after"', "{}"]
    assert proxy.connections == 1, "the stream timed out and was reconnected"


def test_bunched_heartbeats_do_not_shorten_a_read_timeout_learnt_from_steady_ones(
    older_one_second_heartbeat_broker: OlderBrokerProxy,
) -> None:
    """An older broker: heartbeats 0.67 to 1 s apart teach 2 s or more (over the given
    1.5 s); the network holds the stream, then lets the two heartbeats it held through
    20 ms apart. Taken for the broker's interval, those set the read timeout back to 1.5 s.
    The hold lasts two heartbeats (1.3 to 2 s): when only 0.67 s gaps taught 2 s, it can
    time the stream out before the bunch comes; such a try tells nothing, and is made
    again (at most three tries)."""
    for attempt in range(3):
        learnt, connections = _learnt_after_a_bunch(
            older_one_second_heartbeat_broker, _topic(f"bunched-{attempt}")
        )
        if connections == 1:
            break
    assert connections == 1, "every try's hold timed the stream out before the bunch came"
    assert learnt is not None and learnt >= 2.0 - 1e-9, learnt


def _learnt_after_a_bunch(broker: OlderBrokerProxy, topic: str) -> tuple[float | None, int]:
    """The read timeout a subscriber holds after the bunch, and how many connections
    it made to get there."""
    with HoldingProxy(broker.port) as proxy:
        subscriber = Subscriber(topic, proxy.url, from_earliest=True, read_timeout=1.5)
        iterating = _iterate(subscriber, [])
        try:
            wait_until(
                lambda: (subscriber._resume.read_timeout or 0) >= 2.0 - 1e-9,
                timeout=10,
                what="heartbeats to teach a longer read timeout",
            )
            _hold_after_a_heartbeat(subscriber, proxy)
            wait_until(
                lambda: proxy.held_count(HEARTBEAT_LINE) >= 2 or proxy.connections > 1,
                timeout=5,
                what="two heartbeats held by the proxy",
            )
            after_bunch = subscriber._resume._comments_read + proxy.held_count(HEARTBEAT_LINE) + 1
            proxy.release(spread=0.02)
            wait_until(
                lambda: subscriber._resume._comments_read >= after_bunch or proxy.connections > 1,
                timeout=5,
                what="the bunch read, and a heartbeat after it",
            )
            return subscriber._resume.read_timeout, proxy.connections
        finally:
            subscriber.close()
            iterating.join(timeout=10)


# -- a broker that says its heartbeat ---------------------------------------------------

SAID_HEARTBEAT_S = 1.0
DEAD_AFTER_HEARTBEATS = 3
"""A silent stream is taken for dead after about this many of the heartbeats its broker
says (two, and a margin of a second: ``resume.SILENT_HEARTBEATS``)."""


@pytest.fixture(scope="module")
def said_heartbeat_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """A broker that beats every second (and says so), its ``retry:`` short: a stream
    taken for dead is reconnected at once."""
    env = {"BROKER_HEARTBEAT_SECONDS": str(SAID_HEARTBEAT_S), "BROKER_RETRY_MS": "100"}
    process = BrokerProcess(redis_url=redis_server.url, env=env)
    process.start()
    yield process
    process.close()


def test_a_dead_connection_is_seen_within_the_heartbeats_the_broker_says(
    said_heartbeat_broker: BrokerProcess,
) -> None:
    """The network goes silent under a stream (the proxy holds all it is sent): with
    the default read timeout the subscriber waited 45 s, whatever the broker's heartbeat.
    Told 1 s, it reconnects after two of them and a margin, and resumes exactly: the
    event published into the silence comes once, in order."""
    topic, broker = _topic("said-dead"), said_heartbeat_broker
    with Publisher(broker.url) as publisher, HoldingProxy(broker.port) as proxy:
        publisher.publish(topic, "before")
        subscriber = Subscriber(topic, proxy.url, from_earliest=True)  # (read_timeout: 45)
        got: list[Event] = []
        iterating = _iterate(subscriber, got)
        try:
            wait_until(lambda: got, timeout=10, what="the first event")
            _hold_after_a_heartbeat(subscriber, proxy)
            silent_since = time.monotonic()
            publisher.publish(topic, "during")
            wait_until(
                lambda: proxy.connections >= 2,
                # (and 2 s more: the client's backoff, a loaded machine)
                timeout=DEAD_AFTER_HEARTBEATS * SAID_HEARTBEAT_S + 2.0,
                what="a reconnect after the silence the broker's heartbeat allows",
            )
            seen_after = time.monotonic() - silent_since
            proxy.release()  # (the new stream's head, held with the rest)
            publisher.publish(topic, "after", close=True)
            iterating.join(timeout=10)
        finally:
            subscriber.close()
    assert not iterating.is_alive()
    assert seen_after >= 2 * SAID_HEARTBEAT_S, f"taken for dead after {seen_after:.2f}s only"
    assert [e.data for e in got] == ['"before"', '"during"', '"after"', "{}"]
    assert proxy.connections == 2


async def _read_timeouts_within(caplog: pytest.LogCaptureFixture, seconds: float) -> list[float]:
    """The streams timed out within ``seconds`` from now (it returns at the first)."""
    since, deadline = time.time(), time.monotonic() + seconds

    def timed_out() -> list[float]:
        return [at for at in _read_timeouts(caplog) if at >= since]

    while not timed_out() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return timed_out()


async def test_a_read_timeout_under_the_heartbeat_the_broker_says_reconnects_nothing(
    said_heartbeat_broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """A read timeout shorter than the broker's heartbeat (as 45 s is against a broker
    at 60 s): each stream timed out and was reconnected, until timeouts had grown past
    the heartbeat. Told the heartbeat, the subscriber reads one live stream for two of
    them (and would for ever)."""
    caplog.set_level(logging.INFO, logger=subscriber_module.__name__)
    topic, broker = _topic("said-long"), said_heartbeat_broker
    quiet_s = 2 * SAID_HEARTBEAT_S
    with HoldingProxy(broker.port) as proxy:  # (never holding: it counts connections)
        subscriber = AsyncSubscriber(topic, proxy.url, from_earliest=True, read_timeout=0.5)
        got: list[Event] = []

        async def iterate() -> None:
            async for event in subscriber:
                got.append(event)

        iterating = asyncio.create_task(iterate())
        try:
            async with AsyncPublisher(broker.url) as publisher:
                await publisher.publish(topic, "first")
            await await_until(lambda: got, timeout=10, what="the first event", worker=iterating)
            beats_before = subscriber._resume._comments_read
            timed_out = await _read_timeouts_within(caplog, quiet_s)
            beats_read = subscriber._resume._comments_read - beats_before
            async with AsyncPublisher(broker.url) as publisher:
                await publisher.publish(topic, "last", close=True)
            async with asyncio.timeout(10):
                await iterating
        finally:
            await subscriber.aclose()
    assert timed_out == [], "a live stream was taken for dead"
    assert beats_read >= 1, "the stream was not heard from: it proves nothing"
    assert proxy.connections == 1
    assert [e.data for e in got] == ['"first"', '"last"', "{}"]


GIVEN_READ_TIMEOUT_S = 6.0
HELD_SILENCE_S = 4.5
"""Over the 3 s a 1 s heartbeat allows (``DEAD_AFTER_HEARTBEATS``), under the read timeout
given: by the heartbeat, the stream is dead; by the caller, who knows its network, not."""


def test_a_read_timeout_given_longer_than_the_heartbeat_said_outlasts_a_held_silence(
    said_heartbeat_broker: BrokerProcess,
) -> None:
    """A proxy that holds heartbeats back (a buffering one, a slow link) and a caller who
    gave a read timeout over its holds on purpose: a broker saying 1 s cut the stream
    after 3 s of silence, and every hold longer than that reconnected it (for good,
    behind such a proxy). The given read timeout is the least a stream is read for: the
    one stream goes on after the hold, nothing lost or repeated."""
    topic, broker = _topic("said-given"), said_heartbeat_broker
    with Publisher(broker.url) as publisher, HoldingProxy(broker.port) as proxy:
        publisher.publish(topic, "before")
        subscriber = Subscriber(
            topic, proxy.url, from_earliest=True, read_timeout=GIVEN_READ_TIMEOUT_S
        )
        got: list[Event] = []
        iterating = _iterate(subscriber, got)
        try:
            wait_until(lambda: got, timeout=10, what="the first event")
            _hold_after_a_heartbeat(subscriber, proxy)
            publisher.publish(topic, "during")
            time.sleep(HELD_SILENCE_S)  # (the proxy's hold: the fault itself, not a wait)
            proxy.release()
            publisher.publish(topic, "after", close=True)
            iterating.join(timeout=10)
        finally:
            subscriber.close()
    assert not iterating.is_alive()
    assert proxy.connections == 1, "the stream was taken for dead inside the given timeout"
    assert [e.data for e in got] == ['"before"', '"during"', '"after"', "{}"]
