"""Benchmarks cannot rot: every bench/ script answers --help, and the torchrun baseline of
bench/recovery.py trains and resumes for real (the benchmarks themselves take minutes; run by hand)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.controller.reaper import session_members
from tests.helpers import REPO

BENCH = sorted((REPO / "bench").glob("*.py"))


@pytest.mark.parametrize("script", BENCH, ids=[p.name for p in BENCH])
def test_bench_script_starts(script: Path) -> None:
    result = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


@pytest.mark.processes
@pytest.mark.timeout(300)
def test_torchrun_baseline_trains_and_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import recovery
    finally:
        sys.path.remove(str(REPO / "bench"))

    def run(steps: int) -> None:
        cmd, env = recovery.torchrun_command(tmp_path, [f"train.steps={steps}", "checkpoint.interval_steps=2"])
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=240)
        finally:
            _kill_session(proc.pid)  # torchrun's workers too, whatever happened
        assert proc.returncode == 0, out[-3000:]

    run(4)
    run(6)  # a restart: picks up at step 5 from DeepSpeed's latest checkpoint
    steps = [json.loads(line)["step"] for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def _kill_session(sid: int) -> None:
    for pid in session_members({sid}, exclude=set()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.processes
@pytest.mark.timeout(400)
def test_the_gpu_suite_runs_on_a_cpu_as_a_dry_run(tmp_path: Path) -> None:
    """bench/gpu_suite.sh is known to work before a lent GPU's minutes are spent on it: every step that
    can run without a GPU runs at toy size through the same commands, and its files are written."""
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--dry-run", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=360)
    assert result.returncode == 0, result.stdout + result.stderr + (tmp_path / "gpu_suite.log").read_text()
    suite = json.loads((tmp_path / "gpu_suite.json").read_text())
    steps = suite["steps"]
    assert {name: step["status"] for name, step in steps.items()} == {
        "recovery": "passed", "mfu": "passed", "tests": "passed", "nvml": "skipped", "scaling": "passed"}
    assert steps["recovery"]["bit_exact"] is True and steps["recovery"]["kill_to_next_step_s"] > 0
    assert steps["mfu"]["flops_per_step"] > 0 and steps["mfu"]["precision"] == "bf16"
    assert steps["scaling"]["actual"] > 0 and steps["scaling"]["relative_error"] is not None
    assert set(suite["acceptance"]) and all(met is None for met in suite["acceptance"].values()), "no verdict on a CPU"
    assert "needs nvidia-smi" in (tmp_path / "gpu_suite.log").read_text()
    assert (tmp_path / "scaling-prediction.png").stat().st_size > 0
    assert "acceptance:" in (tmp_path / "gpu_suite.txt").read_text()
