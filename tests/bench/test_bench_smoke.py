"""Short runs of the load harness, so that it does not rot. They assert no timings.

One run (the module's ``quick_run``) measures every scenario on the broker and the
baseline, the floor beside them, and Nchan (nginx + libnginx-mod-nchan) when the Nchan
test is selected; each test asserts on its part of that run's report. One run, not three,
as every target of a scenario starts its own redis-server and server: the broker's runs
were measured three times over (about 45 s of the suite's slowest file). The Nchan test
needs nginx and the module (e2e): deselected, as in `make test-fast`, the run leaves Nchan
out, so the rest needs only Python and redis-server."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.bench.smaller import SMALLER_THAN_QUICK
from tests.support.procs import run_whole

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240  # the shared run: the broker's, the baseline's and Nchan's scenarios
AUTH_RUN_TIMEOUT_S = 160
NCHAN_TEST = "test_quick_run_against_nchan_gives_a_ratio_on_every_row"
# What Nchan is driven with (publish and subscribe; churn closes topics).
NCHAN_SCENARIOS = (
    "fanout", "broadcast", "publish-single", "publish-batch", "idle", "storm", "sessions",
)  # fmt: skip

# (the suite's 120 s cut the shared run, made in the first test's setup, before its own bound)
pytestmark = pytest.mark.timeout(RUN_TIMEOUT_S + 30)


@dataclass(frozen=True)
class QuickRun:
    run: subprocess.CompletedProcess[str]
    document: dict[str, Any]
    with_nchan: bool


@pytest.fixture(scope="module")
def quick_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """`python -m bench --quick` below its sizes, with the floor, and with Nchan when its
    test runs in this session."""
    with_nchan = any(item.name == NCHAN_TEST for item in request.session.items)
    output = tmp_path_factory.mktemp("bench") / "bench.json"
    command = [sys.executable, "-m", "bench", "--quick", *SMALLER_THAN_QUICK, "--floor"]
    command += [] if with_nchan else ["--skip-nchan"]
    command += ["--json", str(output)]
    run = run_whole(command, cwd=REPO, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    return QuickRun(run, json.loads(output.read_text()), with_nchan)


def test_quick_bench_run_reports_every_figure_as_a_number(quick_run: QuickRun) -> None:
    run, document = quick_run.run, quick_run.document
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


def test_quick_floor_is_measured_beside_the_broker_on_publishes_only(quick_run: QuickRun) -> None:
    run, document = quick_run.run, quick_run.document
    assert document["errors"] == []
    floor = document["results"]["floor"]
    assert set(floor) == {"publish-single"}, floor  # the floor only publishes
    figures = floor["publish-single"]["figures"]
    assert figures["events_per_s"] > 0 and figures["server_cpu_us_per_event"] > 0, figures
    assert "floor" in run.stdout and "us/publish" in run.stdout, run.stdout


@pytest.mark.e2e
def test_quick_run_against_nchan_gives_a_ratio_on_every_row(quick_run: QuickRun) -> None:
    """The three-way table has Nchan's figure and broker / Nchan on every row Nchan can
    measure; Nchan's resume (the storm, by Last-Event-ID), fan-outs and sessions (one POST
    per token, a drop and a resume) delivered everything."""
    run, document = quick_run.run, quick_run.document
    assert quick_run.with_nchan
    assert document["errors"] == []
    nchan_rows = [row for row in document["table"] if row["nchan_measured"]]
    assert set(NCHAN_SCENARIOS) == {row["scenario"] for row in nchan_rows}
    for row in document["table"]:
        # Nchan has no ingest, direct publisher or close: those rows (churn's all) are the broker's.
        for column in ("broker", "nchan") if row["nchan_measured"] else ("broker",):
            value = row[column]
            assert isinstance(value, int | float) and math.isfinite(value), (row, column)
        if not row["nchan_measured"]:
            assert row["nchan"] is None and row["broker_over_nchan"] is None, row
        elif row["nchan"] > 0 and row["broker"] >= 0:
            assert row["broker_over_nchan"] == pytest.approx(row["broker"] / row["nchan"]), row
    nchan = document["results"]["nchan"]
    assert set(nchan) == set(NCHAN_SCENARIOS), set(nchan)
    assert nchan["storm"]["figures"]["caught_up_pct"] == 100.0, nchan["storm"]
    for scenario in ("fanout", "broadcast"):
        assert nchan[scenario]["figures"]["delivered_pct"] == 100.0, nchan[scenario]
    _assert_sessions_exact(nchan["sessions"])
    assert "broker / nchan" in run.stdout


def _assert_sessions_exact(sessions: dict[str, Any]) -> None:
    """Every Nchan session had its tokens once, in order, across a drop and a resume."""
    assert sessions["figures"]["exact_pct_post"] == 100.0, sessions["details"]["post"]
    post = sessions["details"]["post"]
    assert post["sessions"] > 0 and post["dropped_and_resumed"] > 0, post
    assert post["tokens_received"] == post["tokens_published"] > 0, post
    assert not {"ingest", "direct"} & sessions["details"].keys(), sessions["details"]


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
    run = run_whole(command, cwd=REPO, timeout=AUTH_RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads(output.read_text())
    assert document["errors"] == []
    rows = {row["figure"]: row for row in document["auth_table"]}
    assert set(rows) == {"publish single: events/s", "publish single: server CPU us/event"}
    for row in rows.values():
        assert row["auth_off"] > 0 and row["auth_on"] > 0, row
    assert "auth on (HS256)" in run.stdout
    # (a two-way table, without the baseline or Nchan: the other table's rendering)
    assert "figure" in run.stdout and "broker / nchan" not in run.stdout
