"""A short run of the harness against Nchan (nginx + libnginx-mod-nchan) beside the broker:
the three-way table has Nchan's figure and broker / Nchan on every row. It asserts no
timings, only that each scenario measured something and that Nchan's resume (the storm,
by Last-Event-ID) and fan-outs delivered everything. Needs nginx and the module: e2e."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 110

pytestmark = pytest.mark.e2e
# What Nchan is driven with (publish and subscribe; sessions and churn close topics).
NCHAN_SCENARIOS = ("fanout", "broadcast", "publish-single", "publish-batch", "idle", "storm")


def test_quick_run_against_nchan_gives_a_ratio_on_every_row(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    command = [sys.executable, "-m", "bench", "--quick", "--skip-baseline", "--json", str(output)]
    for scenario in NCHAN_SCENARIOS:
        command += ["--only", scenario]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads(output.read_text())
    assert document["errors"] == []
    assert set(NCHAN_SCENARIOS) == {row["scenario"] for row in document["table"]}
    for row in document["table"]:
        for column in ("broker", "nchan"):
            value = row[column]
            assert isinstance(value, int | float) and math.isfinite(value), (row, column)
        if row["nchan"] > 0 and row["broker"] >= 0:
            assert row["broker_over_nchan"] == pytest.approx(row["broker"] / row["nchan"]), row
    nchan = document["results"]["nchan"]
    assert nchan["storm"]["figures"]["caught_up_pct"] == 100.0, nchan["storm"]
    for scenario in ("fanout", "broadcast"):
        assert nchan[scenario]["figures"]["delivered_pct"] == 100.0, nchan[scenario]
    assert "broker / nchan" in run.stdout
