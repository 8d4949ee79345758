"""Checks of what clients send, shared by every edge: each failure is an InvalidInput."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

import orjson

from broker import constants as c
from broker.errors import InvalidInput, InvalidTopic, TooLarge
from broker.model import NewEvent

TOPICS_KEPT = 4096
"""Topic names found valid, kept so that the next check of one is a set lookup: the
core checks the topic of every append, and a streaming ingest appends each line (its
regular expression cost a line 1,700 instructions, callgrind). Past this many the set
starts again (a name's check is the same whenever it runs)."""
_valid_topics: set[str] = set()


def check_topic(topic: str) -> str:
    if topic in _valid_topics:
        return topic
    if c.TOPIC_PATTERN.fullmatch(topic) is None:
        raise InvalidTopic(
            "a topic name is 1 to 200 characters of A-Z a-z 0-9 _ . : -", field="topic"
        )
    if len(_valid_topics) >= TOPICS_KEPT:
        _valid_topics.clear()
    _valid_topics.add(topic)
    return topic


def check_event_type(event: object) -> str | None:
    if event is None:
        return None
    if not isinstance(event, str) or not event:
        raise InvalidInput("event must be a non-empty string", field="event")
    if any(ch in event for ch in "\r\n\0"):
        raise InvalidInput("event must not contain CR, LF or NUL", field="event")
    if event.startswith(c.RESERVED_EVENT_PREFIX):
        raise InvalidInput("event types beginning with 'broker.' are reserved", field="event")
    return event


def check_retry(retry: object) -> int | None:
    if retry is None:
        return None
    # bool is an int in Python; JSON true is not a number of milliseconds.
    if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
        raise InvalidInput("retry must be a non-negative integer (ms)", field="retry")
    if retry > 2**31:
        raise InvalidInput("retry is too large", field="retry")
    return retry


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if c.IDEMPOTENCY_KEY_PATTERN.fullmatch(key) is None:
        raise InvalidInput(
            "Idempotency-Key must be 1 to 200 printable ASCII characters", field="Idempotency-Key"
        )
    return key


def check_size(data: str, max_event_bytes: int, event: str | None = None) -> None:
    """An event's data and its type together: both are stored and sent with it (a
    900 KB type with 1 byte of data passed a 64 KiB limit)."""
    extra = 0 if event is None else len(_utf8(event, "event"))
    if len(data) + extra > max_event_bytes or len(_utf8(data, "data")) + extra > max_event_bytes:
        raise TooLarge(f"an event is larger than {max_event_bytes} bytes", limit=max_event_bytes)


def _utf8(text: str, field: str) -> bytes:
    """``text`` in UTF-8, or InvalidInput: a Python string may hold a lone surrogate,
    which has none (the direct publisher raised a bare UnicodeEncodeError; audit)."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise InvalidInput(f"{field}: not valid Unicode (a lone surrogate)", field=field) from None


_LONG_NUMBER = re.compile(rb"\d{20}|-\d{19}")
"""Digits enough to be an integer past what orjson keeps exact (0 .. 2**64 - 1 and
down to -2**63): 20 in a row, or 19 after a minus (in a string: harmless). Not 19
alone: every 19-digit integer is below 10**19 < 2**64, and a nanosecond timestamp or
a snowflake id has 19 digits (those paid the standard library's parse, 4x orjson's)."""


_NUMBER_BYTES = bytes(0x30 if byte in b"-0123456789" else 0x78 for byte in range(256))
"""For ``bytes.translate``: a digit or a minus becomes ``0``, anything else ``x``."""
_LONG_RUN = b"0" * 20
"""Translated by ``_NUMBER_BYTES``, where ``_LONG_NUMBER`` may match: a run of 20 digits
or minus signs holds every match (and few else). Looked for first, in C: the regular
expression tries both branches at every byte, 2-10 us per line of an ingest (more on a
longer one), where the translation and search cost under one."""


def loads_exactly(raw: bytes) -> Any:
    """The JSON document, its numbers as written: orjson turns an integer past 64 bits
    into a float silently (2**64 comes out as 1.8446744073709552e+19), so a document
    with such a long digit run is read again by the standard library, which keeps
    it. Raises ``orjson.JSONDecodeError`` (a ``ValueError``) for malformed JSON."""
    document = orjson.loads(raw)
    # (``find``, not ``in``: CPython 3.11's ``bytes in bytes`` tries its operand as an int
    # first and builds a TypeError it drops, 1,900 instructions a line, callgrind)
    if raw.translate(_NUMBER_BYTES).find(_LONG_RUN) >= 0 and _LONG_NUMBER.search(raw) is not None:
        if _deeper_than(document, MAX_JSON_DEPTH + 2):  # (with a batch's list and object)
            raise orjson.JSONDecodeError(TOO_DEEP, "", 0)
        document = json.loads(raw)
    return document


MAX_JSON_DEPTH = 254
"""Data nested deeper is refused (400). orjson reads 1024 levels but writes 254; past
that the standard library wrote it, until Python's recursion limit, which counts the
frames the caller already had: a 500, and a depth the two HTTP paths disagreed on."""
TOO_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"


def _deeper_than(document: Any, limit: int) -> bool:
    """Whether arrays and objects nest past ``limit`` levels (looked at without recursion)."""
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _compact_json(data: Any) -> str:
    try:
        return orjson.dumps(data).decode()
    except orjson.JSONEncodeError:  # an integer past 64 bits, or past 254 levels
        if _deeper_than(data, MAX_JSON_DEPTH):
            raise InvalidInput(f"data: {TOO_DEEP}", field="data") from None
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def check_finite_numbers(document: Any, field: str = "data") -> None:
    """Refuses a NaN or an infinity (InvalidInput), which JSON has not: orjson writes
    each as ``null``, so data given as Python objects (the direct publisher's) was
    stored altered, in silence. (A parsed body never holds one: orjson refuses them.)"""
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidInput(f"{field}: {value} has no JSON form", field=field)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)


def event_from_json(item: Any, max_event_bytes: int) -> NewEvent:
    """One ``{"data": ..., "event"?: ..., "retry"?: ...}`` object of a JSON publish."""
    if type(item) is dict and len(item) == 1 and "data" in item:
        # The usual event, data alone (every token of a stream): no other member to
        # check (about 0.7 us of the 2-3 each line of an ingest paid here).
        data = _compact_json(item["data"])
        check_size(data, max_event_bytes)
        return NewEvent(data, c.KIND_JSON)
    if not isinstance(item, dict):
        raise InvalidInput("each event must be a JSON object with a 'data' member")
    if "data" not in item:
        raise InvalidInput("an event needs a 'data' member", field="data")
    unknown = set(item) - {"data", "event", "retry"}
    if unknown:
        raise InvalidInput(f"unknown member(s): {', '.join(sorted(unknown))}")
    data = _compact_json(item["data"])
    event = check_event_type(item.get("event"))
    check_size(data, max_event_bytes, event)
    return NewEvent(data=data, kind=c.KIND_JSON, event=event, retry=check_retry(item.get("retry")))


def events_from_json(document: Any, *, max_event_bytes: int, max_batch: int) -> list[NewEvent]:
    """A JSON publish body: one event object, or a non-empty array of them (a batch)."""
    if isinstance(document, list):
        if not document:
            raise InvalidInput("a batch must hold at least one event")
        if len(document) > max_batch:
            raise TooLarge(f"a batch holds at most {max_batch} events", limit=max_batch)
        return [event_from_json(item, max_event_bytes) for item in document]
    return [event_from_json(document, max_event_bytes)]


def event_from_text(text: str, event: str | None, max_event_bytes: int) -> NewEvent:
    """A ``text/plain`` publish: the body is the data."""
    kind = check_event_type(event)
    check_size(text, max_event_bytes, kind)
    return NewEvent(data=text, kind=c.KIND_TEXT, event=kind)
