"""The core's value types: what is appended, what is read back, what a log looks like."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from broker import constants as c
from broker.framing import event_body, id_line
from broker.ids import ORIGIN_EPOCH, EventId, StreamPosition, parse_stream_id
from broker.slots import slot_setters


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append. ``data`` is compact JSON text or plain text, per ``kind``."""

    data: str
    kind: str = c.KIND_JSON
    event: str | None = None
    retry: int | None = None

    def __init__(
        self,
        data: str,
        kind: str = c.KIND_JSON,
        event: str | None = None,
        retry: int | None = None,
    ) -> None:
        _set_data(self, data)  # (by hand, frozen all the same: see broker.slots)
        _set_kind(self, kind)
        _set_event(self, event)
        _set_retry(self, retry)


_set_data, _set_kind, _set_event, _set_retry = slot_setters(
    NewEvent, "data", "kind", "event", "retry"
)


@dataclass(frozen=True, slots=True)
class IngestLines:
    """A streaming ingest's events, each with its own idempotency record: the
    request's Idempotency-Key K and each event's line number n (line n is "K:n")."""

    key: str
    numbers: Sequence[int]
    after: int = 0
    """The last line the request stored before these (0: none yet, its lines before
    these blank): it must still be recorded, else the append is refused (``LinesLost``);
    its entry is the append's ``after_entry``, which tells when the records cannot (past
    the window)."""
    blank_through: int = 0
    """The request's last line (blank lines counted), once its body ended with blank
    lines after ``after`` (0: not so): with no ``numbers``, an append that stores
    nothing, only checks that no other stream under the key recorded a line where this
    one has blank lines (``out_of_step``, lua/ingest_lines.lua)."""
    since: str = ""
    """The ingest the request's lines went to, as its earlier appends were answered
    (``IngestAppendResult.ingest_since``, as the store wrote it: no int, never read as
    one here; "": not known). Where that ingest is still the one
    under way under the key, ``after`` not recorded in it was lost, whatever retention
    trimmed since (its entry alone cannot tell: ``LinesLost``)."""

    def __init__(
        self,
        key: str,
        numbers: Sequence[int],
        after: int = 0,
        blank_through: int = 0,
        since: str = "",
    ) -> None:
        _set_key(self, key)  # (by hand, frozen all the same: see broker.slots)
        _set_numbers(self, numbers)
        _set_after(self, after)
        _set_blank_through(self, blank_through)
        _set_since(self, since)


_set_key, _set_numbers, _set_after, _set_blank_through, _set_since = slot_setters(
    IngestLines, "key", "numbers", "after", "blank_through", "since"
)


@dataclass(frozen=True, slots=True)
class AppendResult:
    """The ids of an append; ``replayed`` when an Idempotency-Key had already stored them."""

    ids: list[EventId]
    replayed: bool
    end_id: EventId | None = None
    """The ``broker.end`` entry's id, when the append closed the topic."""

    def __init__(self, ids: list[EventId], replayed: bool, end_id: EventId | None = None) -> None:
        _set_ids(self, ids)  # (by hand, frozen all the same: see broker.slots)
        _set_replayed(self, replayed)
        _set_end_id(self, end_id)


_set_ids, _set_replayed, _set_end_id = slot_setters(AppendResult, "ids", "replayed", "end_id")


@dataclass(frozen=True, slots=True)
class IngestAppendResult(AppendResult):
    """An append of a keyed streaming ingest's lines (``lines``), and the ingest under its
    key they went to: when it began, by Redis's clock in ms, which names it ("": not
    said), for its later appends to name (``IngestLines.since``). Apart from
    ``AppendResult``, so that a publish pays nothing for it; text, as the store wrote it
    (an int, parsed and written back, cost a keyed line some 900 instructions)."""

    ingest_since: str = ""

    def __init__(
        self,
        ids: list[EventId],
        replayed: bool,
        end_id: EventId | None = None,
        ingest_since: str = "",
    ) -> None:
        _set_ids(self, ids)
        _set_replayed(self, replayed)
        _set_end_id(self, end_id)
        _set_ingest_since(self, ingest_since)


(_set_ingest_since,) = slot_setters(IngestAppendResult, "ingest_since")


class LogEntry:
    """One stored event, read back from a topic's log.

    Its SSE bytes are built lazily and once: the live reader shares one
    LogEntry between every subscriber of the topic.
    """

    __slots__ = (
        "_body", "_frame", "_id", "_raw_id", "epoch", "fields", "is_control", "number", "position",
        "topic",
    )  # fmt: skip

    def __init__(self, topic: str, position: StreamPosition, fields: dict[bytes, bytes]) -> None:
        self.topic = topic
        self.position = position
        self.fields = fields
        self.epoch = fields.get(c.FIELD_EPOCH, b"").decode() or "?"
        # The end of a closed topic, or a deleted topic's marker. Decided once here:
        # every subscriber's fast path asks (the entry is shared by all of them).
        self.is_control = fields.get(c.FIELD_EVENT, b"").startswith(b"broker.")
        # Its number in its log (1, 2, ...); None in an entry stored before numbers. Read
        # once here too: the live reader asks it twice of every entry it delivers.
        raw_number = fields.get(c.FIELD_NUMBER)
        self.number = int(raw_number) if raw_number else None
        self._body: bytes | None = None
        self._frame: bytes | None = None
        self._id: EventId | None = None
        self._raw_id: bytes | None = None  # its stream id as Redis wrote it (``from_redis``)

    @classmethod
    def from_redis(cls, topic: str, raw_id: bytes, flat: list[bytes]) -> LogEntry:
        """An entry as Redis returns it: its stream id, and its fields flattened
        (name, value, ...)."""
        # One iterator zipped with itself, not two slices zipped strictly (a list made
        # of each half, and strict's check pair by pair): the same pairs, in less than
        # half the time; an odd count is refused here as strict refused it.
        if len(flat) % 2:
            raise ValueError("an entry's fields and values do not pair up")
        pairs = iter(flat)
        entry = cls(topic, parse_stream_id(raw_id), dict(zip(pairs, pairs, strict=False)))
        if type(raw_id) is bytes:
            entry._raw_id = raw_id
        return entry

    @property
    def id(self) -> EventId:
        if self._id is None:
            self._id = EventId(self.epoch, self.position)
        return self._id

    @property
    def body(self) -> bytes:
        """The event's lines after ``id:``, blank line included."""
        if self._body is None:
            f = self.fields
            self._body = event_body(self.data, f.get(c.FIELD_EVENT), f.get(c.FIELD_RETRY))
        return self._body

    @property
    def frame(self) -> bytes:
        """The whole SSE event with its single-topic id."""
        if self._frame is None:
            raw_id = self._raw_id
            if raw_id is None:
                self._frame = id_line(str(self.id)) + self.body
            else:
                # Redis writes a stream id as ``<ms>-<seq>`` in decimal, as ``str(self.id)``
                # does after the epoch: its bytes are the id's, with no EventId made, no
                # integer formatted, no text encoded (a sixth of framing an event).
                f = self.fields
                data = f.get(c.FIELD_DATA, b"")
                # (``find``, not ``in``: see ``framing.data_lines``)
                one_line = data.find(b"\n") < 0 and data.find(b"\r") < 0
                if one_line and not f.get(c.FIELD_EVENT) and not f.get(c.FIELD_RETRY):
                    # A token (one line, no type, no retry: nearly every live entry):
                    # ``body``'s bytes in the same format, without its four calls and
                    # their joins (-6% of a delivered event: bench/PERFORMANCE.md).
                    self._frame = b"id: %b.%b\ndata: %b\n\n" % (self.epoch.encode(), raw_id, data)
                else:
                    self._frame = b"id: %b.%b\n%b" % (self.epoch.encode(), raw_id, self.body)
        return self._frame

    @property
    def event_type(self) -> str | None:
        raw = self.fields.get(c.FIELD_EVENT)
        return raw.decode() if raw else None

    @property
    def is_json(self) -> bool:
        return self.fields.get(c.FIELD_KIND, b"j") == c.KIND_JSON.encode()

    @property
    def data_text(self) -> str:
        return self.data.decode()

    @property
    def data(self) -> bytes:
        """The payload as stored: compact JSON text, or the published text."""
        return self.fields.get(c.FIELD_DATA, b"")


class LiveBatch:
    """One topic's new entries from one live read, as the hub offers them to every
    subscriber of the topic: what each subscriber's direct write needs to know about
    them is worked out once here, not once per subscriber."""

    __slots__ = (
        "_frames", "ends", "entries", "epoch", "first", "from_origin", "last_id", "size", "topic",
    )  # fmt: skip

    def __init__(self, entries: list[LogEntry], *, from_origin: bool) -> None:
        self.entries = entries
        first = entries[0]
        self.topic = first.topic
        self.first = first.position
        self.last_id = entries[-1].id
        self.epoch: str | None
        """Their log's epoch, None if the read crossed from one log into another."""
        self._frames: bytes | None = None
        if len(entries) == 1:
            # One entry (a token stream read as it comes: most batches): what the two
            # generators below make of it, without them; its frame is the batch's.
            self._frames = first.frame
            self.size = len(self._frames)
            self.epoch = first.epoch
        else:
            self.size = sum(len(entry.frame) for entry in entries)
            first_epoch = first.epoch
            self.epoch = first_epoch if all(e.epoch == first_epoch for e in entries) else None
        self.from_origin = from_origin
        """Read from the very start of a log that did not exist when its reader last
        looked: no entry of that log came before these."""
        self.ends = entries[-1].is_control  # (an end or a deletion is always a log's last)

    @property
    def frames(self) -> bytes:
        """Every entry's single-topic frame, joined once."""
        if self._frames is None:  # (one entry: its frame, set at once)
            self._frames = b"".join(entry.frame for entry in self.entries)
        return self._frames


@dataclass(frozen=True, slots=True)
class LogState:
    """What the store knows about a topic's log, read atomically."""

    epoch: str | None
    length: int
    first: StreamPosition | None
    last_entry: StreamPosition | None
    trimmed_through: StreamPosition
    end: StreamPosition | None = None
    """Where its ``broker.end`` entry is, once the topic is closed."""
    expires_in_ms: int | None = None
    """How long until Redis expires it, if it has a TTL."""
    deleted_epoch: str | None = None
    """The epoch of a log deleted a moment ago (DELETE), while its marker lingers; or,
    in a log created since, of the last log deleted before it."""
    deleted_at: StreamPosition | None = None
    """Where that deletion's marker is: a cursor there was told of the deletion."""
    issued: int | None = None
    """The number of the newest entry this log issued (0 for no log yet; None for a
    log whose entries were stored before they had numbers)."""
    lost_after: StreamPosition | None = None
    """Set by ``Store.revalidate`` only: the log lost the entry the live reader had read
    (and maybe more before it), and kept everything up to this one."""

    deleted_before: tuple[EventId, ...] = ()
    """The markers of logs deleted before that one (deleted, published to, deleted
    again...), the newest first."""
    clock_ms: int | None = None
    """With no log: the store's time when it said so (an origin cursor carries it)."""

    @property
    def deletion(self) -> EventId | None:
        """The id a stream gives a topic once told of its deletion (its marker's)."""
        if self.deleted_epoch is None or self.deleted_at is None:
            return None
        return EventId(self.deleted_epoch, self.deleted_at)

    @property
    def deletions(self) -> list[EventId]:
        """The markers of every deleted log it knows of, the newest first."""
        latest = self.deletion
        return [latest, *self.deleted_before] if latest is not None else [*self.deleted_before]

    def deletion_of(self, epoch: str) -> EventId | None:
        """The marker of the deleted log of ``epoch``, if this log knows of one."""
        return next((marker for marker in self.deletions if marker.epoch == epoch), None)

    @property
    def exists(self) -> bool:
        return self.epoch is not None

    @property
    def last_issued(self) -> StreamPosition:
        """The newest position this log ever issued, even if retention removed it since."""
        return max(self.last_entry or (0, 0), self.trimmed_through)

    def event_id(self, position: StreamPosition) -> EventId:
        return EventId(self.epoch or "0", position)

    @property
    def origin(self) -> EventId:
        """The origin, as of this state's time: "no log here then". Never before a
        deletion this state knows (a marker's id may pass the clock: the same
        millisecond, ids ahead of it): that one is no news to a client told it."""
        markers = [marker.position for marker in self.deletions]
        return EventId(ORIGIN_EPOCH, max([(self.clock_ms or 0, 0), *markers]))

    def deleted_since(self, origin: EventId) -> EventId | None:
        """The marker of the first log deleted after ``origin``'s time, if it knows one:
        a log a client at that origin never saw."""
        missed = [marker for marker in self.deletions if marker.position > origin.position]
        return min(missed, key=lambda marker: marker.position, default=None)


@dataclass(frozen=True, slots=True)
class LogPage:
    """A page of a topic's log, read in one atomic step with what the log knows of
    itself: a reader can tell whether retention removed entries before the page."""

    entries: list[LogEntry]
    epoch: str | None
    trimmed_through: StreamPosition
    after_found: bool = False
    """Whether the position read after is itself an entry of the log."""
    cut_short: bool = False
    """Fewer entries than asked for, to stay within the page's bytes: more may follow."""
    losses: tuple[StreamPosition, ...] = ()
    """The places, at or after the position read after, where the log lost events (it
    kept the entry there and lost what followed: a failover; see lua/state.lua), oldest
    first."""

    def losses_passed(self, after: StreamPosition) -> list[StreamPosition]:
        """The places where the log lost events that this page, read on from ``after``,
        passes, oldest first: its entries after each follow events that are gone."""
        entries = self.entries
        if not entries:
            return []
        return [place for place in self.losses if after <= place < entries[-1].position]

    def losses_ahead(self, at: StreamPosition) -> list[StreamPosition]:
        """The places where the log lost events that a reader standing at ``at`` (where
        this page, the log's last, left it) has not passed: nothing follows them yet
        to pass them with, and a client that stops here must be told now."""
        return [place for place in self.losses if place >= at]

    def lost(self, after: StreamPosition) -> bool:
        """Whether events were lost at ``after`` with no trace of retention: a position
        past what retention removed is an entry this log issued, unless the log lost
        it (an asynchronous failover, an AOF's lost second) and went on past it since
        (the events after it then follow events that are gone), or never issued it."""
        return after != (0, 0) and after > self.trimmed_through and not self.after_found
