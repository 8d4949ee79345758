"""An incremental ``text/event-stream`` decoder, as the HTML standard specifies it.

Fed the bytes of a stream in whatever chunks they arrive, it gives back whole
events. It keeps the stream's last event id the way ``EventSource`` does: an
event without an ``id:`` line keeps the previous one, and an id containing NUL
is ignored. Comments (heartbeats) are dropped; ``retry:`` hints are kept for
the reconnection delay.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

GAP = "broker.gap"
END = "broker.end"
POSITION = "broker.position"
"""Where a stream stands with no event to deliver (``?positions=true``): a cursor, no event."""
BEAT = "broker.beat"
"""The heartbeat as an event (``?heartbeat=event``, which /client.js asks for: a page sees
no comment): no id, no event. This client reads the comments, and does not ask."""
_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Event:
    """One event as a subscriber receives it.

    ``event`` is the type (None for the default ``message``); ``data`` is the raw
    text, exactly as ``EventSource`` gives it: JSON published data is its compact
    JSON text, text published as text is that text (call ``json()`` to parse).
    """

    id: str | None
    event: str | None
    data: str
    topic: str | None = None
    """The topic it is of (a subscriber sets it: on a multi-topic stream, the topic
    whose place in the id moved; a gap names its own)."""

    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def is_gap(self) -> bool:
        """A ``broker.gap``: events asked for are not coming (``json()`` says why)."""
        return self.event == GAP

    @property
    def is_end(self) -> bool:
        """A ``broker.end``: the topic was closed; nothing follows it."""
        return self.event == END

    @property
    def ends_topic(self) -> bool:
        """Nothing more comes of this event's topic: its ``broker.end``, or a gap saying
        it was deleted."""
        if self.event == END:
            return True
        if self.event != GAP:
            return False
        try:
            reason = self.json().get("reason")
        except (ValueError, AttributeError):
            return False
        return bool(reason == "deleted")

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "topic": self.topic, "event": self.event, "data": self.data}


class SseDecoder:
    """Bytes in, events out. One decoder per connection; ``last_id`` may be carried over."""

    def __init__(self, last_id: str | None = None) -> None:
        self.last_id = last_id  # the id field's last value (the standard's buffer)
        self.dispatched_id = last_id
        """The stream's last event id, as ``EventSource`` keeps it: set at each block's
        end, also by a block with an ``id:`` and no data (the broker's cursor once a
        stream is caught up), which is no event."""
        self.retry_ms: int | None = None
        self.comments = 0  # comment lines read: the broker's heartbeats
        self._pending = b""
        self._event: str | None = None
        self._data: list[str] = []
        self._has_data = False

    def feed(self, chunk: bytes) -> list[Event]:
        self._pending += chunk
        events: list[Event] = []
        start = 0
        for match in _LINE_END.finditer(self._pending):
            if match.group() == b"\r" and match.end() == len(self._pending):
                break  # a CR at the very end may be half of a CRLF: wait for more
            event = self._line(self._pending[start : match.start()])
            if event is not None:
                events.append(event)
            start = match.end()
        self._pending = self._pending[start:]
        return events

    def _line(self, raw: bytes) -> Event | None:
        if not raw:
            return self._dispatch()
        if raw.startswith(b":"):
            self.comments += 1
            return None
        name, colon, value = raw.decode("utf-8", errors="replace").partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value or None
        elif name == "id" and "\0" not in value:
            self.last_id = value or None
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Event | None:
        self.dispatched_id = self.last_id
        event: Event | None = None
        if self._has_data:
            event = Event(self.last_id, self._event, "\n".join(self._data))
        self._event, self._data, self._has_data = None, [], False
        return event
