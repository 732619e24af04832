"""Light simulated ranks (``orchestrator/training/simulated.py``): real rank processes, real agents and
a real controller, without torch, so that a cluster of hundreds of ranks fits one machine."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.helpers import events, launch_args, of_kind, running_cli, wait_for_event

RANKS = 16


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as fh:
        return fh.read()


def test_sixteen_simulated_ranks_on_one_node_train_checkpoint_and_recover_without_torch(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with running_cli(*launch_args(run_dir, f"cluster.workers_per_node={RANKS}", "train.steps=60",
                                  "train.entrypoint=orchestrator.training.simulated:train",
                                  "cluster.env.SIMULATED_STEP_S=0.1", "checkpoint.interval_steps=10",
                                  "fault_tolerance.max_restarts=1")) as proc:
        wait_for_event(run_dir, lambda e: e["event"] == "checkpoint_committed" and e["step"] == 10, 120, proc)
        ranks = {w["rank"]: w for w in of_kind(events(run_dir), "worker_started")}
        assert sorted(ranks) == list(range(RANKS))
        assert not any("libtorch" in _maps(w["pid"]) for w in ranks.values()), "a simulated rank imported torch"
        os.kill(ranks[5]["pid"], signal.SIGKILL)
        proc.wait(timeout=120)
    output = proc.stdout.read()
    assert proc.returncode == 0, output
    evs = events(run_dir)
    (started,) = of_kind(evs, "recovery_started")
    assert (started["reason"], started["mode"], started["replaced"]) == ("signal", "in_place", [5])
    assert started["resume_from"] is not None and started["resume_from"].endswith(("10", "20"))
    finished = of_kind(evs, "run_finished")[-1]
    assert (finished["status"], finished["step"]) == ("succeeded", 60)
    committed = [e["step"] for e in of_kind(evs, "checkpoint_committed")]
    assert committed[-1] == 60 and 10 in committed
    manifest = (run_dir / "checkpoints" / "global_step60" / "manifest.json").read_text()
    assert all(f"simulated_rank_{r:05d}.txt" in manifest for r in range(RANKS))
