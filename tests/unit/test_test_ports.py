"""``tests.support.redis_server.free_port`` under ``TEST_PORT_RANGE``, in real
pytest-xdist workers (a dev dependency: ``pytest -n 2``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Each worker's test writes the port it was handed, to a file named after the worker.
HANDS_OUT_A_PORT = """
import os
from pathlib import Path
from tests.support.redis_server import free_port

def test_hand_out_a_port() -> None:
    out = Path(os.environ["PORTS_OUT"]) / os.environ.get("PYTEST_XDIST_WORKER", "main")
    out.write_text(str(free_port()))
"""


@pytest.mark.timeout(60)
def test_two_xdist_workers_are_never_handed_the_same_port(tmp_path: Path) -> None:
    """Each worker is a process of its own, with its own record of the ports handed
    out: scanning one range from its first port, both were handed the same one (their
    servers, started a moment later, collided: one failed to start, or a test talked
    to the other's)."""
    (tmp_path / "test_hands_out.py").write_text(HANDS_OUT_A_PORT)
    out = tmp_path / "ports"
    out.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PORTS_OUT": str(out),
        "TEST_PORT_RANGE": os.environ.get("TEST_PORT_RANGE", "49150-49159"),
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
         "--dist", "each", "--rootdir", str(tmp_path), str(tmp_path)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    ports = {path.name: int(path.read_text()) for path in out.iterdir()}
    assert sorted(ports) == ["gw0", "gw1"], ports
    assert ports["gw0"] != ports["gw1"], ports
