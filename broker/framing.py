"""Server-Sent Events framing.

Each event is framed once, as bytes, and the same bytes go to every subscriber
of its topic. A payload's line breaks (LF, CR or CRLF) each start a new
``data:`` line, so the browser's EventSource joins them back with LF and gives
the publisher's text back (CR and CRLF come back as LF, as the spec requires).
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import TYPE_CHECKING

import orjson

from broker import constants as c

if TYPE_CHECKING:
    from broker.resume import Gap

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
HEARTBEAT = b":\n\n"


def data_lines(data: bytes) -> bytes:
    """``b"a\\nb"`` -> ``b"data: a\\ndata: b\\n"``."""
    # find, not ``in``: CPython 3.11's ``bytes in bytes`` first tries its operand as an
    # int, and builds a TypeError it then drops: the two checks were 4,260 of the
    # ~99,000 instructions of delivering an event (callgrind, ``bench.delivery``).
    if data.find(b"\n") < 0 and data.find(b"\r") < 0:
        return b"data: " + data + b"\n"
    return b"".join(b"data: " + line + b"\n" for line in _LINE_BREAK.split(data))


def event_body(data: bytes, event_type: bytes | None = None, retry: bytes | None = None) -> bytes:
    """Everything of an event after its ``id:`` line, blank line included."""
    head = b""
    if event_type:
        head += b"event: " + event_type + b"\n"
    if retry:
        head += b"retry: " + retry + b"\n"
    return head + data_lines(data) + b"\n"


def id_line(event_id: str) -> bytes:
    return b"id: " + event_id.encode() + b"\n"


_POSITION_BODY = event_body(b"{}", c.POSITION_EVENT.encode())


def position_frame(cursor: str, *, as_event: bool) -> bytes:
    """Where a stream stands when it has nothing to deliver there: an ``id:`` line with
    no data, which EventSource keeps for its reconnects without firing an event; or,
    ``as_event`` (the client asked: ``?positions=true``), a ``broker.position`` event,
    which a script sees and can keep across a page reload (``/client.js`` does)."""
    return id_line(cursor) + (_POSITION_BODY if as_event else b"\n")


def gap_frame(event_id: str, topic: str, gap: Gap) -> bytes:
    """A ``broker.gap`` notice: events the client asked for are not coming, and why."""
    data = {
        "reason": gap.reason,
        "requested": str(gap.requested),
        "resumed_after": str(gap.resumed_after) if gap.resumed_after else None,
        "topic": topic,
    }
    return id_line(event_id) + event_body(orjson.dumps(data), c.GAP_EVENT.encode())


def retry_hint(milliseconds: int) -> bytes:
    """Sent first on every stream: how long EventSource waits before reconnecting."""
    return b"retry: " + str(milliseconds).encode() + b"\n\n"


def seconds_text(seconds: float) -> bytes:
    """``15``, ``0.5``: the shortest decimal that reads back as ``seconds``, with no
    exponent (``1e-05`` is no number to every client's parser, JSON's included)."""
    return format(Decimal(repr(seconds)).normalize(), "f").encode("ascii")


def beat_event(interval_s: float) -> bytes:
    """A heartbeat a script sees (``?heartbeat=event``): a ``broker.beat`` event whose
    data is the interval in seconds (a JSON number, as ``Broker-Heartbeat`` says it), so
    a page can tell a stream that died in silence. No ``id:`` line: EventSource keeps
    its Last-Event-ID as it was, and a reconnect resumes where the events left it."""
    return event_body(seconds_text(interval_s), c.BEAT_EVENT.encode())


def comment(text: str = "") -> bytes:
    return b": " + text.encode() + b"\n\n" if text else HEARTBEAT
