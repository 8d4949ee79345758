"""A subscriber's waits: its backoff ended by a close, its read timeout against a
broker whose heartbeat is longer than it."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid

import pytest

from brokerclient import AsyncSubscriber, Subscriber
from brokerclient import subscriber as subscriber_module
from tests.support.polling import wait_until
from tests.support.redis_server import free_port

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
    monkeypatch.setattr(subscriber_module, "FIRST_DELAY", LONG_BACKOFF_S)
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
    async with asyncio.timeout(10):
        while not (delay := _backoff_under_way(long_backoff)):
            await asyncio.sleep(0.02)
    began = time.monotonic()
    await subscriber.aclose()
    async with asyncio.timeout(2 * delay):
        await iterating
    elapsed = time.monotonic() - began
    assert delay == LONG_BACKOFF_S and elapsed < delay / 5, (elapsed, delay)
