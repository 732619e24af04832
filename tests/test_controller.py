"""The controller's state machine, one step at a time, against a fake worker group (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.checkpoint import store
from orchestrator.config import load_config
from orchestrator.controller.controller import Controller
from orchestrator.controller.failures import root_cause
from orchestrator.controller.states import Failed, Running, Starting, Succeeded
from orchestrator.controller.worker_group import RankUpdate, WorkerInfo
from orchestrator.monitor.events import EventLog, read_events
from orchestrator.run_dir import RunDir
from tests.helpers import LOCAL_CONFIG


class FakeGroup:
    """Scripted polls: each call to ``poll`` returns the next list of updates (then quiet ones)."""

    def __init__(self, world_size: int, script: list[list[RankUpdate]]) -> None:
        self.world_size = world_size
        self.script = list(script)
        self.started: list[tuple[int, str | None]] = []
        self.stops = 0

    def start(self, attempt: int, resume_tag: str | None) -> list[WorkerInfo]:
        self.started.append((attempt, resume_tag))
        return [WorkerInfo(rank=r, pid=1000 + r, node="fake", attempt=attempt) for r in range(self.world_size)]

    def poll(self) -> list[RankUpdate]:
        if self.script:
            return self.script.pop(0)
        return [RankUpdate(rank=r) for r in range(self.world_size)]

    def stop(self) -> None:
        self.stops += 1

    def close(self) -> None:
        self.stop()


class NullDisplay:
    def __init__(self) -> None:
        self.notes: list[str] = []

    def step(self, step, total, loss, tokens_per_s) -> None:
        pass

    def note(self, text: str) -> None:
        self.notes.append(text)

    def close(self) -> None:
        pass


def step_msg(step: int, loss: float) -> dict:
    return {"type": "step", "step": step, "loss": loss, "step_time_s": 0.1, "tokens": 100, "at": 1.0}


def saved(step: int) -> dict:
    return {"type": "checkpoint_saved", "step": step, "tag": store.tag_for(step), "seconds": 0.2, "at": 1.0}


def make(tmp_path: Path, script: list[list[RankUpdate]], world: int = 2):
    config = load_config(LOCAL_CONFIG, ["train.steps=2"])
    run = RunDir.open(tmp_path / "run")
    group = FakeGroup(world, script)
    events = EventLog(run.events)
    ctl = Controller(config, run, group, events, NullDisplay(), sleep=lambda _s: None)
    return ctl, group, run


def test_success_path_one_step_at_a_time(tmp_path: Path) -> None:
    ctl, group, run = make(tmp_path, [
        [RankUpdate(rank=0, messages=[step_msg(1, 5.0)]), RankUpdate(rank=1, messages=[step_msg(1, 9.0)])],
        [RankUpdate(rank=0, messages=[step_msg(2, 4.0), {"type": "finished"}], returncode=0),
         RankUpdate(rank=1, messages=[{"type": "finished"}], returncode=0)],
    ])
    assert isinstance(ctl.state, Starting)
    previous, current = ctl.step()
    assert isinstance(previous, Starting) and isinstance(current, Running)
    assert group.started == [(0, None)]
    _, current = ctl.step()
    assert isinstance(current, Running), "not finished after one step report"
    _, current = ctl.step()
    assert isinstance(current, Succeeded) and current.terminal
    evs = read_events(run.events)
    assert [e["pid"] for e in evs if e["event"] == "worker_started"] == [1000, 1001]
    steps = [e for e in evs if e["event"] == "step"]
    assert [(e["step"], e["loss"]) for e in steps] == [(1, 5.0), (2, 4.0)], "only rank 0's losses are logged"
    assert steps[0]["tokens_per_s"] == pytest.approx(1000.0)
    assert evs[-1] == {**evs[-1], "event": "run_finished", "status": "succeeded", "step": 2, "final_loss": 4.0}


def test_checkpoint_commits_only_when_every_rank_saved(tmp_path: Path) -> None:
    ctl, _, run = make(tmp_path, [
        [RankUpdate(rank=0, messages=[saved(1)]), RankUpdate(rank=1)],
        [RankUpdate(rank=0), RankUpdate(rank=1, messages=[saved(1)])],
    ])
    ctl.step()  # STARTING -> RUNNING
    ctl.step()
    assert store.committed_tag(run.checkpoints) is None, "committed before rank 1 saved"
    ctl.step()
    assert store.committed_tag(run.checkpoints) == "global_step1"
    committed = [e for e in read_events(run.events) if e["event"] == "checkpoint_committed"]
    assert committed and committed[0]["step"] == 1 and committed[0]["path"].endswith("global_step1")


def test_resume_tag_comes_from_latest(tmp_path: Path) -> None:
    run = RunDir.open(tmp_path / "run")
    (run.checkpoints / "global_step7").mkdir()
    store.commit(run.checkpoints, "global_step7")
    ctl, group, _ = make(tmp_path, [])
    ctl.step()
    assert group.started == [(0, "global_step7")]


def test_killed_rank_is_the_root_cause_not_the_survivor(tmp_path: Path) -> None:
    # Rank 0's collective error is polled first, but rank 1 died earlier.
    error = {"type": "error", "exc_type": "RuntimeError", "message": "Connection reset by peer",
             "traceback": "Traceback ...\nRuntimeError: Connection reset by peer\n", "at": 101.0}
    ctl, group, run = make(tmp_path, [
        [RankUpdate(rank=0, messages=[error], returncode=1, exited_at=101.1),
         RankUpdate(rank=1, returncode=-9, exited_at=100.9, log_tail="...")],
        [RankUpdate(rank=0, returncode=1, exited_at=101.1), RankUpdate(rank=1, returncode=-9, exited_at=100.9)],
    ])
    ctl.step()
    _, current = ctl.step()
    assert isinstance(current, Failed)
    assert group.stops == 1
    assert len(current.failures) == 2, "one failure per rank"
    cause = root_cause(current.failures)
    assert (cause.rank, cause.reason, cause.signal) == (1, "signal", 9)
    detected = [e for e in read_events(run.events) if e["event"] == "failure_detected"]
    assert [(e["rank"], e["reason"], e["root_cause"]) for e in detected] == [(1, "signal", True), (0, "exception", False)]
    assert detected[0]["signal"] == 9 and detected[1]["exit_code"] == 1
    finished = read_events(run.events)[-1]
    assert finished["event"] == "run_finished" and finished["status"] == "failed"


def test_exits_caused_by_our_own_stop_are_not_failures(tmp_path: Path) -> None:
    ctl, _, _ = make(tmp_path, [
        [RankUpdate(rank=0), RankUpdate(rank=1, returncode=3, exited_at=1.0)],
        # After the stop, rank 0 ends by our SIGTERM "now": not a failure.
        [RankUpdate(rank=0, returncode=-15, exited_at=4e9), RankUpdate(rank=1, returncode=3, exited_at=1.0)],
    ])
    ctl.step()
    _, current = ctl.step()
    assert isinstance(current, Failed)
    assert [(f.rank, f.reason, f.exit_code) for f in current.failures] == [(1, "exit", 3)]


def test_lost_actor_is_node_lost(tmp_path: Path) -> None:
    ctl, _, _ = make(tmp_path, [[RankUpdate(rank=0), RankUpdate(rank=1, lost="worker actor died")]])
    ctl.step()
    _, current = ctl.step()
    assert isinstance(current, Failed)
    assert root_cause(current.failures).reason == "node_lost"


def test_interrupted_run_is_recorded(tmp_path: Path) -> None:
    ctl, _, run = make(tmp_path, [])
    ctl.step()
    ctl.abort("interrupted")
    last = read_events(run.events)[-1]
    assert (last["event"], last["status"], last["reason"]) == ("run_finished", "failed", "interrupted")
