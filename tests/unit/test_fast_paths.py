"""The hot paths' shortcuts against the general way they stand in for, over generated
inputs (seeded, bounded): each must give what the general way gives, or take the
general way. The general way is the code still there (ChunkedBody's loop, the event
checks) or the code before the shortcut, kept here as the reference."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import itertools
import json
import random
import re
from types import SimpleNamespace
from typing import Any, cast

import hiredis
import orjson
import pytest
from redis.exceptions import ResponseError

from api.body_framing import ChunkedBody
from api.lean_publish import publish_request
from api.publish import events_of, parse_events
from api.settings import Settings
from broker import constants as c
from broker import validation
from broker.errors import BrokerError, StoreUnavailable
from broker.ids import EventId, format_stream_id, parse_stream_id
from broker.model import AppendResult, IngestLines, LiveBatch, LogEntry, NewEvent
from broker.policy import Retention
from broker.redis_live import LiveReader, _Lane
from broker.redis_live_links import XREAD_HEAD
from broker.redis_replies import parse_answer
from broker.validation import event_from_json, loads_exactly

CASES = 3000  # per property: a few seconds in all

# -- ChunkedBody: a read that is one whole chunk ------------------------------------------------


class _GeneralChunkedBody(ChunkedBody):
    """ChunkedBody without the whole-chunk shortcut: every read through the loop."""

    __slots__ = ()

    def _whole_chunk(self, data: bytes) -> bytes | None:
        return None


_EXTENSIONS = [b"", b";ext=1", b";a", b";a=", b';q="x;y\t"', b";a=b;c", b";", b" ;a", b";a b"]
_DATA_BYTES = [b"a", b"\r\n", b"\r", b"\n", b"0\r\n\r\n", b"5;x\r\n", b"\xff", b"\x00"]


def _size_line(size: int, rng: random.Random) -> bytes:
    digits = b"%x" % size
    if rng.random() < 0.3:
        digits = digits.upper()
    if rng.random() < 0.2:  # (past 15 digits, the shortcut's hex check leaves it to the grammar)
        digits = b"0" * rng.randint(1, 16) + digits
    if rng.random() < 0.02:
        digits = b"+" + digits  # (int() takes it; the grammar must not)
    if rng.random() < 0.02:
        digits = digits[:1] + b"_" + digits[1:]  # (int() takes "1_0" too)
    return digits + rng.choice(_EXTENSIONS)


_CHUNK_ENDS = [b"\r\n"] * 12 + [b"XY", b"\r\r", b"\n\n", b"\r", b"\r\n\r\n"]


def _chunked_body(rng: random.Random) -> list[bytes]:
    """A chunked body in pieces, a chunk each: a few chunks (data with CRLFs in it, a
    chunk's end maybe spoiled), maybe the last chunk and trailers, maybe a pipelined
    request after it, maybe one byte spoiled anywhere."""
    pieces = []
    for _ in range(rng.randint(0, 4)):
        data = b"".join(rng.choice(_DATA_BYTES) for _ in range(rng.randint(1, 12)))
        pieces.append(_size_line(len(data), rng) + b"\r\n" + data + rng.choice(_CHUNK_ENDS))
    if rng.random() < 0.7:
        trailers = b"".join(
            rng.choice([b"X-T: 1\r\n", b"bad\r\n"]) for _ in range(rng.randint(0, 2))
        )
        pieces.append(_size_line(0, rng) + b"\r\n" + trailers + b"\r\n")
        if rng.random() < 0.3:
            pieces.append(b"GET / HTTP/1.1\r\n\r\n")
    if pieces and rng.random() < 0.1:
        spoiled = bytearray(pieces[-1])
        spoiled[rng.randrange(len(spoiled))] = rng.choice(b"\r\n0aZ;")
        pieces[-1] = bytes(spoiled)
    return pieces


def _reads(pieces: list[bytes], rng: random.Random) -> list[bytes]:
    """The body's reads: a chunk each often (as a token stream sends), else cut
    anywhere (a size line split, a chunk and part of the next)."""
    if rng.random() < 0.5:
        return pieces
    body = b"".join(pieces)
    if len(body) < 2:
        return [body]
    cuts = sorted(rng.sample(range(1, len(body)), min(rng.randint(0, 5), len(body) - 1)))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


def _decoded(body: ChunkedBody, reads: list[bytes]) -> list[Any]:
    said: list[Any] = []
    for data in reads:
        said.append(body.decode(data))
        if body.broken is not None or body.ended:
            break
    return [*said, body.ended, body.rest, str(body.broken), body._pending]


def test_a_chunked_body_decodes_as_the_general_way_does_however_it_is_read() -> None:
    rng = random.Random(1817737)
    for _ in range(CASES):
        reads = _reads(_chunked_body(rng), rng)
        assert _decoded(ChunkedBody(), reads) == _decoded(_GeneralChunkedBody(), reads), reads


def test_every_short_size_line_of_a_whole_chunk_is_read_as_the_general_way_reads_it() -> None:
    """The shortcut's hex check (no regular expression for a size of hex digits alone)
    against the grammar: every line of up to 3 symbols, digits and near misses, and
    sizes of 15 and 16 digits."""
    alphabet = [b"0", b"1", b"a", b"F", b"g", b"G", b"_", b"+", b"-", b" ", b";", b"x", b"\xff"]
    lines = [b"".join(s) for n in range(1, 4) for s in itertools.product(alphabet, repeat=n)]
    lines += [b"0" * 14 + b"1", b"0" * 15 + b"1", b"f" * 15, b"1" + b"0" * 15]
    for line in lines:
        data = line + b"\r\n" + b"x" + b"\r\n"
        whole = [ChunkedBody().decode(data), ChunkedBody().decode(data + b"0\r\n\r\n")]
        general = [_GeneralChunkedBody().decode(data)]
        general.append(_GeneralChunkedBody().decode(data + b"0\r\n\r\n"))
        assert whole == general, line


# -- loads_exactly: the translate pre-check before the long-number expression --------------------

_LONG_NUMBER = re.compile(rb"\d{20}|-\d{19}")  # (the expression, as loads_exactly has it)
_NUMBER_ALPHABET = ["0", "1", "9", "-", "+", "e", "E", ".", " ", "\n", "\u0663", "\uff11", "x"]


def test_the_pre_check_never_skips_a_run_the_expression_matches() -> None:
    assert validation._LONG_NUMBER.pattern == _LONG_NUMBER.pattern
    rng = random.Random(91485)
    for _ in range(CASES * 3):
        text = "".join(rng.choice(_NUMBER_ALPHABET) for _ in range(rng.randint(15, 45)))
        raw = text.encode()
        if _LONG_NUMBER.search(raw):
            assert validation._LONG_RUN in raw.translate(validation._NUMBER_BYTES), text


def _loads_before(raw: bytes) -> Any:
    """loads_exactly before the pre-check (91485f6^)."""
    document = orjson.loads(raw)
    if _LONG_NUMBER.search(raw) is not None:
        document = json.loads(raw)
    return document


def _number(rng: random.Random) -> str:
    sign = rng.choice(["", "", "-"])
    digits = str(rng.randint(1, 9)) + "".join(
        str(rng.randint(0, 9)) for _ in range(rng.randint(0, 24))
    )
    fraction = rng.choice(["", "", ".5", "e3", "E-2", ".25e+1"])
    return sign + digits + fraction


def test_loads_exactly_reads_numbers_as_before() -> None:
    rng = random.Random(2**64)
    for _ in range(CASES):
        raw = ("[" + ", ".join(_number(rng) for _ in range(rng.randint(1, 4))) + "]").encode()
        raw = raw if rng.random() < 0.8 else b'{"data": "' + raw.replace(b"-", b"--") + b'"}'
        new, old = loads_exactly(raw), _loads_before(raw)
        assert repr(new) == repr(old), raw  # (repr: 1 and 1.0 told apart)


# -- event_from_json: an event of data alone ----------------------------------------------------


def _event_before(item: Any, max_event_bytes: int) -> NewEvent:
    """event_from_json before its shortcut (3ebd46e^)."""
    if not isinstance(item, dict):
        raise validation.InvalidInput("each event must be a JSON object with a 'data' member")
    if "data" not in item:
        raise validation.InvalidInput("an event needs a 'data' member", field="data")
    unknown = set(item) - {"data", "event", "retry"}
    if unknown:
        raise validation.InvalidInput(f"unknown member(s): {', '.join(sorted(unknown))}")
    data = validation._compact_json(item["data"])
    event = validation.check_event_type(item.get("event"))
    validation.check_size(data, max_event_bytes, event)
    retry = validation.check_retry(item.get("retry"))
    return NewEvent(data=data, kind=c.KIND_JSON, event=event, retry=retry)


_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**64,
    -(2**63) - 1,
    1.5,
    "",
    "x" * 40,
    "é\u2028",
    [],
    [1, [2, {"a": None}]],
    {},
    {"k": "v", "": 2},
    float("nan"),
]


def _item(rng: random.Random) -> Any:
    if rng.random() < 0.05:
        return rng.choice([None, [], "data", 1])
    item: dict[str, Any] = {}
    for name in rng.sample(
        ["data", "data", "data", "event", "retry", "id", "Data"], rng.randint(0, 3)
    ):
        item[name] = rng.choice([*_VALUES, "t", 5, -5, "broker.x", "a\nb"])
    return item


def _outcome(make: Any, item: Any, limit: int) -> Any:
    try:
        return make(item, limit)
    except (BrokerError, ValueError) as error:
        return type(error), str(error)


def test_an_event_is_read_as_the_full_checks_read_it() -> None:
    rng = random.Random(3)
    for _ in range(CASES):
        item, limit = _item(rng), rng.choice([4, 64, 65536])
        assert _outcome(event_from_json, item, limit) == _outcome(_event_before, item, limit), item
    for raw in [
        b'{"data": 1, "data": 2}',
        b'{"data": 1, "event": null}',
        b'{"data": 1, "retry": null}',
    ]:
        item = loads_exactly(raw)
        assert _outcome(event_from_json, item, 99) == _outcome(_event_before, item, 99), raw


# -- the append's answer parsed in one loop -----------------------------------------------------


def _answer_before(answer: bytes, *, replayed: bool) -> AppendResult:
    """parse_answer (then redis_store._parse_answer) before it was inlined (3e00fb7^)."""
    epoch, ids, end = answer.decode().split("|")
    return AppendResult(
        ids=[EventId(epoch, parse_stream_id(raw)) for raw in ids.split(",") if raw],
        replayed=replayed,
        end_id=EventId(epoch, parse_stream_id(end)) if end else None,
    )


@pytest.mark.parametrize(
    "answer",
    [
        b"ep|1-0|",
        b"ep|1-0,1-1,2|",
        b"ep||3-4",
        b"ep||",
        b"ep|,1-0,|",
        b"e|1700000000000-18446744073709551615|9",
    ],
)
def test_an_append_answer_is_read_as_before(answer: bytes) -> None:
    for replayed in (False, True):
        assert parse_answer(answer, replayed=replayed) == _answer_before(answer, replayed=replayed)


# -- Retention.trim_slack, a field ---------------------------------------------------------------


@pytest.mark.parametrize("maxlen", [1, 99, 100, 101, 5_000, 99_999, 100_000, 10**9])
def test_trim_slack_is_what_the_property_gave_and_follows_a_replaced_maxlen(maxlen: int) -> None:
    def before(maxlen: int) -> int:  # (the property, e5416f9^)
        return max(1, min(1000, maxlen // 100))

    retention = Retention(maxlen=maxlen, max_age_ms=5)
    assert retention.trim_slack == before(maxlen)
    assert dataclasses.replace(retention, maxlen=maxlen * 3).trim_slack == before(maxlen * 3)
    assert retention == Retention(maxlen=maxlen, max_age_ms=5)


# -- a live entry framed from the bytes Redis sent ------------------------------------------------

_FIELD_VALUES = {
    c.FIELD_EPOCH: [b"a2vnkrek", b"zzzzzzzz", b"", "é".encode()],
    c.FIELD_NUMBER: [b"1", b"42", b""],
    c.FIELD_KIND: [b"t", b"j"],
    c.FIELD_DATA: [b"tok", b"", b"a\nb", b"a\r\nb\rc", b"\n", b'{"x":1}', "ü".encode()],
    c.FIELD_EVENT: [b"", b"token", b"broker.end", b"broker.deleted"],
    c.FIELD_RETRY: [b"", b"1500"],
}


def _stream_id(rng: random.Random) -> bytes:
    """An id as Redis writes one: ``<ms>-<seq>`` in decimal, each part up to 2**64 - 1."""
    ms = rng.choice([0, 1, rng.randrange(2**41), 2**64 - 1])
    seq = rng.choice([0, 1, rng.randrange(2**16), 2**64 - 1])
    return b"%d-%d" % (ms, seq)


def _flat_fields(rng: random.Random) -> list[bytes]:
    names = [name for name in _FIELD_VALUES if rng.random() < 0.9]
    rng.shuffle(names)
    return [part for name in names for part in (name, rng.choice(_FIELD_VALUES[name]))]


def _parse_stream_id_before(raw: bytes | str) -> tuple[int, int]:
    """parse_stream_id before it read bytes as they are (e8cf448)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _entry_before(topic: str, raw_id: bytes, flat: list[bytes]) -> LogEntry:
    """LogEntry.from_redis before it kept Redis' id bytes (e8cf448): framed from its EventId."""
    return LogEntry(
        topic, _parse_stream_id_before(raw_id), dict(zip(flat[::2], flat[1::2], strict=True))
    )


def test_a_live_entry_is_framed_as_its_event_id_frames_it() -> None:
    rng = random.Random(4)
    for _ in range(CASES):
        raw_id, flat = _stream_id(rng), _flat_fields(rng)
        entry, before = LogEntry.from_redis("t", raw_id, flat), _entry_before("t", raw_id, flat)
        assert entry.frame == before.frame, (raw_id, flat)
        assert (entry.position, entry.fields, entry.id) == (
            before.position,
            before.fields,
            before.id,
        )
        assert (entry.epoch, entry.is_control, entry.body) == (
            before.epoch,
            before.is_control,
            before.body,
        )
        assert parse_stream_id(raw_id) == _parse_stream_id_before(raw_id)
        assert parse_stream_id(raw_id.decode()) == _parse_stream_id_before(raw_id.decode())


def test_an_entry_whose_fields_do_not_pair_up_is_refused_as_before() -> None:
    for make in (LogEntry.from_redis, _entry_before):
        with pytest.raises(ValueError):
            make("t", b"1-0", [b"d", b"x", b"ep"])


def _batch_before(entries: list[LogEntry]) -> tuple[Any, ...]:
    """What LiveBatch worked out of its entries before one entry took a shortcut (e8cf448)."""
    first_epoch = entries[0].epoch
    return (
        sum(len(entry.frame) for entry in entries),
        first_epoch if all(e.epoch == first_epoch for e in entries) else None,
        b"".join(entry.frame for entry in entries),
    )


def test_a_batch_of_one_entry_is_what_the_general_way_made_of_it() -> None:
    rng = random.Random(5)
    for _ in range(CASES):
        entries = [
            LogEntry.from_redis("t", _stream_id(rng), _flat_fields(rng))
            for _ in range(rng.choice([1, 1, 2, 3]))
        ]
        batch = LiveBatch(entries, from_origin=False)
        assert (batch.size, batch.epoch, batch.frames) == _batch_before(entries)
        assert (batch.topic, batch.first, batch.last_id, batch.ends) == (
            "t", entries[0].position, entries[-1].id, entries[-1].is_control,
        )  # fmt: skip


# -- The live reader's XREAD: joined from pieces packed as topics come and positions move -------


def _xread_before(head: tuple[Any, ...], armed: dict[str, tuple[int, int]]) -> bytes:
    """The XREAD as the live reader packed it before it joined kept pieces (d7260c8): its
    topics' keys and ids formatted again at every read, packed by hiredis."""
    command = (
        *head,
        *[c.log_key(t) for t in armed],
        *[format_stream_id(p) for p in armed.values()],
    )
    packed: bytes = hiredis.pack_command(command)
    return packed


def _arguments(packed: bytes) -> list[bytes]:
    """A packed command read back (a command is an array of bulk strings, as a reply can be)."""
    reader = hiredis.Reader()
    reader.feed(packed)
    arguments: list[bytes] = reader.gets()
    assert reader.gets() is False  # (one command, whole, nothing after it)
    return arguments


class _ScriptedLink:
    """A raw lane's link to no server: it checks each XREAD it is sent against what the
    hub asked, and answers with entries after the positions asked for some of the
    keys; or holds the read until it is unblocked (nil), or refuses it (an error)."""

    def __init__(self, hub: _Hub, client_id: int) -> None:
        self.hub = hub
        self.client_id = client_id
        self.held: asyncio.Event | None = None

    async def call(self, command: bytes) -> Any:
        hub = self.hub
        [lane] = [lane for lane in hub.reader._lanes if lane.connection is cast(Any, self)]
        arguments = _arguments(command)
        keys_and_ids = arguments[len(XREAD_HEAD) :]
        keys, ids = keys_and_ids[: len(lane.topics)], keys_and_ids[len(lane.topics) :]
        named = dict(zip(keys, ids, strict=True)) if len(keys) == len(ids) else None
        # The positions the hub asked, each topic of the lane once (none lost, none
        # repeated), packed as before. Told to the test, not raised: the reader takes
        # an exception in a read for a failed read, and the hub reads again.
        asked = {
            c.log_key(t).encode(): format_stream_id(hub.positions[t]).encode() for t in lane.topics
        }
        if command != _xread_before(XREAD_HEAD, lane.armed) or named != asked:
            hub.wrong.append((command, asked))
            return ResponseError("not what the hub asked")
        hub.reads += 1
        pick = hub.rng.random()
        if pick < 0.05:
            return ResponseError("LOADING")  # the read fails: every lane reset
        if pick < 0.3:
            self.held = asyncio.Event()
            await self.held.wait()  # until CLIENT UNBLOCK
            self.held = None
            return None
        return [
            [key, hub.entries_after(parse_stream_id(ids[n]))]
            for n, key in enumerate(keys)
            if hub.rng.random() < 0.5
        ] or None

    def unblock(self) -> bool:
        if self.held is None:
            return False  # (its read has not started yet: asked again soon)
        self.held.set()
        return True

    async def close(self) -> None:
        if self.held is not None:
            self.held.set()


class _Hub:
    """What the hub does with the live reader, topics coming, going and moving at random."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.positions: dict[str, tuple[int, int]] = {}
        self.reads = 0  # the reads that named what the hub asked
        self.wrong: list[tuple[bytes, dict[bytes, bytes]]] = []  # the others: what, and what not
        self.links: list[_ScriptedLink] = []
        self.reader = _ScriptedReader(self)

    def new_link(self) -> _ScriptedLink:
        self.links.append(_ScriptedLink(self, len(self.links) + 1))
        return self.links[-1]

    async def client_unblock(self, client_id: int) -> bool:
        return self.links[client_id - 1].unblock()

    async def aclose(self) -> None:
        """(the reader's client, closed with it)"""

    def entries_after(self, position: tuple[int, int]) -> list[list[Any]]:
        ms, seq = position
        entries = []
        for _ in range(self.rng.choice([1, 1, 2, 3])):
            if self.rng.random() < 0.5 and ms < 2**64 - 1:
                ms, seq = ms + self.rng.choice([1, 2**20, 2**40]), 0
            else:
                seq += 1
            entries.append([b"%d-%d" % (ms, seq), [c.FIELD_DATA, b"tok"]])
        return entries

    def topic(self) -> str:
        """Names of every length a topic may have, with ``:``, ``.`` and ``-`` (and some
        a topic may not have: the packing is of any text, as hiredis'); each key is
        Cluster-style, ``broker:{topic}:log``."""
        n = self.rng.randrange(10**6)
        return self.rng.choice([f"t{n}", f"a:b.c-{n}", f"{n}" + "x" * 190, f"é日本{n}"])

    def position(self) -> tuple[int, int]:
        rng = self.rng
        return rng.choice([(0, 0), (rng.randrange(2**41), rng.randrange(4)), (2**64 - 1, 7)])

    def churn(self) -> None:
        """Topics come and go (sometimes many at once), and some positions move otherwise
        than by a read (a topic expired, a batch not delivered: moved back or on)."""
        rng = self.rng
        for _ in range(rng.choice([0, 0, 1, 2, 12])):
            self.positions[self.topic()] = self.position()
        for topic in list(self.positions):
            if rng.random() < 0.05:
                del self.positions[topic]
            elif rng.random() < 0.03:
                self.positions[topic] = self.position()

    def delivered(self, batches: dict[str, list[LogEntry]]) -> None:
        for topic, entries in batches.items():
            if self.rng.random() < 0.95:  # (else its subscribers left: read again from before)
                self.positions[topic] = entries[-1].position


class _ScriptedReader(LiveReader):
    """A live reader whose lanes' links are scripted, several topics to a lane."""

    def __init__(self, hub: _Hub) -> None:
        self._hub = hub
        hub.single_connection_client = True  # type: ignore[attr-defined]  # (lanes may grow)
        super().__init__(cast(Any, hub), cast(Any, hub), lane_topics=3, max_lanes=4)

    def _new_lane(self, client: Any = None) -> _Lane:
        return _Lane(cast(Any, self._hub.new_link()))


@pytest.mark.parametrize("seed", range(4))
async def test_a_live_read_names_what_the_hub_asks_packed_as_hiredis_packed_it(seed: int) -> None:
    hub = _Hub(seed)
    reader = hub.reader
    try:
        for _ in range(300):
            hub.churn()
            try:
                hub.delivered(await reader.read(dict(hub.positions), block_ms=3))
            except StoreUnavailable:
                continue  # (the hub reads again from the positions it has)
    finally:
        await reader.close()
    assert hub.wrong == []
    assert hub.reads > 300


# -- A lean publish's Content-Type, parsed once with its head ----------------------------------

_CONTENT_TYPES = [
    b"application/json",
    b"Application/JSON",
    b"application/json; charset=utf-8",
    b"application/json;charset=UTF8",
    b'application/json; charset="utf-8"; x=1',
    b"application/json; charset=latin-1",
    b"text/plain",
    b"text/plain; charset=utf-8",
    b" text/plain ;charset=UTF-8",
    b"text/plain; charset=ascii",
    b"text/plain;;",
]
_BODIES = [b'{"data": "tok"}', b'[{"data": 1}, {"data": "x"}]', b"plain words", b"{", b"\xff"]


def _parsed(parse: Any) -> Any:
    try:
        events, is_batch = parse()
    except Exception as error:
        return type(error), str(error)
    return events, is_batch


@pytest.mark.parametrize("content_type", _CONTENT_TYPES)
@pytest.mark.parametrize("query", [b"", b"?event=t", b"?close=true"])
def test_a_lean_publish_reads_its_body_as_its_content_type_says(
    content_type: bytes, query: bytes
) -> None:
    """The lean path parses the Content-Type with the head and passes it on
    (``events_of``); the general way parses it from the headers (``parse_events``)."""
    settings = Settings()
    app = SimpleNamespace(state=SimpleNamespace(settings=settings))
    for body in _BODIES:
        head = (
            b"POST /topics/t/events%b HTTP/1.1\r\nhost: h\r\ncontent-type: %b\r\n"
            b"content-length: %d\r\n\r\n" % (query, content_type, len(body))
        )
        request = publish_request(head + body, app)
        assert request is not None
        lean = _parsed(
            lambda r=request, b=body: events_of(r.scope, r.media_type, r.charset, b, settings)
        )
        general = _parsed(
            lambda r=request, b=body: parse_events(
                r.scope, {b"content-type": content_type}, b, settings
            )
        )
        assert lean == general


# -- A topic's keys, from one tag --------------------------------------------------------------


@pytest.mark.parametrize("topic", ["t", "a:b.c-d_e", "x" * 200, "{braces}"])
def test_a_topics_keys_are_each_key_functions(topic: str) -> None:
    assert c.topic_keys(topic) == [
        c.log_key(topic),
        c.meta_key(topic),
        c.records_key(topic),
        c.record_times_key(topic),
        c.line_records_key(topic),
        c.line_times_key(topic),
    ]


# -- the frozen dataclasses of every append: __init__ by hand (broker/slots.py) ------------------

_HAND_WRITTEN = [
    (EventId, [("ab2cd3ef", (5, 1))]),
    (NewEvent, [("d",), ("d", c.KIND_TEXT), ("d", c.KIND_JSON, "e", 3)]),
    (AppendResult, [([EventId("a", (1, 0))], False), ([], True, EventId("a", (2, 0)))]),
    (IngestLines, [("k", [1, 2]), ("k", (3,), 2), ("k", (), 3, 5)]),
]


def _generated_twin(cls: type) -> type:
    """The class as the dataclass decorator alone makes it (its __init__ generated)."""
    fields = [
        (f.name, f.type, dataclasses.field(default=f.default))
        if f.default is not dataclasses.MISSING
        else (f.name, f.type)
        for f in dataclasses.fields(cls)
    ]
    return dataclasses.make_dataclass(cls.__name__, fields, frozen=True, slots=True)


def _hashed(made: object) -> int | str:
    try:
        return hash(made)
    except TypeError:  # (a list among its fields)
        return "unhashable"


@pytest.mark.parametrize(("cls", "arguments"), _HAND_WRITTEN)
def test_a_hand_written_init_is_the_generated_one(cls: type, arguments: list[tuple[Any]]) -> None:
    twin = _generated_twin(cls)
    ours = [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]
    theirs = [(p.name, p.kind, p.default) for p in inspect.signature(twin).parameters.values()]
    assert ours == theirs
    for given in arguments:
        made = cls(*given)
        assert dataclasses.astuple(made) == dataclasses.astuple(twin(*given))
        by_name = cls(**{f.name: v for f, v in zip(dataclasses.fields(cls), given, strict=False)})
        assert by_name == made
        assert _hashed(made) == _hashed(twin(*given))
        assert dataclasses.replace(made) == made
        with pytest.raises(dataclasses.FrozenInstanceError):
            made.__setattr__(dataclasses.fields(cls)[0].name, None)
