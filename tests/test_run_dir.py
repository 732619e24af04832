"""The run directory: one controller at a time."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, cli, launch_args

HOLD = "import sys; from orchestrator.run_dir import RunDir; RunDir.open(sys.argv[1]).lock(); print('held', flush=True); sys.stdin.read()"


def test_a_second_controller_on_the_same_run_dir_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
        # The holder's metrics port, as a second launch of the same command would find it: the
        # message must name the run directory's holder, not the port.
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            result = cli(*launch_args(run_dir, f"metrics.port={port}"), timeout=60)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"another orchestrator (pid {holder.pid}) is running on it" in result.stderr
        assert "already in use" not in result.stderr
        assert "Traceback" not in result.stderr
        assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before, "nothing touched"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # The lock dies with its holder, however it ends.
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_run_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "shared"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints").chmod(0o777)
    result = cli(*launch_args(run_dir), timeout=60)
    assert result.returncode == 2
    assert f"chmod go-w {run_dir / 'checkpoints'}" in result.stderr and "writable by group and others" in result.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == ["checkpoints", "logs", "run.json"], "nothing else written"
