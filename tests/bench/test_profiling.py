"""`--profile`'s summary of py-spy's collapsed stacks."""

from __future__ import annotations

from pathlib import Path

from bench.profiling import hottest


def test_threads_that_only_wait_are_not_counted_as_hot(tmp_path: Path) -> None:
    collapsed = tmp_path / "worker.txt"
    collapsed.write_text(
        "run (a.py:1);write (api/lean_stream.py:155) 30\n"
        "run (a.py:1);frame (broker/model.py:87) 10\n"
        "_bootstrap (threading.py:1);_watch_parent.<locals>.watch (api/workers.py:135) 50\n"
        "_bootstrap (threading.py:1);always_pong (uvicorn/supervisors.py:9) 50\n"
    )
    assert hottest(collapsed) == [
        " 75.0% write (api/lean_stream.py:155)",
        " 25.0% frame (broker/model.py:87)",
    ]
