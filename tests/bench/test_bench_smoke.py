"""A short run of the load harness, so that it does not rot. It asserts no timings."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.bench.smaller import SMALLER_THAN_QUICK
from tests.support.procs import run_whole

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 160


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)  # (the suite's 120 s cut it before its own bound)
def test_quick_bench_run_reports_every_figure_as_a_number(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    command = [sys.executable, "-m", "bench", "--quick", *SMALLER_THAN_QUICK, "--skip-nchan"]
    command += ["--json", str(output)]
    run = run_whole(command, cwd=REPO, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads(output.read_text())
    assert document["errors"] == []
    assert {row["scenario"] for row in document["table"]} == {
        "fanout", "broadcast", "publish-single", "publish-batch", "idle", "storm",
        "sessions", "churn",
    }  # fmt: skip
    for row in document["table"]:
        measured_by = ("broker", "baseline") if row["baseline_measured"] else ("broker",)
        for target in measured_by:
            value = row[target]
            assert isinstance(value, int | float), (row["figure"], target, value)
            assert math.isfinite(value), (row["figure"], target, value)
    assert "figure" in run.stdout and "broker vs baseline" in run.stdout
    _assert_short_lived_topics_checked(document)


def _assert_short_lived_topics_checked(document: dict[str, Any]) -> None:
    """The sessions and churn checks counted something: every session was checked
    (tokens in order and the end), the topics expired, churn events arrived."""
    sessions = document["results"]["broker"]["sessions"]
    for mode in ("post", "ingest", "direct"):
        details = sessions["details"][mode]
        assert details["sessions"] > 0 and details["tokens_published"] > 0, details
        assert details["ended"] == details["sessions"], details
        assert details["dropped_and_resumed"] > 0, details
        # Redis' time per token by command: every token went through the append script.
        assert details["redis_us_per_token_by_command"].get("evalsha", 0) > 0, details
    assert sessions["details"]["redis_after_ttl"]["keys_before"] > 0
    churn = document["results"]["broker"]["churn"]["details"]
    assert churn["sent_in_window"] > 0 and churn["received_in_window"] > 0, churn
    assert "churn" not in document["results"]["baseline"]


def test_quick_auth_comparison_reports_auth_on_and_off(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    command = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--auth",
        "--skip-baseline",
        "--skip-nchan",
    ]
    command += ["--only", "publish-single", "--json", str(output)]
    run = run_whole(command, cwd=REPO, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads(output.read_text())
    assert document["errors"] == []
    rows = {row["figure"]: row for row in document["auth_table"]}
    assert set(rows) == {"publish single: events/s", "publish single: server CPU us/event"}
    for row in rows.values():
        assert row["auth_off"] > 0 and row["auth_on"] > 0, row
    assert "auth on (HS256)" in run.stdout


def test_quick_floor_is_measured_beside_the_broker_on_publishes_only(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    command = [sys.executable, "-m", "bench", "--quick", "--floor", "--skip-baseline"]
    command += ["--skip-nchan", "--only", "publish-single", "--only", "publish-batch"]
    command += ["--json", str(output)]
    run = run_whole(command, cwd=REPO, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads(output.read_text())
    assert document["errors"] == []
    floor = document["results"]["floor"]
    assert set(floor) == {"publish-single"}, floor  # the floor only publishes
    figures = floor["publish-single"]["figures"]
    assert figures["events_per_s"] > 0 and figures["server_cpu_us_per_event"] > 0, figures
    assert "floor" in run.stdout and "us/publish" in run.stdout, run.stdout
