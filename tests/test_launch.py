"""Real jobs through the real CLI: embedded Ray, rank actors, DeepSpeed over gloo, real signals.

Kept small (tens of steps) so the whole file runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from orchestrator.controller.reaper import marked_pids
from tests.helpers import (
    REFERENCE,
    SECRET,
    cli,
    descendants,
    events,
    interrupt,
    is_loopback,
    launch_args,
    listening_sockets,
    losses_by_step,
    of_kind,
    run_leftovers,
    run_token,
    running_cli,
    wait_for_event,
    wait_gone,
    zero_reference,
)

pytestmark = [pytest.mark.processes, pytest.mark.timeout(300)]

SHORT = ("train.steps=40", "checkpoint.interval_steps=10")


@pytest.fixture
def clean_run(reference_run) -> tuple[Path, str, str]:
    run_dir, result = reference_run(*REFERENCE)
    return run_dir, result.stdout + result.stderr, str(result.returncode)


def test_local_run_trains_and_records_the_contract(clean_run: tuple[Path, str, str]) -> None:
    run_dir, output, code = clean_run
    assert code == "0", output
    evs = events(run_dir)
    started = of_kind(evs, "run_started")
    assert len(started) == 1 and started[0]["world_size"] == 2 and started[0]["run_id"]
    workers = of_kind(evs, "worker_started")
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert all(w["pid"] > 0 and w["node"] and w["attempt"] == 0 for w in workers)
    # Forked from the zygote the controller started before Ray, which the node's agent adopted.
    assert all(w["forked"] for w in workers), workers
    zygote_log = (run_dir / "logs" / "zygote-0.log").read_text()
    assert zygote_log.startswith("=== zygote, started by the controller before Ray ===\n"), zygote_log
    assert "adopted from the controller" in zygote_log, zygote_log
    steps = of_kind(evs, "step")
    assert [s["step"] for s in steps] == list(range(1, 101)), "a step event for every step"
    assert all(s["step_time_s"] > 0 and isinstance(s["loss"], float) for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0, "the model must learn"
    committed = of_kind(evs, "checkpoint_committed")
    assert [c["step"] for c in committed] == list(range(10, 101, 10))
    assert all(c["seconds"] > 0 and Path(c["path"]).is_dir() for c in committed[-3:])
    finished = evs[-1]
    assert finished["event"] == "run_finished" and finished["status"] == "succeeded"
    assert finished["step"] == 100 and finished["final_loss"] == steps[-1]["loss"]
    assert all("ts" in e for e in evs) and [e["ts"] for e in evs] == sorted(e["ts"] for e in evs)
    # Retention: keep_last=3 of 10 committed, and latest names the newest.
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("global_step*"))
    assert ckpts == ["global_step100", "global_step80", "global_step90"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step100"
    logs = {p.name for p in (run_dir / "logs").iterdir()}
    assert {"rank0.log", "rank1.log"} <= logs
    assert all(name.startswith(("spare-", "zygote-")) for name in logs - {"rank0.log", "rank1.log"})
    for name in ("rank0.log", "rank1.log"):  # a finished rank ends without an abort at interpreter teardown
        assert "Fatal Python error" not in (run_dir / "logs" / name).read_text(), name
    assert "succeeded: step 100" in output
    assert "network on node 127.0.0.1: interface lo (127.0.0.1)" in output, "the node named by its address"
    assert wait_gone([w["pid"] for w in workers]) == []
    assert started[0]["config"]["cluster"]["env"] == {"WANDB_API_KEY": "<redacted>"}
    records = [run_dir / "events.jsonl", *(run_dir / "checkpoints").glob("*/manifest.json")]
    assert len(records) == 4 and not any(SECRET in p.read_text() for p in records), "a cluster.env value leaked"


def test_controller_sigkill_then_resume_is_bitwise(clean_run: tuple[Path, str, str], tmp_path: Path) -> None:
    clean_dir, output, code = clean_run
    assert code == "0", output
    run_dir = tmp_path / "run"
    with running_cli(*launch_args(run_dir, *SHORT)) as proc:
        wait_for_event(run_dir, lambda e: e["event"] == "checkpoint_committed" and e["step"] == 20, 120, proc)
        started = of_kind(events(run_dir), "worker_started")
        pids = [w["pid"] for w in started]
        token = run_token(proc.pid)
        for rank, pid in enumerate(pids):
            # worker_started names the real training process: forked from the node's zygote, which
            # started before the ranks (its initial environment, /proc/PID/environ, is the zygote's).
            assert started[rank]["forked"], "the local mode's ranks are forked from the zygote"
            zygote = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert "orchestrator.worker.zygote" in Path(f"/proc/{zygote}/cmdline").read_text()
            assert pid in marked_pids(token, exclude=set()), "a process of this run"
        os.kill(proc.pid, signal.SIGKILL)  # the controller only; the reaper must do the rest
        proc.wait(timeout=10)
    assert wait_gone(pids) == [], "training processes outlived their controller"
    assert run_leftovers(token, timeout=15) == [], "Ray's daemons or agents outlived the controller"

    result = cli(*launch_args(run_dir, *SHORT))
    assert result.returncode == 0, result.stdout + result.stderr
    evs = events(run_dir)
    resumed_from = of_kind(evs, "run_started")[-1]["resumed_from_step"]
    assert resumed_from >= 20
    last_start = max(i for i, e in enumerate(evs) if e["event"] == "run_started")
    resumed = losses_by_step(evs[last_start:])
    clean = losses_by_step(events(clean_dir))
    assert sorted(resumed) == list(range(resumed_from + 1, 41))
    assert {s: resumed[s] for s in resumed} == {s: clean[s] for s in resumed}, "losses differ after resume"


# ZeRO-2 in fp32 is every other test's; ZeRO-1's run is in bf16 (test_recovery.py resumes it after a kill).
@pytest.mark.parametrize(("stage", "precision"), [(1, "bf16"), (3, "fp32")])
def test_zero_stages_train(reference_run, stage: int, precision: str) -> None:
    run_dir, result = reference_run(*zero_reference(stage, precision))
    assert result.returncode == 0, result.stdout + result.stderr
    steps = of_kind(events(run_dir), "step")
    assert len(steps) == 30 and steps[-1]["loss"] < steps[0]["loss"]
    assert [c["step"] for c in of_kind(events(run_dir), "checkpoint_committed")] == [10, 20, 30]


def test_tensor_parallel_trains(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = cli(*launch_args(run_dir, "parallel.tensor_parallel=2", "train.steps=12", "checkpoint.interval_steps=0"))
    assert result.returncode == 0, result.stdout + result.stderr
    steps = of_kind(events(run_dir), "step")
    assert len(steps) == 12 and steps[-1]["loss"] < steps[0]["loss"]
    assert not of_kind(events(run_dir), "checkpoint_committed")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_cleanly_and_sigterm_preempts_with_a_checkpoint(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C reaches the launcher's whole process group: every rank stops, exit 130. A scheduler's
    SIGTERM (scancel, a preemption, Kubernetes) reaches the launcher alone, after Ray has installed its
    own handler: a checkpoint a few steps ahead, committed, then every rank stops, exit 3 and
    ``run_finished`` ``preempted`` naming the checkpoint (the only one: the interval is far off).
    Also: while it trains, everything the local run started listens on loopback only (Ray, the
    metrics endpoint, the rendezvous store, gloo)."""
    run_dir = tmp_path / "run"
    interval = "0" if sig == signal.SIGINT else "1000"
    with running_cli(*launch_args(run_dir, "train.steps=2000", f"checkpoint.interval_steps={interval}")) as proc:
        wait_for_event(run_dir, lambda e: e["event"] == "step" and e["step"] >= 3, 120, proc)
        pids = [w["pid"] for w in of_kind(events(run_dir), "worker_started")]
        sockets = listening_sockets(descendants(proc.pid))
        assert {pid for pid, _ in sockets} >= {proc.pid, *pids}, "the metrics endpoint, the store and gloo listen"
        assert [s for s in sockets if not is_loopback(s[1])] == [], "a local run listens on loopback only"
        token = run_token(proc.pid)
        signalled_at = time.time()
        if sig == signal.SIGINT:
            interrupt(proc)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=60)
    out = proc.stdout.read()
    assert f"{sig.name} received" not in out, "no dump from Ray's handler"
    evs = events(run_dir)
    last = evs[-1]
    # The closing line: where it stopped, what it kept, and the command that resumes.
    closing = out.rstrip().splitlines()[-1]
    assert re.fullmatch(rf"stopped at step {last['step']}; last checkpoint: {last.get('checkpoint') or 'none'}; "
                        rf"resume with: orchestrator launch \S+local\.yaml .*--run-dir {re.escape(str(run_dir))}( .*)?", closing), closing
    if sig == signal.SIGINT:
        assert proc.returncode == 130, out
        assert f"{sig.name}: stopping every rank" in out
        assert (last["event"], last["status"], last["reason"]) == ("run_finished", "failed", "interrupted")
    else:
        assert proc.returncode == 3, out
        assert "SIGTERM: preempted; saving a checkpoint at step" in out, out
        committed = of_kind(evs, "checkpoint_committed")
        assert len(committed) == 1 and committed[0]["ts"] > signalled_at, committed
        assert (last["event"], last["status"], last["reason"], last["checkpoint"]) == (
            "run_finished", "preempted", "SIGTERM", f"global_step{committed[0]['step']}")
        assert (last["restarts"], last["failures_by_reason"]) == (0, {})
        assert committed[0]["step"] > max(e["step"] for e in evs if e["event"] == "step" and e["ts"] < signalled_at)
    assert wait_gone(pids, timeout=5) == []
    assert run_leftovers(token, timeout=15) == [], "Ray's daemons or agents outlived the launcher"


def test_user_entrypoint_gets_the_context(tmp_path: Path) -> None:
    """Also under a long TMPDIR (a cluster's per-job directory): Ray's socket paths must still fit."""
    run_dir = tmp_path / "run"
    long_tmp = tmp_path / ("per-job-temporary-directory-" * 3) / "nested" / "deeper"
    long_tmp.mkdir(parents=True)
    result = cli(*launch_args(run_dir, "train.entrypoint=tests.user_train:allreduce_counter", "train.steps=5"),
                 env={"TMPDIR": str(long_tmp)})
    assert result.returncode == 0, result.stdout + result.stderr
    # Each step all-reduces (rank + step) over ranks 0 and 1: 2 * step + 1.
    assert losses_by_step(events(run_dir)) == {s: 2.0 * s + 1 for s in range(1, 6)}
    # What the training code starts inherits neither the orchestrator's variables nor its control socket.
    child = json.loads((run_dir / "child.json").read_text())
    assert child == {"orch_env": [], "sockets": []}, child


def test_user_exception_fails_with_its_traceback(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = cli(*launch_args(run_dir, "train.entrypoint=tests.user_train:raises_at_step_3", "train.steps=5",
                              "fault_tolerance.max_restarts=0"))
    assert result.returncode == 1
    assert "ValueError: user bug at step 3" in result.stderr
    assert 'tests/user_train.py", line' in result.stderr, "the rank's traceback reaches the terminal"
    evs = events(run_dir)
    detected = of_kind(evs, "failure_detected")
    assert detected and all(d["reason"] == "exception" for d in detected)
    assert sum(d["root_cause"] for d in detected) == 1
    assert evs[-1]["event"] == "run_finished" and evs[-1]["status"] == "failed"


def test_killed_rank_is_detected_as_root_cause(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with running_cli(*launch_args(run_dir, "train.steps=2000", "checkpoint.interval_steps=0",
                                  "fault_tolerance.max_restarts=0")) as proc:
        wait_for_event(run_dir, lambda e: e["event"] == "step" and e["step"] >= 3, 120, proc)
        victim = next(w for w in of_kind(events(run_dir), "worker_started") if w["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        proc.wait(timeout=60)
    output = proc.stdout.read()
    assert proc.returncode == 1, output
    detected = of_kind(events(run_dir), "failure_detected")
    cause = next(d for d in detected if d["root_cause"])
    assert (cause["rank"], cause["reason"], cause["signal"]) == (1, "signal", 9)
    assert "rank 1: training process killed by SIGKILL" in output
