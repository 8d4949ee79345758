"""Property tests of a streaming ingest's NDJSON lines (``Ingest._reads`` in
``api.ingest``, which both routes read their lines through): however the body is cut
into reads (a line in pieces, a CRLF or a multi-byte UTF-8 character split between two
reads), its lines are those of the body read at once: the same lines, in the same
order and numbering (blank lines counted), each the same JSON, and a line too long
refused at the same line, the lines before it given."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import orjson
from hypothesis import given
from hypothesis import strategies as st

from api.ingest import LINE_ENVELOPE_BYTES, Ingest
from broker import Broker, TooLarge
from broker.validation import loads_exactly
from tests.support.properties import bounded, pieces

MAX_EVENT_BYTES = 64
LIMIT = MAX_EVENT_BYTES + LINE_ENVELOPE_BYTES


class Reads:
    """An ``IngestBody`` giving ``reads``, the last one ending the body."""

    def __init__(self, reads: list[bytes]) -> None:
        self._reads = reads or [b""]
        self._next = 0

    async def read(self) -> tuple[bytes, bool]:
        data = self._reads[self._next]
        self._next += 1
        return data, self._next < len(self._reads)


def lines_read(body: bytes, cuts: list[int]) -> tuple[list[bytes], int | None]:
    """The lines the ingest takes from ``body`` in these reads, and the number of the
    line it refused as too long (None if none)."""
    ingest = Ingest(
        cast(Broker, None),  # (no store: only the lines are read)
        "t",
        key=None,
        max_event_bytes=MAX_EVENT_BYTES,
        max_batch=100,
        idle_timeout=60,
        append_timeout=60,
    )
    lines: list[bytes] = []

    async def read_all() -> int | None:
        try:
            async for read in ingest._reads(Reads(pieces(body, cuts))):
                lines.extend(read)
        except TooLarge as error:
            return int(str(error).split(":")[0].removeprefix("line "))
        return None

    refused = asyncio.run(read_all())
    return lines, refused


def lines_of(body: bytes) -> tuple[list[bytes], int | None]:
    """The body's lines, by the rule (the oracle): split at each LF, a last line without one
    kept unless empty (a blank one too: spaces, tabs, CRs, JSON's whitespace, a line the
    ingest counts and skips); the first line over the limit refused, those before it kept."""
    lines = body.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for index, line in enumerate(lines):
        if len(line) > LIMIT:
            return lines[:index], index + 1
    return lines, None


DOCUMENTS = st.fixed_dictionaries(
    {"data": st.text(max_size=12) | st.integers() | st.lists(st.text(max_size=3), max_size=3)}
)
BLANK = st.sampled_from([b"", b" ", b"\r", b" \t\r"])
NOT_JSON = st.sampled_from([b"\x0c", b" \x0b", b"x"])
"""Lines that are not JSON, to be given (and refused); the first two blank to
``bytes.strip()``, not to JSON."""
LONG = st.integers(LIMIT - 2, LIMIT + 2).map(
    lambda size: b'{"data": "' + b"x" * (size - 12) + b'"}'
)


def encoded(document: object) -> bytes:
    """As a producer writes it: UTF-8, not escaped (integers of any length)."""
    return json.dumps(document, ensure_ascii=False).encode()


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.one_of(DOCUMENTS.map(encoded), BLANK, NOT_JSON), max_size=12))
    if draw(st.integers(0, 5)) == 0:  # now and then a line at the limit, or past it
        lines.insert(draw(st.integers(0, len(lines))), draw(LONG))
    endings = [draw(st.sampled_from([b"\n", b"\r\n"])) for _ in lines]
    if lines and draw(st.booleans()):
        endings[-1] = b""  # the last line without its line feed
    return b"".join(line + ending for line, ending in zip(lines, endings, strict=True))


@bounded(examples=400)
@given(bodies(), st.lists(st.integers(0, LIMIT + 400), max_size=10))
def test_lines_are_the_same_in_any_split(body: bytes, cuts: list[int]) -> None:
    read = lines_read(body, cuts)
    assert read == lines_read(body, [])
    assert read == lines_of(body)
    for line in read[0]:
        if line.startswith(b"{") and len(line) <= LIMIT:  # (a document, whole)
            assert loads_exactly(line) == json.loads(line)  # (whole UTF-8: it decodes)


@bounded(examples=200)
@given(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=6), st.data())
def test_multibyte_characters_cut_between_reads_come_whole(texts: list[str], data: Any) -> None:
    body = b"".join(encoded({"data": text}) + b"\n" for text in texts)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=len(body)))
    lines, refused = lines_read(body, cuts)
    assert refused is None
    assert [orjson.loads(line)["data"] for line in lines] == texts
