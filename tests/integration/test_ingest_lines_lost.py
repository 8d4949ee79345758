"""What a streaming ingest without an Idempotency-Key is told when a failover lost its
newest lines (``api.ingest_lost``, on each store): the last line the log kept, found by
bisecting where its remembered appends ended, or as much as it can tell when it cannot.

Each line comes in a read of its own, so each is an append of its own; the failover
is done by hand (``tests/support/failover.py``) before the body brings the next line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from api.ingest import Ingest
from api.ingest_lost import REMEMBERED_APPENDS
from broker import Broker, StoreUnavailable
from broker.errors import LinesLost
from broker.model import NewEvent
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
    perhaps lines before it", saying why it cannot tell more. (Another keyless ingest's
    line stored after the failover: else the meta's newest keyless entry, line 1's,
    tells which were kept, and nothing is read: append.lua.)"""
    failover = Failover(broker, topic, first_lost=2, last=3)

    async def unreadable(*_: object, **__: object) -> object:
        raise StoreUnavailable("the store is unreachable")

    async def then_unreadable() -> None:
        await failover.hooks[4]()
        await broker.store.append(topic, [NewEvent('"other"')], after_entry=(0, 0))
        monkeypatch.setattr(broker.store, "read_range", unreadable)

    hooks = {**failover.hooks, 4: then_unreadable}
    detail = await told_lost(keyless_ingest(broker, topic), LineByLine(4, hooks))
    assert (
        "line 3, the last of them, is lost, and perhaps lines before it (the log could not "
        "be read to tell)"
    ) in detail, detail
    assert "3 line(s) were stored before" in detail, detail
    monkeypatch.undo()  # (the store answers again)
    assert await stored(broker, topic) == ["l1", "other"]


async def test_lost_lines_are_told_exactly_though_retention_trimmed_past_them(
    broker: Broker, topic: str
) -> None:
    """Lines 2-3 lost, then other writers' events, retention (MAXLEN 1) trimming past
    where lines 1-3 were: the log no longer tells a lost entry from one trimmed (each is
    at or before the newest id trimmed), and the ingest told the lines after line 3
    lost, lines 2-3 in silence (or, before the store told the loss at all, stored line
    4 after line 1). The meta's newest keyless entry, line 1's, tells (append.lua):
    the lines after line 1 are lost, exactly."""
    failover = Failover(broker, topic, first_lost=2, last=3)

    async def then_trimmed() -> None:
        await failover.hooks[4]()
        await trimmed_past(broker, topic)

    hooks = {**failover.hooks, 4: then_trimmed}
    detail = await told_lost(keyless_ingest(broker, topic), LineByLine(4, hooks))
    assert "the lines after line 1 are lost; " in detail, detail
    assert "3 line(s) were stored before" in detail, detail


async def trimmed_past(broker: Broker, topic: str) -> None:
    """Other writers' events, retention (MAXLEN 1, for them) trimming past the ingest's."""
    policies = broker.store.policies  # type: ignore[attr-defined]
    default = policies.for_topic
    policies.for_topic = lambda name: dataclasses.replace(default(name), maxlen=1)
    try:
        for n in range(10):  # (past the trim's slack)
            await broker.store.append(topic, [NewEvent(f'"other{n}"')])
            if len(await stored(broker, topic)) == 1:
                break
    finally:
        policies.for_topic = default
    assert [str(data).startswith("other") for data in await stored(broker, topic)] == [True]


async def lost_then_trimmed_past(
    broker: Broker, topic: str, *, read_before_line: int, lost: int
) -> LinesLost:
    """A keyed ingest of 3 lines, its records read before line ``read_before_line``, and
    before line 3 a failover losing its ``lost`` lines sent since, then retention trimming
    past them: what the ingest is told (``LinesLost``)."""
    client: Any = broker.store._client  # type: ignore[attr-defined]
    before: list[IngestAppends] = []

    async def read() -> None:
        before.append(await IngestAppends.read(client, topic, "K"))

    async def lose_then_trim() -> None:
        await before[0].lose_since(client, lost)  # the failover
        await trimmed_past(broker, topic)

    ingest = Ingest(
        broker, topic, key="K", max_event_bytes=1000, max_batch=100,
        idle_timeout=30, append_timeout=5,
    )  # fmt: skip
    with pytest.raises(LinesLost) as raised:
        await ingest.run(LineByLine(3, {read_before_line: read, 3: lose_then_trim}))
    return raised.value


async def test_a_keyed_ingest_is_told_its_line_lost_though_retention_trimmed_past_it(
    broker: Broker, topic: str
) -> None:
    """With an Idempotency-Key: line 2 lost (its entry and its record), then retention
    trimming past where it was. Its records answer all along (line 1's), but line 2's
    entry, at or before the newest id trimmed, was taken for one trimmed, and line 3 was
    refused 409 ingest-records-lapsed: its producer sent the lines after line 2 as a
    stream of their own, line 2 lost in silence. The ingest names the ingest its lines
    went to (``IngestLines.since``): line 2 not recorded in it is lost, told as a loss
    the whole stream resent replays (line 1 replayed, line 2 stored again)."""
    lost = await lost_then_trimmed_past(broker, topic, read_before_line=2, lost=1)
    detail = lost.detail
    assert lost.kept is None, detail  # (a 503: the whole stream resent replays)
    assert "the last of them, line 2, is no longer there" in detail, detail


async def test_a_keyed_ingest_is_told_every_line_lost_though_retention_trimmed_past_them(
    broker: Broker, topic: str
) -> None:
    """With an Idempotency-Key: lines 1-2 lost, every line of the ingest (their records,
    and when it last wrote, with them), then retention trimming past where they were.
    Line 2's entry, at or before the newest id trimmed, was taken for one trimmed and its
    records for records lapsed: line 3 was refused 409 ingest-records-lapsed, its producer
    sent the lines after line 2 as a stream of their own, lines 1-2 lost in silence. Its
    ingest began within the window (``IngestLines.since``: a lapse needs the window past
    its last write), so its records are gone with its lines: told every line lost, the
    whole stream to be resent (a new ingest under its key)."""
    await broker.store.append(topic, [NewEvent('"before"')])  # (the log, kept)
    lost = await lost_then_trimmed_past(broker, topic, read_before_line=1, lost=2)
    detail = lost.detail
    assert lost.kept is None, detail  # (a 503: the whole stream resent)
    assert "the lines after line 0 are lost, every line of it" in detail, detail
    assert "2 line(s) were stored before" in detail, detail
