"""The append commands packed by hand are byte for byte what hiredis packs."""

from __future__ import annotations

import random
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
    # The same script name, key count and first key under another command, and the same
    # first key with fewer keys: neither may take a head kept for another.
    ("EVAL", SHA, 6, *c.topic_keys("t"), "x"),
    ("EVALSHA", SHA, 1, c.topic_keys("t")[0], "x"),
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


_STRINGS = ["", "j", "t", "0", "1", "-1", "é", "日本語", "\r\n", "\0", "x" * 600, "y" * 70_000]
_NUMBERS = [0, 1, -1, 511, 512, 4095, 2**31, 2**63, -(2**70)]


def _argument(rng: random.Random) -> str | int | float | bytes:
    pick = rng.random()
    if pick < 0.4:
        return rng.choice(_STRINGS)
    if pick < 0.8:
        return rng.choice([*_NUMBERS, rng.randint(-(10**6), 10**6)])
    if pick < 0.9:
        return rng.choice([0.5, -2.25, 1e300, 1.5e-7])  # (3.0 would come out as a kept 3)
    return rng.choice([b"", b"j", b"\xff\x00", b"1"])


def test_generated_commands_are_packed_as_hiredis_packs_them() -> None:
    """Every type hiredis packs (the append's are strs and ints, but an embedding's
    DirectPublisher may be given a float: 1.5 was packed as 1), over heads and
    arguments kept, new and evicted."""
    rng = random.Random(64)
    packer = CommandPacker()
    for _ in range(3000):
        topic = f"topic.{rng.randrange(HEADS_KEPT + 40)}"
        arguments = [_argument(rng) for _ in range(rng.randint(0, 12))]
        command = _append(topic, *arguments)  # type: ignore[arg-type]
        assert packer.pack(command) == _hiredis(command), command


def test_a_float_equal_to_a_kept_int_is_packed_as_that_int() -> None:
    """The one way the packer's bytes differ from hiredis': looked up by equal value, a
    float equal to a kept int comes out as the int (hiredis sends ``3600.0``). Harmless:
    the append script reads such an argument with ``tonumber`` (see CommandPacker, and
    tests/integration/test_append_pipeline.py for what Redis makes of both)."""
    packer = CommandPacker()
    fresh = _append("t", 3600.0)  # type: ignore[arg-type]
    assert packer.pack(fresh) == _hiredis(fresh)  # (no int kept yet: hiredis packs it)
    packer.pack(_append("t", 3600))
    assert packer.pack(fresh) == _hiredis(_append("t", 3600)) != _hiredis(fresh)
