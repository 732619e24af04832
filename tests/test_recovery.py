"""Failures in real runs: real signals to real training processes, recovery, the same final loss.

Every scenario is compared with a clean run of the same config, bit for bit. A hang (SIGSTOP), a
lost actor, a kill during a save and a controller kill, one after another in one run, are in
test_chaos.py.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import (
    FOUR_RANKS,
    REFERENCE,
    REFERENCE_TRAINING,
    cli,
    events,
    launch_args,
    losses_by_step,
    of_kind,
    start_cli,
    wait_for_event,
    wait_gone,
    zero_reference,
)

pytestmark = [pytest.mark.processes, pytest.mark.timeout(420)]

# Long enough for the node's warm spare to be ready (forked from the zygote after the first step).
BASE = REFERENCE_TRAINING
LAST = 100


@pytest.fixture
def clean_zero2(reference_run) -> dict[int, float]:
    """Losses of the session's reference run (BASE's training)."""
    run_dir, result = reference_run(*REFERENCE)
    assert result.returncode == 0, result.stdout + result.stderr
    return losses_by_step(events(run_dir))


def _all_pids(run_dir: Path) -> list[int]:
    return [w["pid"] for w in of_kind(events(run_dir), "worker_started")]


def _signal_rank_at(run_dir: Path, proc, rank: int, step: int, sig: int, spare: bool = True) -> float:
    """Send ``sig`` to ``rank``'s current training process once rank 0 reported ``step`` (and, with
    ``spare``, the node's spare is warm); returns when."""
    if spare:
        wait_for_event(run_dir, lambda e: e["event"] == "spare_ready", 180, proc)
    wait_for_event(run_dir, lambda e: e["event"] == "step" and e["step"] >= step, 180, proc)
    pid = [w for w in of_kind(events(run_dir), "worker_started") if w["rank"] == rank][-1]["pid"]
    os.kill(pid, sig)
    return time.time()


def _finish(proc, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out


@pytest.mark.parametrize("rank", [0, 1])
def test_sigkill_of_any_rank_recovers_in_place_with_the_same_losses(
    tmp_path: Path, clean_zero2: dict[int, float], rank: int
) -> None:
    run_dir = tmp_path / "run"
    proc = start_cli(*launch_args(run_dir, *BASE))
    killed_at = _signal_rank_at(run_dir, proc, rank, 25, signal.SIGKILL)
    out = _finish(proc)
    assert proc.returncode == 0, out
    evs = events(run_dir)
    cause = next(e for e in of_kind(evs, "failure_detected") if e["root_cause"])
    assert (cause["rank"], cause["reason"], cause["signal"]) == (rank, "signal", 9)
    started = of_kind(evs, "recovery_started")[0]
    assert started["mode"] == "in_place" and started["replaced"] == [rank]
    # Back to the newest step every rank holds in memory (the survivor its own copy, the replacement
    # its buddy's mirror), not to the last disk checkpoint (step 20): at most the step in flight lost.
    finished = of_kind(evs, "recovery_finished")[0]
    assert (finished["mode"], finished["source"]) == ("in_place", "memory"), finished
    assert finished["resumed_from_step"] >= 25 and finished["steps_lost"] <= 1, finished
    replacement = [w for w in of_kind(evs, "worker_started") if w["attempt"] == 1]
    assert [w["rank"] for w in replacement] == [rank], "only the failed rank gets a new process"
    assert replacement[0]["spare"] is True, "the warm spare replaced it"
    # Step events are written in batches: steps done before the kill can be logged after it.
    # The first step logged after the recovery started is the first one trained after it.
    after_recovery = evs[evs.index(started):]
    next_step = next(e for e in after_recovery if e["event"] == "step")
    assert next_step["step"] == finished["resumed_from_step"] + 1
    assert next_step["ts"] > killed_at
    # Every step, replayed ones included, equals the clean run's, bit for bit.
    assert all(clean_zero2[e["step"]] == e["loss"] for e in of_kind(evs, "step"))
    assert evs[-1]["final_loss"] == clean_zero2[LAST] and evs[-1]["restarts"] == 1
    assert wait_gone(_all_pids(run_dir)) == []


def test_a_rank_killed_with_its_buddy_is_recovered_from_disk_by_the_others_in_place(
    tmp_path: Path, reference_run
) -> None:
    """Rank 1's memory snapshot is mirrored to its buddy, rank 2 (one node: the next rank). Both
    SIGKILLed together, rank 1's state is in nobody's memory: every rank goes back to the disk
    checkpoint, bit-exact. With more than two ranks a survivor can also be blocked in a collective
    on another survivor, not on a dead rank: released when that survivor leaves the attempt
    (worker/abort.py), it rejoins in place instead of being replaced after the unwind timeout."""
    clean_dir, clean = reference_run(*FOUR_RANKS)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    clean_losses = losses_by_step(events(clean_dir))
    run_dir = tmp_path / "run"
    proc = start_cli(*launch_args(run_dir, *FOUR_RANKS))
    wait_for_event(run_dir, lambda e: e["event"] == "step" and e["step"] >= 25, 180, proc)
    pids = {w["rank"]: w["pid"] for w in of_kind(events(run_dir), "worker_started")}
    os.kill(pids[1], signal.SIGKILL)
    os.kill(pids[2], signal.SIGKILL)
    out = _finish(proc)
    assert proc.returncode == 0, out
    evs = events(run_dir)
    causes = {(e["rank"], e["reason"]) for e in of_kind(evs, "failure_detected")}
    assert (1, "signal") in causes or (2, "signal") in causes, causes
    started = of_kind(evs, "recovery_started")
    assert all(e["mode"] == "in_place" and 0 in e["rejoined"] and 3 in e["rejoined"] for e in started), started
    assert {r for e in started for r in e["replaced"]} == {1, 2}
    committed = [c["step"] for c in of_kind(evs, "checkpoint_committed") if c["ts"] < started[0]["ts"]]
    finished = of_kind(evs, "recovery_finished")[0]
    assert (finished["source"], finished["resumed_from_step"]) == ("disk", committed[-1]), finished
    assert all(clean_losses[e["step"]] == e["loss"] for e in of_kind(evs, "step"))
    assert evs[-1]["final_loss"] == clean_losses[60] and evs[-1]["restarts"] == 1
    assert wait_gone(_all_pids(run_dir)) == []


def test_full_restart_path_with_the_checkpoint_interval_chosen_by_the_run(
    tmp_path: Path, clean_zero2: dict[int, float]
) -> None:
    """Also ``checkpoint.interval_steps: auto``: saves every 50 steps until one is measured, then at the
    interval Young and Daly's rule gives for the measured cost and failure rate, decided by rank 0 for
    every rank (a save all ranks did not take would never be committed)."""
    run_dir = tmp_path / "run"
    result = cli(*launch_args(run_dir, *REFERENCE_TRAINING[:1], "checkpoint.interval_steps=auto",
                              "fault_tolerance.recovery=full_restart"), "--inject-fault=kill@1:33")
    assert result.returncode == 0, result.stdout + result.stderr
    evs = events(run_dir)
    assert [e["mode"] for e in of_kind(evs, "recovery_finished")] == ["full_restart"]
    assert sorted(w["rank"] for w in of_kind(evs, "worker_started") if w["attempt"] == 1) == [0, 1]
    assert evs[-1]["final_loss"] == clean_zero2[LAST]

    # No checkpoint before the failure at step 33 (the first is due at 50): the restart began at step 0.
    assert of_kind(evs, "recovery_finished")[0]["resumed_from_step"] == 0
    committed = [e["step"] for e in of_kind(evs, "checkpoint_committed")]
    assert committed[0] == 50 and committed[-1] == LAST
    # After the first save, the interval from its cost, the step time and one failure in the run so far.
    tuned = of_kind(evs, "checkpoint_interval")
    assert tuned and tuned[0]["failures"] == 1 and tuned[0]["mtbf_s"] < 60
    assert 1 <= tuned[0]["interval_steps"] < 25, tuned[0]
    assert len(committed) >= 4, f"the ranks kept to the first interval: {committed}"
    assert "checkpoint interval: every" in result.stderr
    # Each save came at an interval rank 0 was told: between the smallest and the largest in force from
    # the save before it to its own commit (a change reaches rank 0 a little after it is made).
    commit_ts = {e["step"]: e["ts"] for e in of_kind(evs, "checkpoint_committed")}
    for before, after in zip(committed, committed[1:]):
        in_force = [e["interval_steps"] for e in tuned if e["ts"] <= commit_ts[before]][-1:] or [50]
        in_force += [e["interval_steps"] for e in tuned if commit_ts[before] < e["ts"] < commit_ts[after]]
        assert min(in_force) <= after - before <= max(in_force) or after == LAST, (before, after, in_force)


def test_zero3_recovers_in_place(tmp_path: Path, reference_run) -> None:
    clean_dir, clean = reference_run(*zero_reference(3))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    run_dir = tmp_path / "run"
    result = cli(*launch_args(run_dir, *zero_reference(3)), "--inject-fault=kill@0:15")
    assert result.returncode == 0, result.stdout + result.stderr
    evs = events(run_dir)
    # ZeRO-3 has no memory snapshots (docs/checkpoints.md): back to the disk checkpoint of step 10.
    assert [(e["mode"], e["source"], e["resumed_from_step"]) for e in of_kind(evs, "recovery_finished")] == [
        ("in_place", "disk", 10)]
    assert evs[-1]["final_loss"] == losses_by_step(events(clean_dir))[30]


def test_bf16_resumes_bit_exact_after_a_sigkilled_rank(tmp_path: Path, reference_run) -> None:
    """bf16 weights with fp32 master weights in the optimizer (DeepSpeed's bf16 section): the
    checkpoint carries the fp32 master copy, so the resumed run is the clean one, bit for bit."""
    clean_dir, clean = reference_run(*zero_reference(1, "bf16"))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    clean_losses = losses_by_step(events(clean_dir))
    # Trained in bf16: each rank's loss is a bf16 number, their mean a multiple of 1/256 below 8.
    assert all((loss * 256).is_integer() for loss in clean_losses.values() if loss < 8), clean_losses
    run_dir = tmp_path / "run"
    proc = start_cli(*launch_args(run_dir, *zero_reference(1, "bf16")))
    _signal_rank_at(run_dir, proc, 1, 15, signal.SIGKILL, spare=False)
    out = _finish(proc)
    assert proc.returncode == 0, out
    evs = events(run_dir)
    assert [(e["rank"], e["reason"]) for e in of_kind(evs, "failure_detected")] == [(1, "signal")]
    assert [(e["mode"], e["source"]) for e in of_kind(evs, "recovery_finished")] == [("in_place", "memory")]
    assert all(clean_losses[e["step"]] == e["loss"] for e in of_kind(evs, "step"))
    assert evs[-1]["final_loss"] == clean_losses[30] and evs[-1]["restarts"] == 1


def test_repeated_exception_fails_after_one_retry_with_one_traceback(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = cli(*launch_args(run_dir, "train.entrypoint=tests.user_train:raises_at_step_3", "train.steps=5",
                              "fault_tolerance.max_restarts=5"))
    assert result.returncode == 1
    # The retry shows the failed rank's last lines (short); the final report, one full traceback.
    retry_note, report = result.stderr.split("run failed:", 1)
    assert report.count("Traceback") == 1, result.stderr
    assert len([line for line in retry_note.splitlines() if line.startswith("  | ")]) <= 6, retry_note
    assert "ValueError: user bug at step 3" in report
    assert "not retryable: the same ValueError after step 2 on two attempts" in result.stderr
    evs = events(run_dir)
    assert len(of_kind(evs, "recovery_started")) == 1, "one retry, then no restart loop"
    assert evs[-1]["status"] == "failed"
