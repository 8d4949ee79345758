"""The append script's commands in Redis' protocol (RESP), packed by hand.

``hiredis.pack_command`` formats every argument's ``$<length>\\r\\n`` with C's
``sprintf``: for an append (EVALSHA, its SHA, six keys, nine arguments and four per
event) that was 30,000 instructions, a sixth of all the broker's user-space work for
an ingest line (callgrind). Most of those arguments repeat from one append to the
next: a topic's keys for every append to it, its retention figures, the flags, an
event's kind, an empty type or retry. So the head up to the keys is packed once per
topic, each small argument once per process, and only what is new (the epoch, the
data) is packed here; the bytes are the same as hiredis'
(``tests/unit/test_redis_packing.py`` compares them).

The live reader's XREADs are joined from pieces packed here too (``broker/redis_live.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import hiredis

from broker import constants as c

HEADS_KEPT = 8192
"""Topics whose packed head is kept (about 300 bytes each: 2.4 MB at most a process);
past that the oldest inserted goes. Set above the topics one process writes to at once
(the sessions bench runs 500; the 1024 it was, a busier instance passes): past that
nearly every append packs its head again. First in, first out, not least used: the two
miss alike while the topics fit, least-used more past that (1500 topics at once, 1024
kept: 181,000 against 372,000 misses in 450,000 appends; bench/PERFORMANCE.md, "What
makes it fast"), and moving a head at each use would cost every append."""
INTEGERS_KEPT = 4096
"""Integer arguments kept packed (retention figures, flags, counts: few values); past
that, the others are packed each time. Strings are not kept (an epoch, a line number,
data: new each time), but for a few that recur."""
RECURRING = ("", c.KIND_JSON, c.KIND_TEXT)


class CommandPacker:
    """``pack(("EVALSHA", sha, numkeys, *keys, *args))``: what ``hiredis.pack_command``
    makes of it, from the heads and arguments packed before. The append's arguments
    are strs and ints; any other argument is packed by hiredis, as before.

    But for one: arguments are looked up by equal value (their type looked up first
    would cost every append), so a float equal to a kept int comes out as that int
    (``3.0`` as ``3``; a bool as ``1``/``0``, which hiredis refuses). Harmless for the
    append script, the one packed here: what the store may pass as a float
    (``idempotency_seconds``: typed int, not checked) it reads with ``tonumber``, and
    the two arguments it compares as text (``ARGV[7]``, ``ARGV[8]``) are built by
    ``int()`` (tests/unit/test_redis_packing.py, tests/integration/test_append_pipeline.py)."""

    __slots__ = ("_arguments", "_heads")

    def __init__(self) -> None:
        self._heads: dict[tuple[str | int, str | int, int, str | int], bytes] = {}
        self._arguments: dict[str | int, bytes] = {}
        for text in RECURRING:
            self._arguments[text] = _packed(text)

    def pack(self, command: Sequence[str | int]) -> bytes:
        count = command[2]
        assert type(count) is int  # (the number of keys)
        end = 3 + count
        key = (command[0], command[1], count, command[3] if count else "")
        head = self._heads.get(key)
        if head is None:
            head = self._head(key, command[:end])
        size = len(command)
        parts = [_COUNTS[size] if size < LENGTHS_KEPT else b"*%d\r\n" % size, head]
        append, known = parts.append, self._arguments
        for argument in command[end:]:
            packed = known.get(argument)
            if packed is not None:
                append(packed)
            elif isinstance(argument, str):  # (inline: an epoch, the data)
                raw = argument.encode()
                size = len(raw)
                append(_LENGTHS[size] if size < LENGTHS_KEPT else b"$%d\r\n" % size)
                append(raw)
                append(b"\r\n")
            else:
                append(self._integer(argument))
        return b"".join(parts)

    def _head(
        self, key: tuple[str | int, str | int, int, str | int], head: Sequence[str | int]
    ) -> bytes:
        """The command up to its last key, packed without the array's count (which
        counts the arguments too). The command, its script, its number of keys and first key
        stand for the others: the append's keys are all its topic's
        (``constants.topic_keys``)."""
        packed = packed_without_count(head)
        if len(self._heads) >= HEADS_KEPT:
            del self._heads[next(iter(self._heads))]
        self._heads[key] = packed
        return packed

    def _integer(self, argument: int) -> bytes:
        """``argument`` packed, and kept if it is an int. Anything else (a float, bytes:
        none of the append's) is hiredis' to pack: ``%d`` made 1.5 into ``1``, in silence."""
        if type(argument) is not int:
            return _packed_by_hiredis(argument)
        packed = _packed(argument)
        if len(self._arguments) < INTEGERS_KEPT:
            self._arguments[argument] = packed
        return packed


def _packed_by_hiredis(argument: object) -> bytes:
    return packed_without_count((argument,))


def packed_without_count(arguments: Sequence[object]) -> bytes:
    """What ``hiredis.pack_command`` makes of ``arguments``, less the array's count
    (``*<n>\\r\\n``): a command's head, to which other packed arguments are joined."""
    whole: bytes = hiredis.pack_command(cast(Any, tuple(arguments)))
    return whole[whole.index(b"\r\n") + 2 :]


def packed_bytes(raw: bytes) -> bytes:
    """One argument already in bytes, as a RESP bulk string: ``$<length>\\r\\n<raw>\\r\\n``
    (joined: a third cheaper than a %-format, and one runs per topic a live read moved)."""
    size = len(raw)
    return (_LENGTHS[size] if size < LENGTHS_KEPT else b"$%d\r\n" % size) + raw + b"\r\n"


def packed_stream_id(position: tuple[int, int]) -> bytes:
    """A stream id argument, ``<ms>-<seq>``, as ``format_stream_id`` writes it, packed."""
    return packed_bytes(b"%d-%d" % position)


def array_count(size: int) -> bytes:
    """The head of a command of ``size`` arguments: ``*<size>\\r\\n``."""
    return _COUNTS[size] if size < LENGTHS_KEPT else b"*%d\r\n" % size


def _packed(argument: str | int) -> bytes:
    raw = argument.encode() if isinstance(argument, str) else b"%d" % argument
    return b"$%d\r\n%b\r\n" % (len(raw), raw)


LENGTHS_KEPT = 512
_LENGTHS = [b"$%d\r\n" % size for size in range(LENGTHS_KEPT)]
_COUNTS = [b"*%d\r\n" % size for size in range(LENGTHS_KEPT)]
