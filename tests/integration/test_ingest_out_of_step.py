"""Two streaming ingests under one Idempotency-Key, their appends interleaved, at the store:
the append script's ``out_of_step`` (lua/ingest_lines.lua) case by case, on every store
(embedded and a real Redis).

Each case is two streams as sent (``_`` a blank line: numbered, never sent; ``_*N`` N of
them), and the order of their reads: ``A2`` is stream A's next two lines read at once (one
append of those that are not blank, naming the line it stored last, as ``api.ingest`` appends),
``A.`` its body's end (where it ended with blank lines after the last it stored, the
append that only checks them), ``C`` the topic closed (``END`` in the log). The oracle:
the log is one stream's lines, in order; the stream out of step is refused (400) at its
first line that differs, and stops there (``Bclosed``: refused as the topic is closed,
409, where it would be out of step on an open topic); every other is answered with the
log's first ids. The six rows before the long ones are blank lines before a request's
first line, or after its last: refused since the store is told that a request's lines
before the first it sends are blank (``after`` 0), and where its body ended
(``IngestLines.blank_through``). The long ones are cases above with 100,000 blank
lines where they had one or two: the refusal names the same line (the first of the
other's that the stream skipped), found without a look at each number. The last nine
(``C``) are the order of the refusals on a closed topic: a stream out of step there is
refused as the topic is closed (it was 400: every other publish to a closed topic is
409), its lines that would be new, and its blank end where a line is stored, alike; a
resend of the lines stored before the close is still answered their ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import redis.asyncio as redis

from broker.errors import InvalidInput, TopicClosed
from broker.ids import EventId
from broker.model import IngestLines, NewEvent
from broker.redis_open import open_store
from broker.redis_store import RedisStreamStore
from tests.support.redis_server import RedisServer

KEY = "K"


@dataclass
class Stream:
    """One request's lines (None: blank) and where it is, as ``api.ingest.Ingest`` keeps it."""

    lines: list[str | None]
    read: int = 0
    last_line: int = 0
    epoch: str | None = None
    ids: list[EventId] = field(default_factory=list)
    refused_at: int | str | None = None
    """The line it was refused at (400), or "closed" (409)."""

    @classmethod
    def sent(cls, text: str) -> Stream:
        lines: list[str | None] = []
        for word in text.split():
            if word == "_":
                lines.append(None)
            elif word.startswith("_*"):
                lines += [None] * int(word.removeprefix("_*"))
            else:
                lines.append(word)
        return cls(lines)

    async def read_lines(self, store: RedisStreamStore, topic: str, count: int) -> None:
        numbers = range(self.read + 1, self.read + count + 1)
        self.read += count
        sent = [n for n in numbers if self.lines[n - 1] is not None]
        if sent:
            events = [NewEvent(str(self.lines[n - 1])) for n in sent]
            await self._append(store, topic, events, IngestLines(KEY, sent, self.last_line))
            self.last_line = sent[-1]

    async def end(self, store: RedisStreamStore, topic: str) -> None:
        assert self.read == len(self.lines), "a body ends once all of it was read"
        if self.read > self.last_line:  # (its last lines blank)
            lines = IngestLines(KEY, [], self.last_line, blank_through=self.read)
            await self._append(store, topic, [], lines)

    async def _append(
        self, store: RedisStreamStore, topic: str, events: list[NewEvent], lines: IngestLines
    ) -> None:
        after = self.ids[-1].position if self.ids else None
        try:
            result = await store.append(
                topic, events, lines=lines, log_epoch=self.epoch, after_entry=after
            )
        except InvalidInput as refusal:
            self.refused_at = int(refusal.detail.split(":")[0].removeprefix("line "))
            return
        except TopicClosed:
            self.refused_at = "closed"
            return
        self.ids += result.ids
        self.epoch = self.epoch or (result.ids[0].epoch if result.ids else None)


# Each row: stream A as sent | stream B as sent | the order of their reads | the log |
# the stream refused and at which line (- none) | what the case is.
TABLE = """
a b c d   | a b c d | A2 B3 A2 B1 A. B. | a b c d   | -  | the same stream, interleaved
a b _     | a b _   | A3 B3 A. B.       | a b       | -  | the same, its last line blank in both
a b c d   | a b     | B2 B. A4 A.       | a b c d   | -  | a shorter stream, ended
a _       | a _ c   | A2 A. B3 B.       | a c       | -  | a longer one, past the other's blank end
a b c     | a x c   | A3 B3             | a b c     | B2 | another line
a b c d   | a _ c d | A2 B4 A2 A.       | a b c d   | B2 | a blank line where the other stored one
a _ c d   | a b c d | A3 B4 A1 A.       | a c d     | B2 | a line where the other had a blank one
a _ c     | a b c   | A1 B2 A2 B1 B.    | a b c     | A2 | the one behind had the blank line
_ b c     | a b c   | A3 B3             | b c       | B1 | a line where the other's first is blank
a b c     | _ b c   | A3 B3 A.          | a b c     | B1 | a blank first line where one is stored
a b c d   | _ _ c d | A4 B4             | a b c d   | B1 | blank first lines, an append after all
a b c     | a b _   | A3 B3 B. A.       | a b c     | B3 | a blank last line where one is stored
a b c d e | a b _ _ | A2 B4 A3 B. A.    | a b c d e | B3 | blank last lines, the other going on
a b _     | a b c   | A3 A. B3 B.       | a b       | B3 | a line where the other ended blank
a b       | _ _     | A2 B2 B.          | a b       | B1 | only blank lines, where lines are stored
a _*100000 c d | a _*100000 c d | A50000 B100003 A50003 A. B. | a c d | - | long: the same stream
a _*100000 c d | a _*100001 d   | A100003 B100003    | a c d | B100002 | long: a stored line skipped
a _*100001 d   | a _*100000 c   | A1 B100002 A100002 | a c   | A100002 | long: one a resend stored
a b _*100000 d | a _*100001 d   | A100003 B100003    | a b d | B2      | long: the next line skipped
a _*100000 d   | a _*99999 c d  | A100002 B100002    | a d   | B100001 | long: a line in a blank run
_*100000 b c   | _*100001 c     | A100002 B100002    | b c   | B100001 | long: blank first lines
a _*100000 c   | a _*100001     | A100002 B100002 B. | a c   | B100002 | long: blank last lines
a _*100000     | a _*99999 c    | A100001 A. B100001 | a     | B100001 | long: a line where it ended
a _*100000     | a _*100000 c   | A100001 A. B100002 B. | a c | -     | long: a line past its end
a b c | a b c | A3 A. C B3 B. | a b c END | -       | closed: the same stream resent
a b c | a b   | A3 C B2 B.    | a b c END | -       | closed: a shorter stream resent
a b _ | a b _ | A3 A. C B3 B. | a b END   | -       | closed: the same, its last line blank
a b c | a x c | A3 C B3       | a b c END | Bclosed | closed: another line
a b c | a b x | A3 C B2 B1    | a b c END | Bclosed | closed: another line after a replay
a _ c | a b c | A3 A. C B3    | a c END   | Bclosed | closed: a line where the other's is blank
a b c | a _ c | A3 C B3       | a b c END | Bclosed | closed: a blank line where one's stored
a b c | a b _ | A3 C B3 B.    | a b c END | Bclosed | closed: a blank last line, one stored
a b   | a b c | A2 C B3       | a b END   | Bclosed | closed: a line past the other's end
"""
CASES = {row[-1]: row[:-1] for row in (line.split(" | ") for line in TABLE.strip().splitlines())}


@pytest.mark.parametrize(("a", "b", "reads", "log", "refused"), CASES.values(), ids=CASES.keys())
async def test_two_streams_under_one_key_leave_one_of_them_in_order(
    store: RedisStreamStore,
    topic: str,
    a: str,
    b: str,
    reads: str,
    log: str,
    refused: str,
) -> None:
    """The reads in the row's order, each stream stopping once refused."""
    streams = {"A": Stream.sent(a), "B": Stream.sent(b)}
    for read in reads.split():
        if read == "C":
            await store.append(topic, [], close=True)
            continue
        stream = streams[read[0]]
        if stream.refused_at is not None:  # (an ingest refused stops)
            continue
        if read[1:] == ".":
            await stream.end(store, topic)
        else:
            await stream.read_lines(store, topic, int(read[1:]))
    entries = (await store.read_range(topic, (0, 0), 100)).entries
    assert ["END" if e.event_type == "broker.end" else e.data_text for e in entries] == log.split()
    told = [f"{name}{s.refused_at}" for name, s in streams.items() if s.refused_at is not None]
    assert told == ([] if refused.strip() == "-" else [refused.strip()])
    for name, stream in streams.items():
        if stream.refused_at is None:  # (answered: the log's first ids)
            assert stream.ids == [e.id for e in entries][: len(stream.ids)], name


RUN = 1_000_000  # blank lines: one Redis call a number held Redis (every topic on it) 2.5 s


async def commands_run(admin: redis.Redis) -> int:
    """The commands Redis ran so far, those that scripts called included (but INFO's)."""
    stats = await admin.info("commandstats")
    return sum(int(s["calls"]) for name, s in stats.items() if name != "cmdstat_info")


@pytest.mark.parametrize(
    "behind", [f"a _*{RUN + 1} d", f"a _*{RUN + 1}"], ids=["its line past them", "its end there"]
)
async def test_a_stream_behind_a_long_blank_run_is_checked_in_a_few_redis_calls(
    private_redis: RedisServer, topic: str, behind: str
) -> None:
    """A million blank lines under a key, then a line, and another stream behind them
    without that line: it is refused there, in as many Redis calls as any append, not
    one for each number it passed over."""
    store, admin = open_store(private_redis.url), redis.Redis.from_url(private_redis.url)
    ahead, late = Stream.sent(f"a _*{RUN} c"), Stream.sent(behind)
    try:
        await ahead.read_lines(store, topic, RUN + 2)
        await late.read_lines(store, topic, 1)
        before = await commands_run(admin)
        await late.read_lines(store, topic, len(late.lines) - 1)
        if late.refused_at is None:
            await late.end(store, topic)
        assert await commands_run(admin) - before <= 20  # (an append alone: some 10)
        assert late.refused_at == RUN + 2
    finally:
        await store.close()
        await admin.aclose()
