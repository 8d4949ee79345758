"""What a streaming ingest without an Idempotency-Key is told when a failover lost its
newest lines (``api.ingest_lost``, on each store): the last line the log kept, found by
bisecting where its remembered appends ended, or as much as it can tell when it cannot.

Each line comes in a read of its own, so each is an append of its own; the failover
is done by hand (``tests/support/failover.py``) before the body brings the next line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from api.ingest import Ingest
from api.ingest_lost import REMEMBERED_APPENDS
from broker import Broker, StoreUnavailable
from broker.errors import LinesLost
from tests.support.failover import IngestAppends


class LineByLine:
    """An ``IngestBody`` bringing one line a read (``count`` in all); before line n it
    runs ``hooks[n]``, if any (the lines before it are stored by then: an append a read)."""

    def __init__(self, count: int, hooks: dict[int, Callable[[], Awaitable[None]]]) -> None:
        self._count, self._hooks = count, hooks
        self._sent = 0

    async def read(self) -> tuple[bytes, bool]:
        self._sent += 1
        hook = self._hooks.get(self._sent)
        if hook is not None:
            await hook()
        line = orjson.dumps({"data": f"l{self._sent}"}) + b"\n"
        return line, self._sent < self._count


def keyless_ingest(broker: Broker, topic: str) -> Ingest:
    return Ingest(
        broker, topic, key=None, max_event_bytes=1000, max_batch=100,
        idle_timeout=30, append_timeout=5,
    )  # fmt: skip


class Failover:
    """What the ingest's appends wrote from line ``first_lost`` on, read before it is
    stored, then lost (``lose``) before line ``last + 1``: one append a line."""

    def __init__(self, broker: Broker, topic: str, first_lost: int, last: int) -> None:
        self._client: Any = broker.store._client  # type: ignore[attr-defined]
        self._topic, self._count = topic, last - first_lost + 1
        self._before: IngestAppends | None = None
        self.hooks = {first_lost: self._read, last + 1: self._lose}

    async def _read(self) -> None:
        self._before = await IngestAppends.read(self._client, self._topic, None)

    async def _lose(self) -> None:
        assert self._before is not None
        await self._before.lose_since(self._client, self._count)


async def told_lost(ingest: Ingest, body: LineByLine) -> str:
    """The detail the ingest ends with (it must end on its lines lost)."""
    with pytest.raises(LinesLost) as raised:
        await ingest.run(body)
    return raised.value.detail


async def stored(broker: Broker, topic: str) -> list[object]:
    page = await broker.history(topic, None, 100)
    return [orjson.loads(entry.data) for entry in page.events]


async def test_more_lost_appends_than_it_remembers_are_told_as_perhaps_more(
    broker: Broker, topic: str
) -> None:
    """Lines 2 to 66 lost, each its own append: the ingest remembers where its last 64
    appends ended (lines 3-66), all lost, and what it forgot ends at line 2. So the lines
    after line 2 are lost, "and perhaps lines before it" (line 2 was too)."""
    last = REMEMBERED_APPENDS + 2
    failover = Failover(broker, topic, first_lost=2, last=last)
    detail = await told_lost(keyless_ingest(broker, topic), LineByLine(last + 1, failover.hooks))
    assert "the lines after line 2 are lost (and perhaps lines before it: " in detail, detail
    assert f"where only its last {REMEMBERED_APPENDS} appends ended)" in detail, detail
    assert f"{last} line(s) were stored before" in detail, detail
    assert await stored(broker, topic) == ["l1"]


async def test_lost_lines_are_told_as_well_as_it_can_when_the_log_cannot_be_read(
    broker: Broker, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines 2-3 lost, and the reads that would find the last line kept fail (the store
    failing again): the ingest tells what it knows, that its last line (3) is lost, "and
    perhaps lines before it", saying why it cannot tell more."""
    failover = Failover(broker, topic, first_lost=2, last=3)

    async def unreadable(*_: object, **__: object) -> object:
        raise StoreUnavailable("the store is unreachable")

    async def then_unreadable() -> None:
        await failover.hooks[4]()
        monkeypatch.setattr(broker.store, "read_range", unreadable)

    hooks = {**failover.hooks, 4: then_unreadable}
    detail = await told_lost(keyless_ingest(broker, topic), LineByLine(4, hooks))
    assert (
        "line 3, the last of them, is lost, and perhaps lines before it (the log could not "
        "be read to tell)"
    ) in detail, detail
    assert "3 line(s) were stored before" in detail, detail
    monkeypatch.undo()  # (the store answers again)
    assert await stored(broker, topic) == ["l1"]
