"""An open keyed ingest's line records kept answering however long it stays open
(``api.ingest_records``), on each store (embedded and a real redis-server): its body
paused past the window by blank lines, then broken, the whole stream resent with its
key stores each line once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from api.ingest import CLIENT_GONE, Ingest
from broker import Broker, InvalidInput
from broker.redis_open import open_store

WINDOW_S = 1  # (the shortest window)
IDLE_S = WINDOW_S / 2  # (the longest body timeout it allows: api.settings)
PACE_S = IDLE_S / 4


def line(n: int) -> bytes:
    return orjson.dumps({"data": f"l{n}"}) + b"\n"


class PausedThenBroken:
    """An ``IngestBody``: lines 1-2, then blank lines (a read each, paced) until the store's
    clock is 1.5 windows past line 2, then line 3, then the connection breaks. ``sent``:
    the stream as it went (its blank lines are numbered lines too)."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._pause_until_ms = 0
        self.sent = b""

    async def read(self) -> tuple[bytes, bool]:
        if not self.sent:
            return self._send(line(1) + line(2))
        if not self._pause_until_ms:  # (line 2 stored: the body's reads wait for its append)
            now_ms = await self._broker.store.clock_ms()
            self._pause_until_ms = now_ms + int(1.5 * WINDOW_S * 1000)
        if self.sent.endswith(line(3)):
            raise InvalidInput(CLIENT_GONE)
        if await self._broker.store.clock_ms() > self._pause_until_ms:
            return self._send(line(3))
        if self.sent.count(b"\n") > 4 * WINDOW_S / PACE_S:
            raise AssertionError("the store's clock did not pass the window")
        await asyncio.sleep(PACE_S)  # (a producer's pause, paced: no race behind it)
        return self._send(b"\n")

    def _send(self, data: bytes) -> tuple[bytes, bool]:
        self.sent += data
        return data, True


class Whole:
    """An ``IngestBody``: the whole stream, in one read."""

    def __init__(self, stream: bytes) -> None:
        self._stream = stream

    async def read(self) -> tuple[bytes, bool]:
        return self._stream, False


@pytest.fixture
async def short_window_broker(store_url: str | None) -> AsyncIterator[Broker]:
    store = open_store(store_url, idempotency_seconds=WINDOW_S)
    broker = Broker(store)
    await broker.start()
    yield broker
    await broker.close()


def keyed_ingest(broker: Broker, topic: str) -> Ingest:
    return Ingest(
        broker, topic, key="K", max_event_bytes=1000, max_batch=100,
        idle_timeout=IDLE_S, append_timeout=5,
    )  # fmt: skip


async def test_a_keyed_ingest_paused_past_the_window_then_broken_is_resent_whole_once(
    short_window_broker: Broker, topic: str
) -> None:
    """Its records lapsed in the pause, line 3 began anew under its key, and the resend
    stored lines 1-2 twice. Now its watch keeps them answering while it is open."""
    broker = short_window_broker
    body = PausedThenBroken(broker)
    with pytest.raises(InvalidInput):
        await keyed_ingest(broker, topic).run(body)
    again = await keyed_ingest(broker, topic).run(Whole(body.sent + line(4)))
    assert again.count == 4
    page = await broker.history(topic, None, 10)
    assert [orjson.loads(entry.data) for entry in page.events] == ["l1", "l2", "l3", "l4"]
