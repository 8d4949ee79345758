"""Event ids and cursors.

An event id is ``<epoch>.<ms>-<seq>``: the epoch of the topic's log (a random
token fixed when the log is created) and the Redis Stream id of the entry.
Clients treat it as opaque. The epoch is what lets the broker tell an id of
*this* log from an id of a log that was lost and recreated, or of another topic:
Redis stream ids alone look alike across all of those.

The epoch ``0`` is the origin: "before anything of whatever log this topic
has". It is the position of a subscriber that started on a topic with no log,
and carries the store's time when it found none, past every deletion known then
(``0.<ms>-<n>``; ``0.0-0``: no time): a client back with it is told of a log
deleted meanwhile, and, on a topic with a TTL, of one that may have come and
expired whole meanwhile (``broker.resume.may_have_expired_since``); a stream that
stays there sends its client later ones (``broker.origins``).

A subscription to several topics sends composite cursors instead,
``<topic>~<id>!<topic>~<id>...``: one position per topic, so that one
Last-Event-ID resumes every topic of the connection exactly.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from broker.constants import MOST_TOPICS_PER_SUBSCRIPTION
from broker.errors import InvalidEventId
from broker.slots import slot_setters

ORIGIN_EPOCH = "0"
TOPIC_SEPARATOR = "~"
ENTRY_SEPARATOR = "!"
MAX_PART = 2**64 - 1
MAX_CURSOR_ENTRY = 200 + 1 + 8 + 1 + 20 + 1 + 20 + 1
"""The longest entry of a multi-topic cursor: ``topic~epoch.ms-seq!``."""
MAX_CURSOR_LENGTH = MOST_TOPICS_PER_SUBSCRIPTION * MAX_CURSOR_ENTRY
"""Every cursor the broker can send parses (a fixed 16 KiB refused those of more than
some 65 long topics, which the settings allow: audit); a request's head bounds it
first (``BROKER_MAX_HEAD_BYTES``, which the settings keep large enough to resume)."""

StreamPosition = tuple[int, int]
"""A Redis Stream id as (milliseconds, sequence); tuples compare as stream ids do."""

_EVENT_ID = re.compile(r"(0|[a-z2-7]{8})\.([0-9]{1,20})-([0-9]{1,20})")
_TOPIC = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")


def new_epoch() -> str:
    """A fresh random epoch (40 bits, 8 base32 characters), never the origin epoch."""
    if not _epochs:
        _draw_epochs()
    return _epochs.pop()


_EPOCHS_PER_DRAW = 256
_epochs: list[str] = []
"""Drawn ahead: every append offers the store an epoch (in case it creates the log),
and one ``os.urandom`` call per append was 5% of an append's client CPU."""

_BASE32 = b"abcdefghijklmnopqrstuvwxyz234567"
_BYTE_TO_BASE32 = bytes(_BASE32[byte % 32] for byte in range(256))
"""Each random byte as one base32 character: 256 is 8 times 32, so each character is
as uniform as the byte (5 random bits), and 8 of them are the 40 bits of 5 bytes."""

_EPOCH_SLICES = [slice(n, n + 8) for n in range(0, 8 * _EPOCHS_PER_DRAW, 8)]


def _draw_epochs() -> None:
    # One draw of the system's CSPRNG (``secrets.token_bytes`` is ``os.urandom``), one
    # translation and the cuts, all in C: ``base64.b32encode`` is Python in 3.11, a
    # loop per 5 bytes, which cost every POST some 6,000 instructions (callgrind).
    text = os.urandom(8 * _EPOCHS_PER_DRAW).translate(_BYTE_TO_BASE32).decode()
    _epochs.extend(map(text.__getitem__, _EPOCH_SLICES))


# A forked child must not offer the epochs its parent will offer too: a log
# recreated with an epoch its predecessor had would take old ids for its own.
os.register_at_fork(after_in_child=_epochs.clear)


def parse_stream_id(raw: bytes | str) -> StreamPosition:
    """``b"1700000000000-3"`` -> ``(1700000000000, 3)``."""
    # Bytes parsed as they are (``int`` reads ASCII digits from bytes): no text decoded
    # for every entry the live reader reads.
    ms, _, seq = raw.partition(b"-") if isinstance(raw, bytes) else raw.partition("-")
    return int(ms), int(seq or 0)


def format_stream_id(position: StreamPosition) -> str:
    return f"{position[0]}-{position[1]}"


@dataclass(frozen=True, slots=True)
class EventId:
    """A position in one topic's log: its epoch and a stream position."""

    epoch: str
    position: StreamPosition

    def __init__(self, epoch: str, position: StreamPosition) -> None:
        _set_epoch(self, epoch)  # (by hand, frozen all the same: see broker.slots)
        _set_position(self, position)

    def __str__(self) -> str:
        return f"{self.epoch}.{self.position[0]}-{self.position[1]}"

    @property
    def is_origin(self) -> bool:
        return self.epoch == ORIGIN_EPOCH

    @property
    def stream_after(self) -> StreamPosition:
        """Where a read after this id starts: the origin reads a log from its start,
        whatever time it carries."""
        return (0, 0) if self.epoch == ORIGIN_EPOCH else self.position

    @classmethod
    def parse(cls, text: str) -> EventId:
        match = _EVENT_ID.fullmatch(text)
        if match is None:
            raise InvalidEventId(f"not an event id: {text[:80]!r}", field="Last-Event-ID")
        epoch, ms, seq = match.group(1), int(match.group(2)), int(match.group(3))
        if ms > MAX_PART or seq > MAX_PART:
            raise InvalidEventId(f"event id out of range: {text[:80]!r}", field="Last-Event-ID")
        return cls(epoch, (ms, seq))


_set_epoch, _set_position = slot_setters(EventId, "epoch", "position")
ORIGIN = EventId(ORIGIN_EPOCH, (0, 0))

Cursor = dict[str, EventId]
"""Per-topic positions of a multi-topic subscription."""


def format_cursor(positions: Cursor) -> str:
    """The composite id sent on a multi-topic connection (topics in sorted order)."""
    return ENTRY_SEPARATOR.join(
        f"{topic}{TOPIC_SEPARATOR}{positions[topic]}" for topic in sorted(positions)
    )


def parse_cursor(text: str) -> Cursor:
    """Parse a composite cursor; raises InvalidEventId when any part is malformed."""
    if len(text) > MAX_CURSOR_LENGTH:
        raise InvalidEventId("cursor too long", field="Last-Event-ID")
    cursor: Cursor = {}
    for entry in text.split(ENTRY_SEPARATOR):
        topic, separator, event_id = entry.partition(TOPIC_SEPARATOR)
        if not separator or _TOPIC.fullmatch(topic) is None or topic in cursor:
            raise InvalidEventId(f"not a cursor: {text[:80]!r}", field="Last-Event-ID")
        cursor[topic] = EventId.parse(event_id)
    return cursor


def parse_last_event_id(text: str) -> EventId | Cursor:
    """A single event id, or a composite cursor from a multi-topic connection."""
    if TOPIC_SEPARATOR in text:
        return parse_cursor(text)
    return EventId.parse(text)
