from __future__ import annotations

from typing import Any

import pytest

from broker import validation
from broker.errors import InvalidInput, InvalidTopic, TooLarge
from broker.validation import (
    check_idempotency_key,
    check_topic,
    event_from_text,
    events_from_json,
    loads_exactly,
)


@pytest.mark.parametrize("name", ["a", "A-z_0.9:x", "x" * 200])
def test_good_topics(name: str) -> None:
    assert check_topic(name) == name


@pytest.mark.parametrize("name", ["", "x" * 201, "a b", "a/b", "é", "a{b}", "a\n", "a*"])
def test_bad_topics(name: str) -> None:
    with pytest.raises(InvalidTopic):
        check_topic(name)


def test_topics_checked_again_are_found_alike_and_those_kept_are_bounded() -> None:
    """(the names found valid are kept, for the check of every append)"""
    names = [f"kept-{n}" for n in range(validation.TOPICS_KEPT + 10)]
    for name in names + names:
        assert check_topic(name) == name
    assert len(validation._valid_topics) <= validation.TOPICS_KEPT
    for _ in range(2):
        with pytest.raises(InvalidTopic):
            check_topic("a b")


def parse(document: Any) -> Any:
    return events_from_json(document, max_event_bytes=100, max_batch=3)


@pytest.mark.parametrize(
    "document",
    [
        {},
        {"event": "x"},
        [],
        "text",
        5,
        None,
        [{"data": 1}, "x"],
        {"data": 1, "extra": 2},
        {"data": 1, "event": "a\nb"},
        {"data": 1, "event": "a\rb"},
        {"data": 1, "event": "a\0b"},
        {"data": 1, "event": "broker.gap"},
        {"data": 1, "event": ""},
        {"data": 1, "event": 5},
        {"data": 1, "retry": -1},
        {"data": 1, "retry": 1.5},
        {"data": 1, "retry": "5"},
        {"data": 1, "retry": True},
    ],
)
def test_bad_json_events(document: Any) -> None:
    with pytest.raises(InvalidInput):
        parse(document)


def test_limits_are_413() -> None:
    with pytest.raises(TooLarge):
        parse({"data": "x" * 200})
    with pytest.raises(TooLarge):
        parse([{"data": 1}] * 4)
    with pytest.raises(TooLarge):
        event_from_text("é" * 60, None, 100)  # 120 bytes in UTF-8


def test_json_events_keep_compact_json_and_optional_fields() -> None:
    events = parse([{"data": {"a": [1, 2]}}, {"data": "s", "event": "e", "retry": 0}])
    assert [(e.data, e.event, e.retry) for e in events] == [
        ('{"a":[1,2]}', None, None),
        ('"s"', "e", 0),
    ]


@pytest.mark.parametrize("key", ["", "x" * 201, "é", "a\nb", "tab\t"])
def test_bad_idempotency_keys(key: str) -> None:
    with pytest.raises(InvalidInput):
        check_idempotency_key(key)


def test_good_idempotency_key() -> None:
    assert check_idempotency_key("order 42 {retry}~!") == "order 42 {retry}~!"


@pytest.mark.parametrize(
    "number",
    [
        "9999999999999999999",  # 19 digits: all below 2**64, kept by orjson
        "18446744073709551615",  # 2**64 - 1
        "18446744073709551616",  # 2**64: orjson makes it a float
        "99999999999999999999999",
        "-9223372036854775808",  # -2**63
        "-9223372036854775809",  # -2**63 - 1: a float from orjson
        "-9999999999999999999",
    ],
)
def test_json_integers_are_read_exactly_at_every_width(number: str) -> None:
    document = loads_exactly(b'{"a": [1, %s], "s": "%s"}' % (number.encode(), number.encode()))
    assert document == {"a": [1, int(number)], "s": number}
    assert type(document["a"][1]) is int
