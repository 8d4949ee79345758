"""The store's Lua scripts (``broker/lua``), read from the package and registered on its
client: each runs by EVALSHA, its text at hand for when Redis has lost it (NOSCRIPT).

One script per step that must be atomic, each header saying why: ``append`` (an
append: idempotency, epoch, close, retention, TTL; a streaming ingest's line records
in ``ingest_lines.lua``, included), ``keep_lines`` (an open ingest's line records kept
answering), ``state`` and ``range`` (what a log says of itself, and a page of it, in
one read), ``delete``; and ``probe``, the rights tried at start.

A script may be kept in parts: a line ``--#include <file>`` is replaced by that file's
text as the script is read (``assembled``), so that Redis still runs one script, one
EVALSHA, its locals shared, while each part reads apart with its own header.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

INCLUDE = "--#include "


def _lua(name: str) -> str:
    return assembled(name, _lua_file)


def _lua_file(name: str) -> str:
    return resources.files("broker").joinpath("lua", name).read_text()


def assembled(name: str, read: Callable[[str], str]) -> str:
    """The script ``name`` (its text by ``read``) as Redis runs it: each of its lines
    ``--#include <file>`` replaced by that file's text. At the top level only (the
    line begins with it: an indented one is in a block, where locals would not be
    shared), one level deep; an include missing, indented or nested raises here, at
    registration, rather than reach Redis as a comment it runs past, the code unsent."""
    return "".join(
        _included(name, line, read) if "--#include" in line else line
        for line in read(name).splitlines(keepends=True)
    )


def _included(name: str, line: str, read: Callable[[str], str]) -> str:
    included = line[len(INCLUDE) :].strip()
    if not (line.startswith(INCLUDE) and included):
        raise ValueError(
            f"{name}: {line.strip()!r}: an include is a line of its own, unindented, naming a file"
        )
    try:
        text = read(included)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{name}: {line.strip()!r}: no such script in broker/lua") from e
    if "--#include" in text:
        raise ValueError(f"{name}: {included} includes another: one level only")
    return text if text.endswith("\n") else text + "\n"


@dataclass(frozen=True, slots=True)
class StoreScripts:
    """Each of ``broker/lua``'s scripts, registered on one client."""

    append: AsyncScript
    keep_lines: AsyncScript
    state: AsyncScript
    range: AsyncScript
    delete: AsyncScript
    probe: AsyncScript

    @classmethod
    def registered_on(cls, client: redis.Redis | RedisCluster) -> StoreScripts:
        def registered(name: str) -> AsyncScript:
            return client.register_script(_lua(f"{name}.lua"))

        return cls(
            append=registered("append"),
            keep_lines=registered("keep_lines"),
            state=registered("state"),
            range=registered("range"),
            delete=registered("delete"),
            probe=registered("probe"),
        )
