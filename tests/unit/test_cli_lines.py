"""``broker publish --lines``: stdin's lines as events, and the rerun a failure names."""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Any

import pytest

from brokerclient.cli import add_client_commands
from brokerclient.cli_lines import BadLine, StdinLines, _tell_rerun, keepalive_for
from brokerclient.errors import Unreachable


def events(
    stdin: bytes, *, text: bool = False, event: str | None = None
) -> tuple[StdinLines, list[dict[str, Any]]]:
    """The lines read whole, and the events they gave."""
    lines = StdinLines(io.BytesIO(stdin), text=text, event=event)
    return lines, list(lines)


def test_json_lines_skip_blank_ones_and_remember_their_stdin_line() -> None:
    lines, taken = events(b'1\n\n \t\r\n{"a": [2]}\r\n"x"', event="tok")
    assert taken == [
        {"data": 1, "event": "tok"}, {"data": {"a": [2]}, "event": "tok"},
        {"data": "x", "event": "tok"},
    ]  # fmt: skip
    assert lines.event_lines == [1, 4, 5]
    assert [lines.line_of_event(n) for n in (0, 1, 2, 3)] == [0, 1, 4, 5]


def test_text_lines_keep_blank_ones_less_their_line_ending() -> None:
    lines, taken = events(b"a\r\n\n\r\n b\r c\n{x}", text=True)
    assert [e["data"] for e in taken] == ["a", "", "", " b\r c", "{x}"]
    assert lines.event_lines == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("stdin", "text", "said"),
    [(b"1\nnope\n", False, "is not JSON"), (b"a\n\xff\n", True, "is not UTF-8")],
)
def test_a_bad_line_raises_at_its_stdin_line(stdin: bytes, text: bool, said: str) -> None:
    lines = StdinLines(io.BytesIO(stdin), text=text, event=None)
    taken = iter(lines)
    next(taken)
    with pytest.raises(BadLine, match=said):
        next(taken)
    assert lines.line_number == 2 and lines.event_lines == [1]


def test_a_rerun_after_parts_names_stdins_line_after_the_last_event_kept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A stream gone on after its event 2 (under K+2): stdin's lines after event 2's
    line, blank lines counted, never the whole input again."""
    lines, _ = events(b"1\n\n\n2\n3\n")
    _tell_rerun("K+2", Unreachable("down", idempotency_key="K+2", after_line=2), lines)
    said = capsys.readouterr().err
    assert "after line 4 (tail -n +5) under --idempotency-key K+2" in said, said
    assert "never the whole input again" in said
    _tell_rerun("my key", None, lines)
    assert "same input again under --idempotency-key 'my key'" in capsys.readouterr().err


def test_the_keepalive_is_off_for_a_file_on_disk_only(tmp_path: Path) -> None:
    """A file never goes silent: read without the keep-alive's reader thread. A pipe
    (a generator's output) or a stdin with no file keeps the keep-alive asked for."""
    path = tmp_path / "lines.ndjson"
    path.write_bytes(b"1\n")
    with path.open("rb") as on_disk:
        assert keepalive_for(10.0, on_disk) == 0
    read_end, write_end = os.pipe()
    try:
        with open(read_end, "rb") as piped:
            assert keepalive_for(10.0, piped) == 10.0
    finally:
        os.close(write_end)
    assert keepalive_for(10.0, io.BytesIO(b"1\n")) == 10.0


def test_keepalive_without_lines_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``--keepalive`` keeps a silent ``--lines`` stream open; given to a single publish
    it was taken and did nothing (a user believed it set)."""
    parser = argparse.ArgumentParser()
    add_client_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["publish", "t", "1", "--keepalive", "5", "--url", "http://b.test"])
    assert args.run_client(args) == 2
    assert "--keepalive goes with --lines" in capsys.readouterr().err
