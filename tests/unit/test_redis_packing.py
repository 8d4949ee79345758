"""The append commands packed by hand are byte for byte what hiredis packs."""

from __future__ import annotations

from typing import Any, cast

import hiredis
import pytest

from broker import constants as c
from broker.redis_packing import HEADS_KEPT, INTEGERS_KEPT, CommandPacker

SHA = "e0e1f9fabfc9d4800c877a703b823ac0578ff831"


def _append(topic: str, *args: str | int) -> tuple[str | int, ...]:
    keys = c.topic_keys(topic)
    return ("EVALSHA", SHA, len(keys), *keys, *args)


def _hiredis(command: tuple[str | int, ...]) -> bytes:
    packed: bytes = hiredis.pack_command(cast(Any, command))  # (its stub takes 1-tuples)
    return packed


COMMANDS = [
    _append("t", "abcdefgh", 100000, 1000, 0, 3600, 10000, 0, 0, 0, "j", '{"n":1}', "", ""),
    _append(
        "t", "zyxwvuts", 100000, 1000, 0, 3600, 10000, 1, 1, 3, "K", "1", "2", "j", "1", "e", "5"
    ),
    _append("other.topic", "abcdefgh", 5, 1, 60000, 1, 0, 0, 0, 0, "t", "", "", ""),
    _append(
        "é", "abcdefgh", 2**40, -1, 0, 0, 0, 0, 0, 1, "clé ünicode", "t", "日本語 \r\n\0", "x", ""
    ),
    _append("t", "abcdefgh", 1, 1, 1, 1, 1, 0, 0, 0, "j", "x" * 70_000, "", ""),
    ("EVALSHA", SHA, 0, "no", "keys"),
]


def test_each_command_is_packed_as_hiredis_packs_it() -> None:
    packer = CommandPacker()
    for _ in range(2):  # packed anew, then from what was kept
        for command in COMMANDS:
            assert packer.pack(command) == _hiredis(command), command


def test_what_is_kept_stays_bounded_and_right() -> None:
    packer = CommandPacker()
    for n in range(HEADS_KEPT + 50):
        command = _append(f"topic.{n}", "abcdefgh", n, n + INTEGERS_KEPT, 0, "", str(n))
        assert packer.pack(command) == _hiredis(command)
    assert len(packer._heads) == HEADS_KEPT
    assert len(packer._arguments) <= INTEGERS_KEPT + 3
    first = _append("topic.0", "abcdefgh", 0, "j", "")
    assert packer.pack(first) == _hiredis(first)  # (its head packed again)


@pytest.mark.parametrize("value", [0, 1, "1", "0", "j", ""])
def test_equal_values_of_other_types_pack_alike(value: str | int) -> None:
    packer = CommandPacker()
    packer.pack(_append("t", 1, "1", 0, "0"))
    command = _append("t", value)
    assert packer.pack(command) == _hiredis(command)
