"""launch/slurm.sbatch under a real Slurm: slurmctld, slurmdbd and munged here, one slurmd per network
namespace (launch/slurm/dev-slurm.sh), started for this module and removed after it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, events, losses_by_step, of_kind

sys.path.insert(0, str(REPO / "launch" / "slurm"))
import dev_slurm  # noqa: E402

pytestmark = [pytest.mark.processes, pytest.mark.timeout(600)]

STEPS = 40
TRAINING = ("--set", f"train.steps={STEPS}", "--set", "checkpoint.interval_steps=1000", "--set", "metrics.port=0",
            "--set", "fault_tolerance.max_restarts=0")
WHY_NOT = dev_slurm.missing()


@pytest.fixture(scope="module")
def slurm() -> Iterator[dev_slurm.DevSlurm]:
    if WHY_NOT is not None:
        pytest.skip(f"no dev Slurm here: {WHY_NOT}")
    cluster = dev_slurm.up(2)
    try:
        yield cluster
    finally:
        dev_slurm.down(cluster.name)


def _sbatch(slurm: dev_slurm.DevSlurm, tmp: Path, *options: str) -> tuple[str, Path]:
    run_dir = tmp / "run"
    result = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--output={tmp}/job-%j.out", *options,
                             "launch/slurm.sbatch", "cluster_configs/local.yaml", "--run-dir", str(run_dir), *TRAINING],
                            cwd=REPO, env=slurm.env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0], run_dir


def _job(slurm: dev_slurm.DevSlurm, job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", job_id, "-o"], env=slurm.env(), capture_output=True,
                           text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", shown))


def _wait_state(slurm: dev_slurm.DevSlurm, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(slurm, job_id)
        if job.get("JobState") in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not in {states} within {timeout}s: {_job(slurm, job_id)}")


def _sacct(slurm: dev_slurm.DevSlurm, job_id: str, timeout: float = 30) -> str:
    """The job's state as accounting recorded it (slurmdbd is told a moment after the end)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], env=slurm.env(),
                               capture_output=True, text=True, timeout=30).stdout.strip()
        if state and state not in ("RUNNING", "PENDING", "REQUEUED"):
            return state
        time.sleep(0.5)
    return state


def _left_on_nodes(slurm: dev_slurm.DevSlurm, timeout: float = 20) -> list[str]:
    """Processes in the nodes' namespaces other than their slurmd (a job leaves none behind)."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for node in slurm.network.nodes:
            pids = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True,
                                  timeout=30).stdout.split()
            for pid in pids:
                try:
                    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if not command.startswith("slurmd "):
                    left.append(f"{node.netns} {pid} {command[:100]}")
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.5)


@pytest.fixture(scope="module")
def clean_job(slurm: dev_slurm.DevSlurm, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("clean")
    job_id, run_dir = _sbatch(slurm, tmp)
    _wait_state(slurm, job_id, {"COMPLETED", "FAILED", "CANCELLED"}, 400)
    return {"job_id": job_id, "run_dir": run_dir, "out": (tmp / f"job-{job_id}.out").read_text()}


def test_a_two_node_job_runs_to_completion(slurm: dev_slurm.DevSlurm, clean_job: dict[str, Any]) -> None:
    assert _sacct(slurm, clean_job["job_id"]) == "COMPLETED", clean_job["out"]
    evs = events(clean_job["run_dir"])
    assert evs[-1]["event"] == "run_finished" and evs[-1]["status"] == "succeeded", clean_job["out"]
    started = of_kind(evs, "worker_started")
    addresses = {n.address for n in slurm.network.nodes}
    assert len(started) == 4 and {w["node_ip"] for w in started} == addresses, started
    assert "cluster.nodes 1 in cluster_configs/local.yaml gives way to the allocation's 2" in clean_job["out"]
    assert _left_on_nodes(slurm) == []


def test_usr1_preempts_with_a_checkpoint_and_the_requeued_job_resumes_bit_exact(
    slurm: dev_slurm.DevSlurm, clean_job: dict[str, Any], tmp_path: Path
) -> None:
    """The warning of ``#SBATCH --signal=B:USR1@90`` (sent here at once with ``scancel --signal=USR1
    --batch``): a checkpoint committed after it, ``run_finished`` preempted, the job requeued by itself
    (submitted with --requeue) and resumed from that checkpoint to the clean run's final loss; with
    ``max_restarts: 0``, since a preemption spends none."""
    job_id, run_dir = _sbatch(slurm, tmp_path, "--requeue")
    deadline = time.monotonic() + 300
    while not [e for e in (events(run_dir) if (run_dir / "events.jsonl").exists() else []) if e["event"] == "step"]:
        assert time.monotonic() < deadline, _job(slurm, job_id)
        time.sleep(0.2)
    signalled_at = time.time()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm.env(), check=True, timeout=30)
    deadline = time.monotonic() + 400
    while not [e for e in events(run_dir) if e["event"] == "run_finished" and e["status"] == "succeeded"]:
        assert time.monotonic() < deadline, (tmp_path / f"job-{job_id}.out").read_text()
        time.sleep(0.5)
    evs = events(run_dir)
    finished = of_kind(evs, "run_finished")
    assert [f["status"] for f in finished] == ["preempted", "succeeded"], finished
    committed = [c for c in of_kind(evs, "checkpoint_committed") if signalled_at < c["ts"] < finished[0]["ts"]]
    assert committed and finished[0]["checkpoint"] == f"global_step{committed[-1]['step']}", (committed, finished)
    assert of_kind(evs, "run_started")[1]["resumed_from_step"] == committed[-1]["step"]
    assert finished[1]["final_loss"] == losses_by_step(events(clean_job["run_dir"]))[STEPS]
    assert _job(slurm, job_id).get("Restarts") == "1"
    verify = subprocess.run([sys.executable, "-m", "orchestrator", "checkpoints", "verify", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert _left_on_nodes(slurm) == []


def test_scancel_saves_a_checkpoint_and_ends_preempted_with_nothing_left_on_any_node(
    slurm: dev_slurm.DevSlurm, tmp_path: Path
) -> None:
    """scancel: SIGTERM to every process of the job, Ray's and the node agents' included. The ranks save a
    checkpoint alone at a step they agree on (no checkpoint before it: the interval is 1000 steps), the
    controller commits it from their reports in the run directory; the job is gone within KillWait."""
    job_id, run_dir = _sbatch(slurm, tmp_path)
    deadline = time.monotonic() + 300
    while len(of_kind(events(run_dir) if (run_dir / "events.jsonl").exists() else [], "step")) < 3:
        assert time.monotonic() < deadline, _job(slurm, job_id)
        time.sleep(0.2)
    cancelled_at, cancelled_ts = time.monotonic(), time.time()
    subprocess.run(["scancel", job_id], env=slurm.env(), check=True, timeout=30)
    _wait_state(slurm, job_id, {"CANCELLED", "COMPLETED", "FAILED"}, 60)
    assert time.monotonic() - cancelled_at < 30, "the job outlived KillWait"
    out = (tmp_path / f"job-{job_id}.out").read_text()
    evs = events(run_dir)
    finished = of_kind(evs, "run_finished")
    assert finished and finished[-1]["status"] == "preempted", out
    committed = [c for c in of_kind(evs, "checkpoint_committed") if c["ts"] > cancelled_ts]
    assert committed and finished[-1]["checkpoint"] == f"global_step{committed[-1]['step']}", (committed, out)
    closing = next((line for line in out.splitlines() if "resume with:" in line), "")
    assert closing.endswith(f"last checkpoint: global_step{committed[-1]['step']}; resume with: sbatch --nodes=2 "
                            f"launch/slurm.sbatch cluster_configs/local.yaml {' '.join(TRAINING)} --run-dir {run_dir}"), out
    verify = subprocess.run([sys.executable, "-m", "orchestrator", "checkpoints", "verify", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert _left_on_nodes(slurm) == []
    print(json.dumps(finished[-1]))
