from __future__ import annotations

import pytest

from broker.framing import (
    HEARTBEAT,
    beat_event,
    comment,
    data_lines,
    event_body,
    id_line,
    retry_hint,
)
from tests.support.sse import parse_sse


def parse_sse_data(frame: bytes) -> str:
    """What a browser's EventSource gives back as event.data for one frame."""
    [event] = parse_sse(frame.decode())
    return event["data"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("a\nb", "a\nb"),
        ("a\r\nb", "a\nb"),
        ("a\rb", "a\nb"),
        ("a\n\nb\n", "a\n\nb\n"),
        ("", ""),
        (" leading space", " leading space"),
        ("data: nested", "data: nested"),
    ],
)
def test_line_breaks_split_into_data_lines(text: str, expected: str) -> None:
    frame = data_lines(text.encode())
    assert b"\r" not in frame
    assert parse_sse_data(frame) == expected


def test_event_body_has_type_retry_data_and_blank_line() -> None:
    body = event_body(b'{"a":1}', b"update", b"500")
    assert body == b'event: update\nretry: 500\ndata: {"a":1}\n\n'


def test_event_body_without_type_lets_the_browser_fire_message() -> None:
    assert event_body(b"x") == b"data: x\n\n"


def test_id_retry_and_comments() -> None:
    assert id_line("abcdefgh.1-0") == b"id: abcdefgh.1-0\n"
    assert retry_hint(2000) == b"retry: 2000\n\n"
    assert comment() == HEARTBEAT == b":\n\n"
    assert comment("hi") == b": hi\n\n"


@pytest.mark.parametrize(("seconds", "data"), [(15.0, b"15"), (1, b"1"), (0.5, b"0.5")])
def test_a_beat_event_says_the_interval_and_has_no_id(seconds: float, data: bytes) -> None:
    """``?heartbeat=event``'s beat: a ``broker.beat`` a script sees, its data the interval
    as a JSON number; no id line, so EventSource's Last-Event-ID stays as it was."""
    beat = beat_event(seconds)
    assert beat == b"event: broker.beat\ndata: " + data + b"\n\n"
    [event] = parse_sse(beat.decode())
    assert event == {"event": "broker.beat", "data": data.decode()}  # (no "id")
    assert float(event["data"]) == seconds
