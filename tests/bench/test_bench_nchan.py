"""A short run of the harness against Nchan (nginx + libnginx-mod-nchan) beside the broker:
the three-way table has Nchan's figure and broker / Nchan on every row Nchan can measure.
It asserts no timings, only that each scenario measured something and that Nchan's resume
(the storm, by Last-Event-ID), fan-outs and sessions (one POST per token, a drop and a
resume) delivered everything. Needs nginx and the module: e2e."""

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
RUN_TIMEOUT_S = 110

pytestmark = pytest.mark.e2e
# What Nchan is driven with (publish and subscribe; churn closes topics).
NCHAN_SCENARIOS = (
    "fanout", "broadcast", "publish-single", "publish-batch", "idle", "storm", "sessions",
)  # fmt: skip


def test_quick_run_against_nchan_gives_a_ratio_on_every_row(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    command = [sys.executable, "-m", "bench", "--quick", *SMALLER_THAN_QUICK, "--skip-baseline"]
    command += ["--json", str(output)]
    for scenario in NCHAN_SCENARIOS:
        command += ["--only", scenario]
    run = run_whole(command, cwd=REPO, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads(output.read_text())
    assert document["errors"] == []
    assert set(NCHAN_SCENARIOS) == {row["scenario"] for row in document["table"]}
    for row in document["table"]:
        # Nchan has no ingest, direct publisher or close: those sessions rows are the broker's.
        for column in ("broker", "nchan") if row["nchan_measured"] else ("broker",):
            value = row[column]
            assert isinstance(value, int | float) and math.isfinite(value), (row, column)
        if not row["nchan_measured"]:
            assert row["nchan"] is None and row["broker_over_nchan"] is None, row
        elif row["nchan"] > 0 and row["broker"] >= 0:
            assert row["broker_over_nchan"] == pytest.approx(row["broker"] / row["nchan"]), row
    nchan = document["results"]["nchan"]
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
