"""launch/mpi_ray.py under a real mpiexec: Ray started by the wrapper, the controller joining it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, events, of_kind, wait_gone

pytestmark = [pytest.mark.processes, pytest.mark.timeout(300)]

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed (pip install mpich)")
def test_mpiexec_brings_up_ray_and_runs_the_job(tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", _free_port()
    result = subprocess.run(
        [MPIEXEC, "-n", "1", sys.executable, "launch/mpi_ray.py", "--port", str(port), "--loopback", "--",
         "launch", "cluster_configs/local.yaml", "--run-dir", str(run_dir), "--set", "train.steps=6", "--set", "metrics.port=0"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evs = events(run_dir)
    assert of_kind(evs, "run_started")[0]["config"]["cluster"]["ray_address"] == f"127.0.0.1:{port}"
    assert evs[-1]["event"] == "run_finished" and evs[-1]["status"] == "succeeded"
    assert wait_gone([w["pid"] for w in of_kind(evs, "worker_started")]) == []
    # The wrapper stopped the Ray it started: nothing listens on its port any more.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_unreachable_cluster_is_one_clear_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "launch", "cluster_configs/local.yaml", "--run-dir", str(run_dir),
         "--set", f"cluster.ray_address=127.0.0.1:{_free_port()}", "--set", "metrics.port=0"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 1
    assert "cannot connect to the Ray cluster at cluster.ray_address" in result.stderr
    assert "Traceback" not in result.stderr
    last = events(run_dir)[-1]
    assert (last["event"], last["reason"]) == ("run_finished", "cluster_error")
