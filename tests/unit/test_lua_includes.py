"""A Lua script kept in parts (``--#include``) is read whole, or not at all: Redis gets
one script with every part in place, and an include that cannot be honoured fails at
registration instead of reaching Redis as a comment, its part's code unsent."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from broker import redis_scripts
from broker.redis_scripts import StoreScripts, assembled


def _reader(files: dict[str, str]) -> Callable[[str], str]:
    def read(name: str) -> str:
        if name not in files:
            raise FileNotFoundError(name)
        return files[name]

    return read


def test_an_include_is_replaced_by_the_text_of_the_file_it_names() -> None:
    read = _reader(
        {
            "main.lua": "local a = 1\n--#include part.lua\nreturn {a, b}\n",
            "part.lua": "-- header\nlocal b = a + 1",  # (no newline at its end)
        }
    )
    assert assembled("main.lua", read) == "local a = 1\n-- header\nlocal b = a + 1\nreturn {a, b}\n"


def test_a_script_without_includes_is_its_file_unchanged() -> None:
    text = "local a = 1\r\n-- #include is not this\nreturn a"
    assert assembled("main.lua", _reader({"main.lua": text})) == text


def test_a_missing_include_fails_loudly() -> None:
    read = _reader({"main.lua": "local a = 1\n--#include gone.lua\nreturn a\n"})
    with pytest.raises(FileNotFoundError, match=r"main\.lua: '--#include gone\.lua'"):
        assembled("main.lua", read)


@pytest.mark.parametrize(
    "line",
    [
        "  --#include part.lua",  # (in a block: its locals would not be the script's)
        "local x = 1 --#include part.lua",
        "--#include  ",
    ],
)
def test_an_include_not_a_line_of_its_own_at_the_top_level_fails_loudly(line: str) -> None:
    read = _reader({"main.lua": f"if true then\n{line}\nend\n", "part.lua": "local b = 2\n"})
    with pytest.raises(ValueError, match="a line of its own"):
        assembled("main.lua", read)


def test_an_include_in_an_included_file_fails_loudly() -> None:
    read = _reader(
        {
            "main.lua": "--#include part.lua\n",
            "part.lua": "--#include deeper.lua\n",
            "deeper.lua": "local c = 3\n",
        }
    )
    with pytest.raises(ValueError, match="one level only"):
        assembled("main.lua", read)


@pytest.mark.parametrize("script", [f.name for f in dataclasses.fields(StoreScripts)])
def test_each_registered_script_reaches_redis_with_no_include_left(script: str) -> None:
    text = redis_scripts._lua(f"{script}.lua")
    assert "--#include" not in text
    for line in redis_scripts._lua_file(f"{script}.lua").splitlines():
        if line.startswith(redis_scripts.INCLUDE):
            assert redis_scripts._lua_file(line[len(redis_scripts.INCLUDE) :]) in text
