from __future__ import annotations

import os

import pytest

from broker.errors import InvalidEventId
from broker.ids import (
    ORIGIN,
    EventId,
    format_cursor,
    new_epoch,
    parse_cursor,
    parse_last_event_id,
    parse_stream_id,
)


def test_event_id_round_trips() -> None:
    event_id = EventId("abcdefgh", (1700000000000, 7))
    assert str(event_id) == "abcdefgh.1700000000000-7"
    assert EventId.parse(str(event_id)) == event_id


def test_epochs_are_random_and_well_formed() -> None:
    epochs = {new_epoch() for _ in range(2000)}  # several draws of the buffer
    assert len(epochs) == 2000
    for epoch in epochs:
        assert EventId.parse(f"{epoch}.1-0").epoch == epoch
        assert epoch != ORIGIN.epoch


def test_epochs_draw_on_the_whole_base32_alphabet() -> None:
    """Each character is one of 32, all of them used: 8 characters carry 40 bits. (16,000
    characters drawn: one of the 32 left out by chance is some 32 * (31/32)**16000.)"""
    characters = "".join(new_epoch() for _ in range(2000))
    assert set(characters) == set("abcdefghijklmnopqrstuvwxyz234567")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1-0",
        "abcdefgh.1",
        "abcdefgh.-1-0",
        "ABCDEFGH.1-0",
        "abcdefg1.1-0",  # 1 is not in the base32 alphabet
        "abcdefgh.1-0 ",
        "abcdefgh.1-0\n",
        "abcdefgh.99999999999999999999999-0",
        "abcdefgh.18446744073709551616-0",  # 2**64
        "x" * 5000,
    ],
)
def test_malformed_ids_are_refused(text: str) -> None:
    with pytest.raises(InvalidEventId):
        EventId.parse(text)


def test_ids_never_hold_forbidden_characters() -> None:
    text = str(EventId(new_epoch(), (2**64 - 1, 2**64 - 1)))
    assert not set(text) & set("\r\n\0 ,;")


def test_origin_is_an_id() -> None:
    assert EventId.parse("0.0-0") == ORIGIN
    assert ORIGIN.is_origin


def test_stream_ids_compare_as_redis_does() -> None:
    assert parse_stream_id(b"10-2") < parse_stream_id("10-10") < parse_stream_id("11-0")


def test_cursor_round_trips_in_topic_order() -> None:
    cursor = {"b.x": EventId("abcdefgh", (5, 1)), "a:y": ORIGIN}
    text = format_cursor(cursor)
    assert text == "a:y~0.0-0!b.x~abcdefgh.5-1"
    assert parse_cursor(text) == cursor
    assert parse_last_event_id(text) == cursor
    assert not set(text) & set("\r\n\0 ,;")


@pytest.mark.parametrize(
    "text", ["a~", "~abcdefgh.1-0", "a b~abcdefgh.1-0", "a~x!a~abcdefgh.1-0", "a~0.0-0!a~0.0-0"]
)
def test_malformed_cursors_are_refused(text: str) -> None:
    with pytest.raises(InvalidEventId):
        parse_last_event_id(text)


def test_plain_id_is_not_a_cursor() -> None:
    assert parse_last_event_id("abcdefgh.1-0") == EventId("abcdefgh", (1, 0))


def test_a_forked_child_does_not_offer_its_parents_next_epochs() -> None:
    """Epochs are drawn ahead; a child forked with some left in the buffer must draw
    its own, or a log it recreates could take an epoch the parent gives another."""
    new_epoch()  # the buffer now holds epochs drawn ahead
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        os.close(read)
        os.write(write, " ".join(new_epoch() for _ in range(5)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        childs = set(pipe.read().split())
    os.waitpid(child, 0)
    parents = {new_epoch() for _ in range(5)}
    assert len(childs) == 5 and not childs & parents
