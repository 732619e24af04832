"""Checkpoints in real runs: kills during saves, damaged files, a change of world size, a failing disk.

Every scenario checks what a user would: the event log, the files on disk,
``orchestrator checkpoints verify``, and the loss against a clean run.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.checkpoint import store
from orchestrator.checkpoint.manifest import MANIFEST, verify
from tests.helpers import (
    REFERENCE,
    cli,
    descendants,
    events,
    launch_args,
    losses_by_step,
    of_kind,
    running_cli,
    wait_for_event,
    wait_gone,
)

pytestmark = [pytest.mark.processes, pytest.mark.timeout(900)]

# Saves big enough (~50 MB) that a poll every few milliseconds can land inside one.
BIG = ("model.dim=256", "model.layers=4", "checkpoint.interval_steps=5", "checkpoint.keep_last=2")
BIG_STEPS = 60
SMALL = ("checkpoint.interval_steps=10",)


def _last_attempt(run_dir: Path) -> list[dict]:
    evs = events(run_dir)
    start = max(i for i, e in enumerate(evs) if e["event"] == "run_started")
    return evs[start:]


@pytest.fixture(scope="module")
def disk_full_big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A BIG run whose rank 1 cannot write a file past 1 MiB from the first commit on, as if its disk
    had filled up: every later save fails, training goes on. (run dir, its terminal output).

    A failed save does not touch training, so its losses are also the clean run the SIGKILL test
    compares with: one run serves both."""
    run_dir = tmp_path_factory.mktemp("disk-full-big") / "run"
    with running_cli(*launch_args(run_dir, *BIG, f"train.steps={BIG_STEPS}")) as proc:
        wait_for_event(run_dir, lambda e: e["event"] == "checkpoint_committed", 180, proc)
        pid = [w for w in of_kind(events(run_dir), "worker_started") if w["rank"] == 1][-1]["pid"]
        # Its next shard fails with EFBIG, like a full disk.
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    return run_dir, out


@pytest.fixture(scope="module")
def clean_big(disk_full_big: tuple[Path, str]) -> dict[int, float]:
    return losses_by_step(events(disk_full_big[0]))


@pytest.fixture
def clean_small(reference_run) -> dict[int, float]:
    """Losses of the session's reference run (checkpoint.interval_steps=10 as in SMALL; 100 steps)."""
    run_dir, result = reference_run(*REFERENCE)
    assert result.returncode == 0, result.stdout + result.stderr
    return losses_by_step(events(run_dir))


def _kill_everything(proc) -> list[int]:
    """SIGKILL the whole job at one instant: freeze every process first so none reacts to another's death."""
    pids = descendants(proc.pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    proc.wait(timeout=10)
    return pids


def _staged(checkpoints: Path) -> list[Path]:
    return list((checkpoints / store.STAGING).glob("attempt-*/global_step*/*"))


def _moments(checkpoints: Path) -> list[tuple[str, Callable[[], bool]]]:
    """Six points inside the save-and-commit sequence, each seen from outside by polling the disk: the
    ranks' files being written (the first, a few), the manifest being written, the commit renamed in
    but not yet ``latest``, and two moments by the clock (each a relaunch: ~25 s on 2 cores)."""

    def newer_than_latest() -> bool:
        latest = store.latest_tag(checkpoints)
        newest = store.committed_tags(checkpoints)
        return bool(newest) and newest[-1] != latest

    def staged_at_least(n: int) -> Callable[[], bool]:
        return lambda: len(_staged(checkpoints)) >= n

    def manifest_staged() -> bool:
        return any(p.name in (MANIFEST, f".{MANIFEST}.tmp") for p in _staged(checkpoints))

    def after(delay: float) -> Callable[[], bool]:
        seen: list[float] = []

        def check() -> bool:
            if not seen and _staged(checkpoints):
                seen.append(time.monotonic())
            return bool(seen) and time.monotonic() - seen[0] >= delay
        return check

    return [
        ("first staged file", staged_at_least(1)),
        ("three staged files", staged_at_least(3)),
        ("manifest being written", manifest_staged),
        ("renamed, latest not yet replaced", newer_than_latest),
        ("30 ms into a save", after(0.03)),
        ("120 ms into a save", after(0.12)),
    ]


def test_sigkill_of_every_process_during_saves_never_loses_a_checkpoint(
    clean_big: dict[int, float], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    args = launch_args(run_dir, *BIG, f"train.steps={BIG_STEPS}")
    resumed_from = []
    for name, moment in _moments(checkpoints):
        with running_cli(*args) as proc:
            # Past start-up, so the moment belongs to a save of this launch, not a leftover.
            wait_for_event(run_dir, lambda e: e["event"] == "run_started" and len(of_kind(events(run_dir), "run_started")) == len(resumed_from) + 1, 60, proc)
            deadline = time.monotonic() + 120
            while not moment():
                assert proc.poll() is None, f"{name}: the run ended before the moment came"
                assert time.monotonic() < deadline, f"{name}: not seen within 120 s"
                time.sleep(0.002)
            pids = _kill_everything(proc)
        assert wait_gone(pids, timeout=10) == []
        latest = store.latest_tag(checkpoints)
        if latest is not None:
            assert verify(checkpoints / latest) == [], f"{name}: latest names a damaged checkpoint"
        resumed_from.append(latest)

    result = cli(*args, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    starts = of_kind(events(run_dir), "run_started")
    assert len(starts) == 7 and starts[-1]["resumed_from_step"] > 0
    resumed = losses_by_step(_last_attempt(run_dir))
    assert resumed and all(resumed[s] == clean_big[s] for s in resumed), "the resumed run diverged from the clean one"
    assert resumed[BIG_STEPS] == clean_big[BIG_STEPS]
    verified = cli("checkpoints", "verify", str(run_dir))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_damaged_checkpoint_is_named_and_the_previous_one_used(
    clean_small: dict[int, float], reference_run, tmp_path: Path
) -> None:
    run_dir = _copy_of_reference(reference_run, tmp_path, 80, 90)
    shard = run_dir / "checkpoints" / "global_step90" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    shard.write_bytes(bytes(data))
    check = cli("checkpoints", "verify", str(run_dir))
    assert check.returncode == 1 and str(shard) in check.stdout

    second = cli(*launch_args(run_dir, *SMALL, "train.steps=100"))
    assert second.returncode == 0, second.stdout + second.stderr
    assert str(shard) in second.stdout + second.stderr, "the user is told which file is damaged"
    evs = _last_attempt(run_dir)
    [invalid] = of_kind(evs, "checkpoint_invalid")
    assert invalid["step"] == 90 and str(shard) in invalid["message"]
    assert evs[0]["resumed_from_step"] == 80
    resumed = losses_by_step(evs)
    assert min(resumed) == 81 and all(resumed[s] == clean_small[s] for s in resumed)

    truncated = run_dir / "checkpoints" / "global_step100" / "mp_rank_00_model_states.pt"
    os.truncate(truncated, truncated.stat().st_size // 2)
    third = cli(*launch_args(run_dir, *SMALL, "train.steps=100"))
    assert third.returncode == 0, third.stdout + third.stderr
    evs = _last_attempt(run_dir)
    [invalid] = of_kind(evs, "checkpoint_invalid")
    assert str(truncated) in invalid["message"] and "truncated" in invalid["message"]
    assert evs[0]["resumed_from_step"] == 90, "the re-saved step 90 replaced the damaged one"
    assert sorted(losses_by_step(evs)) == list(range(91, 101))
    assert losses_by_step(evs)[100] == clean_small[100]


def _copy_of_reference(reference_run, tmp_path: Path, *steps: int) -> Path:
    """A new run directory holding the reference run's committed checkpoints of ``steps`` (2 ranks,
    ZeRO-2), the last one latest, as a user copying checkpoints elsewhere would: a launch there resumes."""
    reference_dir, result = reference_run(*REFERENCE)
    assert result.returncode == 0, result.stdout + result.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in steps:
        shutil.copytree(reference_dir / "checkpoints" / f"global_step{step}", checkpoints / f"global_step{step}")
    (checkpoints / "latest").write_text(f"global_step{steps[-1]}")
    return tmp_path / "run"


def test_two_rank_checkpoint_resumes_on_one_rank(clean_small: dict[int, float], reference_run, tmp_path: Path) -> None:
    run_dir = _copy_of_reference(reference_run, tmp_path, 80)
    # One rank with the same global batch (16 sequences) continues the same optimisation.
    second = cli(*launch_args(run_dir, *SMALL, "train.steps=90", "cluster.workers_per_node=1", "train.micro_batch_size=16"))
    assert second.returncode == 0, second.stdout + second.stderr
    evs = _last_attempt(run_dir)
    assert evs[0]["world_size"] == 1 and evs[0]["resumed_from_step"] == 80
    [converted] = of_kind(evs, "checkpoint_converted")
    assert converted["saved_layout"] == [2, 1] and converted["layout"] == [1, 1]
    resumed = losses_by_step(evs)
    assert sorted(resumed) == list(range(81, 91))
    worst = max(abs(resumed[s] - clean_small[s]) for s in resumed)
    assert worst <= 1e-5, f"1-rank continuation differs from the 2-rank one by {worst}"


def test_failing_disk_is_reported_and_the_previous_checkpoint_kept(disk_full_big: tuple[Path, str]) -> None:
    run_dir, out = disk_full_big
    evs = events(run_dir)
    failed = of_kind(evs, "checkpoint_failed")
    assert [e["step"] for e in failed] == list(range(10, BIG_STEPS + 1, 5))
    assert all(e["rank"] == 1 and "File too large" in e["message"] and e["path"].endswith(".pt") for e in failed)
    assert "File too large" in out
    assert [e["step"] for e in of_kind(evs, "checkpoint_committed")] == [5]
    checkpoints = run_dir / "checkpoints"
    assert store.latest_tag(checkpoints) == "global_step5" and verify(checkpoints / "global_step5") == []
    assert not any(p.name.startswith("global_step") and p.name != "global_step5" for p in checkpoints.iterdir())
    assert sorted(losses_by_step(evs)) == list(range(1, BIG_STEPS + 1)), "training went on past the failures"


def test_checkpoints_list_shows_a_save_that_never_committed(reference_run, tmp_path: Path) -> None:
    run_dir = _copy_of_reference(reference_run, tmp_path, 90)
    leftover = store.staging_dir(run_dir / "checkpoints", 3) / "global_step100"
    shutil.copytree(run_dir / "checkpoints" / "global_step90", leftover)
    (leftover / MANIFEST).unlink()
    listing = cli("checkpoints", "list", str(run_dir))
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any(line.startswith("global_step90 (latest)") and " valid " in line for line in lines)
    assert any("global_step100" in line and "incomplete" in line for line in lines)
