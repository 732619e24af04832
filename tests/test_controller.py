"""The controller's state machine, one step at a time, against a fake worker group and a fake clock."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from orchestrator.checkpoint import store
from orchestrator.checkpoint.manifest import Manifest, verify
from orchestrator.config import load_config
from orchestrator.controller.controller import SETTLE_S, Controller
from orchestrator.controller.failures import Failure, root_cause
from orchestrator.controller.states import (
    Failed,
    Preempted,
    Preempting,
    Recovering,
    Running,
    Starting,
    State,
    Succeeded,
)
from orchestrator.controller.views import Move, Phase, Process, RankView
from orchestrator.controller.worker_group import NodeLayout, RankUpdate, WorkerInfo
from orchestrator.errors import ClusterError
from orchestrator.events import EventLog, read_events
from orchestrator.messages import (
    CheckpointFailed,
    CheckpointSaved,
    Error,
    FaultInjected,
    Finished,
    NodeBeat,
    NodeLeft,
    NodeSaved,
    Resumed,
    Step,
)
from orchestrator.monitor.metrics import JobMetrics
from orchestrator.run_dir import RunDir
from tests.helpers import LOCAL_CONFIG, commit_for_test, failed_ranks, of_kind


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeGroup:
    """Scripted polls: each ``poll`` returns the next scripted list (then quiet, alive ranks)."""

    heartbeat_s = 0.0

    def __init__(self, clock: Clock, world_size: int = 2) -> None:
        self.clock = clock
        self.world_size = world_size
        self.script: list[list[RankUpdate]] = []
        self.starts: list[dict] = []
        self.killed: list[int] = []
        self.interrupted: list[int] = []
        self.spare_requests = 0
        self.checkpoint_intervals: list[int] = []
        self.memory_intervals: list[int] = []
        self.saves_requested: list[int] = []
        self.on_interrupt: dict[int, dict] = {}
        self.unheard_script: list[list[int]] = []  # overrides what the polls' answers say
        self.polls = 0
        self.asked: list[list[int] | None] = []  # each poll_mark's ranks (None: every rank)
        self.heard: dict[int, int] = {}  # rank -> the poll its actor last answered
        self.lost: set[int] = set()
        self.missing: list[int] = []  # node slots the next replace_lost finds no place for
        self.shrunk: list[list[int]] = []
        self.spares: list[str] = []  # spare node addresses still available
        self.spares_lost: list[tuple[str, str]] = []  # reported by the next lost_spares()

    def start(self, attempt, resume_tag, faults, rejoin=(), interrupt=()):
        self.starts.append({"attempt": attempt, "resume_tag": resume_tag, "faults": list(faults), "rejoin": list(rejoin)})
        self.interrupted += list(interrupt)
        if interrupt:
            # An interrupted survivor reports how it left the last attempt after this one began (its agent
            # folds its node's into one NodeLeft).
            self.script.insert(0, [
                NodeLeft(ranks=list(interrupt), pid=[0] * len(interrupt), at=[self.clock.now] * len(interrupt),
                         step=[0] * len(interrupt), exc_type="Interrupted", message="stopped", traceback="",
                         interrupted=True, collective=False, attempt=attempt - 1),
                *[RankUpdate(rank=r, alive_at=self.clock.now) for r in range(self.world_size) if r not in interrupt]])
        new = [r for r in range(self.world_size) if r not in rejoin]
        return [WorkerInfo(rank=r, pid=100 * (attempt + 1) + r, node="fake", attempt=attempt, spare=attempt > 0) for r in new]

    def poll(self):
        self.polls += 1
        if self.script:
            updates = self.script.pop(0)
        else:
            updates = [RankUpdate(rank=r, alive_at=self.clock.now, in_collective=True) for r in range(self.world_size)]
        for update in updates:
            if isinstance(update, (NodeBeat, NodeSaved, NodeLeft)):
                self.heard.update(dict.fromkeys(update.ranks, self.polls))
            elif update.lost is not None:
                self.lost.add(update.rank)
            elif update.alive_at is not None or update.returncode is not None or update.reports:
                self.heard[update.rank] = self.polls
        return updates

    def poll_mark(self, ranks=None):
        self.asked.append(None if ranks is None or len(ranks) == self.world_size else sorted(ranks))
        return self.polls

    def unheard(self, mark, ranks):
        if self.unheard_script:
            return [r for r in self.unheard_script.pop(0) if r in ranks]
        return [r for r in ranks if r not in self.lost and self.heard.get(r, 0) <= mark]

    def replace_lost(self, allow_missing):
        missing, self.missing = self.missing, []
        if missing and not allow_missing:
            raise ClusterError(f"node slots {missing} lost")
        return missing

    def shrink(self, config, slots):
        self.shrunk.append(sorted(slots))
        self.world_size = config.cluster.world_size

    def kill(self, ranks):
        self.killed += list(ranks)

    def ensure_spares(self):
        self.spare_requests += 1

    def set_checkpoint_interval(self, steps):
        self.checkpoint_intervals.append(steps)

    def set_memory_interval(self, steps):
        self.memory_intervals.append(steps)

    def request_save(self, step):
        self.saves_requested.append(step)

    def wait(self, timeout_s, soonest_s):
        self.clock.sleep(timeout_s)

    def gpu_endpoints(self) -> list[str]:
        return []

    def gpu_models(self) -> list[str]:
        return []

    def warm_spares(self):
        return {}

    def node_networks(self):
        return {"node-a": {"interface": "eth0", "address": "10.0.0.1", "ib_ports": [], "env": {}, "summary": "eth0"}}

    def layout(self):
        return NodeLayout(ranks={"10.0.0.1": list(range(self.world_size))}, spares=list(self.spares))

    def lost_spares(self):
        lost, self.spares_lost = self.spares_lost, []
        return lost

    def stop(self):
        pass

    def close(self):
        pass


class NullDisplay:
    def __init__(self) -> None:
        self.notes: list[str] = []

    def step(self, step, total, loss, tokens_per_s) -> None:
        pass

    def note(self, text: str) -> None:
        self.notes.append(text)

    def close(self) -> None:
        pass


def step_msg(step: int, loss: float, at: float = 1000.0) -> Step:
    return Step(step=step, loss=loss, step_time_s=0.1, tokens=100, at=at)


def saved(step: int, attempt: int = 0, ranks: tuple[int, ...] = (0, 1)) -> NodeSaved:
    """Ranks ``ranks`` (of node slot 0) saved their parts of checkpoint ``step``, as their agent reports it."""
    return NodeSaved(ranks=list(ranks), step=step, tag=store.tag_for(step), attempt=attempt, blocked_s=0.01,
                     write_s=0.2, files={"shard.pt": {"size": 1, "sha256": SHA_OF_X}}, at=1000.0)


SHA_OF_X = hashlib.sha256(b"x").hexdigest()


def stage(run: RunDir, step: int, attempt: int = 0) -> None:
    """What the ranks' writers leave in the staging directory before they report."""
    directory = store.staging_dir(run.checkpoints, attempt) / store.tag_for(step)
    directory.mkdir(parents=True)
    (directory / "shard.pt").write_bytes(b"x")


def error_msg(text: str, step: int, at: float, exc_type: str = "RuntimeError") -> Error:
    return Error(exc_type=exc_type, message=text, traceback=f"Traceback\n{exc_type}: {text}\n", interrupted=False,
                 step=step, at=at)


def make(tmp_path: Path, *overrides: str, heartbeat_s: float = 0.0, metrics: JobMetrics | None = None):
    clock = Clock()
    config = load_config(LOCAL_CONFIG, ["train.steps=3", *overrides])
    run = RunDir.open(tmp_path / "run")
    group = FakeGroup(clock, config.cluster.world_size)
    group.heartbeat_s = heartbeat_s
    ctl = Controller(config, run, group, EventLog(run.events), NullDisplay(), sleep=clock.sleep, clock=clock,
                     metrics=metrics)
    return ctl, group, run, clock


def kinds(run: RunDir) -> list[str]:
    return [e["event"] for e in read_events(run.events)]


def test_success_path_one_step_at_a_time(tmp_path: Path) -> None:
    ctl, group, run, _ = make(tmp_path)
    group.script = [
        [RankUpdate(rank=0, reports=[step_msg(1, 5.0)]), RankUpdate(rank=1, reports=[step_msg(1, 9.0)])],
        [RankUpdate(rank=0, reports=[step_msg(2, 4.0), step_msg(3, 3.0), Finished(at=1.0)], returncode=0),
         RankUpdate(rank=1, reports=[Finished(at=1.0)], returncode=0)],
    ]
    assert isinstance(ctl.state, Starting)
    previous, current = ctl.step()
    assert isinstance(previous, Starting) and isinstance(current, Running)
    assert group.starts == [{"attempt": 0, "resume_tag": None, "faults": [], "rejoin": []}]
    assert group.spare_requests == 0, "no spares during the ranks' start-up"
    _, current = ctl.step()
    assert isinstance(current, Running)
    assert group.spare_requests == 1, "spares are started once training runs"
    _, current = ctl.step()
    assert isinstance(current, Succeeded) and current.terminal
    evs = read_events(run.events)
    assert [e["pid"] for e in evs if e["event"] == "worker_started"] == [100, 101]
    steps = [e for e in evs if e["event"] == "step"]
    assert [(e["step"], e["loss"]) for e in steps] == [(1, 5.0), (2, 4.0), (3, 3.0)], "only rank 0's losses"
    assert steps[0]["tokens_per_s"] == pytest.approx(1000.0)
    last = evs[-1]
    assert (last["event"], last["status"], last["step"], last["final_loss"], last["restarts"]) == (
        "run_finished", "succeeded", 3, 3.0, 0)


def test_checkpoint_commits_only_when_every_rank_saved(tmp_path: Path) -> None:
    ctl, group, run, _ = make(tmp_path)
    stage(run, 1)
    group.script = [
        [saved(1, ranks=(0,)), RankUpdate(rank=1)],
        [RankUpdate(rank=0), saved(1, ranks=(1,))],
    ]
    ctl.step()
    ctl.step()
    assert store.latest_tag(run.checkpoints) is None, "committed before rank 1 saved"
    assert not (run.checkpoints / "global_step1").exists()
    ctl.step()
    assert store.latest_tag(run.checkpoints) == "global_step1"
    assert verify(run.checkpoints / "global_step1") == []
    manifest = Manifest.read(run.checkpoints / "global_step1")
    assert (manifest.step, manifest.world_size, manifest.data_parallel_size) == (1, 2, 2)
    committed = [e for e in read_events(run.events) if e["event"] == "checkpoint_committed"]
    assert committed[0]["step"] == 1 and committed[0]["path"].endswith("global_step1")


def test_a_commit_stands_when_pruning_old_checkpoints_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl, group, run, _ = make(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(run.checkpoints / "global_step0"))

    monkeypatch.setattr(store, "prune", refuse)
    stage(run, 1)
    group.script = [[saved(1)]]
    ctl.step()
    ctl.step()
    assert store.latest_tag(run.checkpoints) == "global_step1"
    evs = read_events(run.events)
    assert of_kind(evs, "checkpoint_committed")[0]["step"] == 1
    assert "Permission denied" in of_kind(evs, "warning")[0]["message"]


def test_save_of_an_abandoned_attempt_is_never_committed(tmp_path: Path) -> None:
    ctl, group, run, _ = make(tmp_path)
    ctl._commits.forget_partial(1)
    group.script = [[saved(1, attempt=0)]]
    ctl.step()
    ctl.step()
    assert store.latest_tag(run.checkpoints) is None


def test_failed_save_is_reported_and_stops_the_run_only_when_asked(tmp_path: Path) -> None:
    failed = CheckpointFailed(step=1, tag="global_step1", attempt=0, path="/x/shard.pt",
                              error="No space left on device", errno=28, at=1000.0)
    for policy, expected in (("continue", Running), ("stop", Failed)):
        ctl, group, run, _ = make(tmp_path / policy, f"checkpoint.on_failure={policy}")
        stage(run, 1)
        group.script = [[RankUpdate(rank=0, reports=[failed]), saved(1, ranks=(1,))]]
        ctl.step()
        ctl.step()
        assert isinstance(ctl.state, expected), policy
        assert store.latest_tag(run.checkpoints) is None
        event = [e for e in read_events(run.events) if e["event"] == "checkpoint_failed"][0]
        assert event["rank"] == 0 and "No space left on device" in event["message"] and "/x/shard.pt" in event["message"]


def test_resumes_from_the_newest_valid_checkpoint(tmp_path: Path) -> None:
    run = RunDir.open(tmp_path / "run")
    commit_for_test(run, 5)
    damaged = commit_for_test(run, 7)
    (damaged / "shard.pt").write_bytes(b"y")  # same size, other bytes
    store.set_latest(run.checkpoints, "global_step7")
    (store.staging_dir(run.checkpoints, 0) / "global_step9").mkdir(parents=True)
    ctl, group, _, _ = make(tmp_path)
    ctl.prepare()
    ctl.step()
    assert group.starts[0]["resume_tag"] == "global_step5"
    assert store.latest_tag(run.checkpoints) == "global_step5", "latest repaired to name a valid checkpoint"
    assert not (run.checkpoints / store.STAGING).exists(), "staging leftovers removed at start"
    evs = read_events(run.events)
    invalid = [e for e in evs if e["event"] == "checkpoint_invalid"]
    assert len(invalid) == 1 and invalid[0]["step"] == 7 and "shard.pt" in invalid[0]["message"]
    assert invalid[0]["moved_to"] == str(run.checkpoints / ".damaged" / "global_step7") and not damaged.exists()
    assert (run.checkpoints / ".damaged" / "global_step7" / "shard.pt").read_bytes() == b"y", "kept, not deleted"
    assert [e for e in evs if e["event"] == "run_started"][0]["resumed_from_step"] == 5


def _kill_rank1_then_collective_error_on_rank0(clock: Clock) -> list[list[RankUpdate]]:
    t = clock.now
    return [
        # Rank 0's collective error is polled first, but rank 1 died earlier.
        [NodeLeft(ranks=[0], pid=[100], at=[t + 0.1], step=[50], exc_type="RuntimeError", message="Connection reset by peer",
                  traceback="Traceback ...", interrupted=False, collective=True, attempt=0),
         RankUpdate(rank=1, returncode=-9, exited_at=t, log_tail="...")],
    ]


def test_a_peers_collective_error_stamped_before_the_kill_is_not_the_root_cause() -> None:
    """A survivor stamps its error when it raises; the killed rank's exit is stamped when its agent
    sees the channel close, which can be a few milliseconds later (seen once in a real 4-rank run)."""
    kill = Failure(rank=1, reason="signal", at=10.004, signal=9, message="killed")
    peer = Failure(rank=0, reason="exception", at=10.0, message="gloo: Connection closed by peer", collective=True)
    assert root_cause([peer, kill]) is kill
    other = Failure(rank=2, reason="exception", at=9.9, message="gloo: Connection closed by peer", collective=True)
    assert root_cause([peer, other]) is other, "only collective errors: the earliest of them"


def test_the_settle_listens_until_settle_s_after_the_failure_not_after_it_was_seen(tmp_path: Path) -> None:
    """At 16,384 ranks a failure is seen 0.1-0.2 s after it happened; its consequences come within
    SETTLE_S of the failure itself, and the decision does not add the delay of seeing it."""
    ctl, group, run, clock = make(tmp_path)
    ctl.step()
    group.script = [[RankUpdate(rank=1, returncode=-9, exited_at=clock.now - 0.4, log_tail="..."),
                     RankUpdate(rank=0, alive_at=clock.now, in_collective=True)]]
    seen = clock.now
    _, current = ctl.step()
    assert isinstance(current, Recovering) and root_cause(current.failures).rank == 1
    assert clock.now - seen < SETTLE_S - 0.3, "listened 0.5 s after it was seen, not after it happened"


def test_killed_rank_is_replaced_and_the_survivor_rejoins(tmp_path: Path) -> None:
    ctl, group, run, clock = make(tmp_path, "checkpoint.interval_steps=1")
    (run.checkpoints / "global_step40").mkdir()
    ctl.step()  # STARTING -> RUNNING
    ctl._commits.last_committed = "global_step40"
    group.script = _kill_rank1_then_collective_error_on_rank0(clock)
    _, current = ctl.step()
    assert isinstance(current, Recovering)
    assert root_cause(current.failures).rank == 1
    assert current.decision.retry and current.decision.mode == "in_place"
    _, current = ctl.step()
    assert isinstance(current, Running)
    assert group.starts[-1] == {"attempt": 1, "resume_tag": "global_step40", "faults": [], "rejoin": [0]}
    assert group.interrupted == [], "a survivor that already left its training loop is not interrupted"
    group.script = [[RankUpdate(rank=0, reports=[step_msg(41, 2.0, at=clock.now + 0.5)]), RankUpdate(rank=1)]]
    clock.now += 0.5
    ctl.step()
    evs = read_events(run.events)
    detected = [(e["rank"], e["reason"], e["root_cause"]) for e in failed_ranks(evs)]
    assert detected == [(1, "signal", True), (0, "exception", False)]
    assert of_kind(evs, "failure_consequences")[0]["by_reason"] == {"exception": "0"}
    started = [e for e in evs if e["event"] == "recovery_started"][0]
    assert (started["mode"], started["replaced"], started["rejoined"], started["restarts_left"]) == ("in_place", [1], [0], 2)
    assert [(e["rank"], e["pid"], e["attempt"]) for e in evs if e["event"] == "worker_started"][-1] == (1, 201, 1)
    finished = [e for e in evs if e["event"] == "recovery_finished"][0]
    assert (finished["attempt"], finished["resumed_from_step"], finished["mode"]) == (1, 40, "in_place")
    # From the kill to the first step: 0.5 s of training plus the polls that settled the failure.
    assert finished["seconds"] == pytest.approx(0.5, abs=0.05)


def test_live_survivor_is_interrupted_as_it_rejoins_and_how_it_left_is_not_a_new_failure(tmp_path: Path) -> None:
    """The controller does not wait for a survivor to leave its training function: its agent interrupts
    it and hands it the rejoin. Its interrupted error and readiness, which arrive in the new attempt,
    belong to the old one: neither a failure nor "left training" there."""
    ctl, group, run, clock = make(tmp_path)
    ctl.step()
    group.script = [[RankUpdate(rank=0, alive_at=clock.now, in_collective=False),
                     RankUpdate(rank=1, returncode=3, exited_at=clock.now)]]
    ctl.step()  # -> RECOVERING
    polls = group.polls
    _, current = ctl.step()
    assert group.polls == polls, "recovering polls nobody: it waits for no survivor"
    assert group.interrupted == [0]
    assert isinstance(current, Running) and group.starts[-1]["rejoin"] == [0]
    ctl.step()  # the survivor's report of leaving the last attempt arrives
    assert not ctl._views[0].left_training
    assert len([e for e in read_events(run.events) if e["event"] == "failure_detected"]) == 1


def test_a_report_of_the_last_attempt_read_in_this_one_is_not_a_failure(tmp_path: Path) -> None:
    """A status made before an attempt began may be read after: a peer's collective error in it
    belongs to the attempt that failed, not to the one that just started."""
    ctl, group, run, clock = make(tmp_path)
    ctl.step()
    group.script = [[RankUpdate(rank=1, returncode=-9, exited_at=clock.now)]]
    ctl.step()  # -> RECOVERING
    ctl.step()  # -> RUNNING, attempt 1
    stale = Error(exc_type="DistBackendError", message="Connection reset by peer", traceback="", interrupted=False,
                  step=3, at=clock.now, attempt=0, collective=True)
    group.script = [[RankUpdate(rank=0, alive_at=clock.now, reports=[stale])]]
    ctl.step()
    assert ctl.attempt == 1 and ctl._views[0].error is None
    assert len([e for e in read_events(run.events) if e["event"] == "failure_detected"]) == 1


def test_a_heartbeats_step_is_progress_only_in_its_own_attempt(tmp_path: Path) -> None:
    ctl, group, run, clock = make(tmp_path)
    ctl.step()
    clock.now += 1
    stepped = clock.now
    now = clock.now
    group.script = [[NodeBeat(ranks=[0, 1], pid=[100, 101], alive_at=[now, now], moved_at=[now, now], where=["", ""],
                              in_collective=[False, False], step=[9, 5], step_at=[now, stepped],
                              step_time_s=[0.2, 0.2], step_attempt=[-1, 0])]]
    ctl.step()
    assert (ctl._views[1].step, ctl._views[1].progress_at, ctl._views[1].phase) == (5, stepped, Phase.TRAINING)
    assert ctl._views[1].alive_at == now and ctl._views[0].alive_at == now, "liveness, whatever the attempt of the step"
    assert ctl._views[0].step is None and ctl._views[0].phase is Phase.STARTING, "a step of no known attempt is not progress"


def test_budget_spent_fails_the_run(tmp_path: Path) -> None:
    ctl, group, run, clock = make(tmp_path, "fault_tolerance.max_restarts=0")
    ctl.step()
    group.script = _kill_rank1_then_collective_error_on_rank0(clock)
    _, current = ctl.step()
    assert isinstance(current, Failed)
    assert "restart budget spent" in current.reason
    last = read_events(run.events)[-1]
    assert (last["event"], last["status"], last["root_cause"]["rank"]) == ("run_finished", "failed", 1)


def test_exception_repeating_at_the_same_step_is_not_retried(tmp_path: Path) -> None:
    ctl, group, run, clock = make(tmp_path, "fault_tolerance.max_restarts=5")
    ctl.step()
    for attempt in range(2):
        group.script = [[RankUpdate(rank=0, reports=[error_msg("bad value", 3, clock.now, "ValueError")]),
                         RankUpdate(rank=1, reports=[error_msg("bad value", 3, clock.now + 0.01, "ValueError")])]]
        _, current = ctl.step()
        if attempt == 0:
            assert isinstance(current, Recovering)
            ctl.step()
    assert isinstance(current, Failed)
    assert "same ValueError after step 3 on two attempts" in current.reason
    assert len(group.starts) == 2, "exactly one retry, no restart loop"


def _started(ctl: Controller, group: FakeGroup, clock: Clock) -> None:
    """Start, and let both ranks report a first step (arming the step-heartbeat clock)."""
    ctl.step()
    group.script = [[RankUpdate(rank=r, reports=[step_msg(1, 5.0, at=clock.now)], alive_at=clock.now) for r in (0, 1)]]
    ctl.step()


def _verdict(ctl: Controller, group: FakeGroup) -> State:
    """One look finds hang suspects and asks their agents for fresh statuses; the next judges on them
    (unless scripted otherwise, the agents answer with their ranks as they were)."""
    if len(group.script) == 1:
        group.script.append([dataclasses.replace(u, reports=[]) for u in group.script[0]])
    _, current = ctl.step()
    assert isinstance(current, Running) and not group.killed, "nobody is judged on heartbeat-old statuses"
    return ctl.step()[1]


def test_frozen_rank_is_the_hang_culprit_not_the_peer_waiting_for_it(tmp_path: Path) -> None:
    ctl, group, run, clock = make(tmp_path, "fault_tolerance.hang_timeout_s=5")
    _started(ctl, group, clock)
    frozen_since = clock.now
    clock.now += 6
    group.script = [[RankUpdate(rank=0, alive_at=clock.now, in_collective=True, where="gloo wait"),
                     RankUpdate(rank=1, alive_at=frozen_since)]]
    current = _verdict(ctl, group)
    assert isinstance(current, Recovering)
    assert group.killed[:1] == [1], "the hung rank is killed at detection"
    (detected,) = of_kind(read_events(run.events), "failure_detected")
    assert detected["detection_s"] < SETTLE_S, "a confirmed hang is decided without the settle wait"
    assert len(group.asked) == 1, "the agents' answers to the verdict's request prove their nodes alive for the settle too"
    hang = root_cause(current.failures)
    assert (hang.rank, hang.reason) == (1, "hang") and "no sign of life" in hang.message
    assert [f.rank for f in current.failures] == [1]


def _beat(clock: Clock, steps: list[int], step_at: list[float], in_collective: list[bool]) -> NodeBeat:
    """Node slot 0's beat (ranks 0 and 1, the first attempt's processes), both alive now."""
    now = clock.now
    return NodeBeat(ranks=[0, 1], pid=[100, 101], alive_at=[now, now], moved_at=[now, now], where=["a.py:1", "b.py:2"],
                    in_collective=in_collective, step=steps, step_at=step_at, step_time_s=[0.2, 0.2],
                    step_attempt=[0, 0])


def test_a_node_whose_beat_brings_one_rank_still_stepping_is_still_looked_at_for_the_other(tmp_path: Path) -> None:
    """The hang check skips nodes whose every rank progressed within hang_timeout_s, as their beats say:
    the node's oldest progress counts, not its newest."""
    ctl, group, run, clock = make(tmp_path, "fault_tolerance.hang_timeout_s=5")
    ctl.step()
    group.script = [[_beat(clock, [1, 1], [clock.now, clock.now], [False, False])]]
    ctl.step()
    assert ctl._hangs.candidates(clock.now, len(ctl._views)) == [], "every node was just heard from"
    stuck_since = clock.now
    for _ in range(2):
        clock.now += 2
        group.script = [[_beat(clock, [2, 1], [clock.now, stuck_since], [True, False])]]
        ctl.step()
    assert not group.killed
    clock.now += 2
    group.script = [[_beat(clock, [3, 1], [clock.now, stuck_since], [True, False])]] * 2
    current = _verdict(ctl, group)
    assert isinstance(current, Recovering) and group.killed[:1] == [1]
    assert root_cause(current.failures).message.startswith("no step for 6.") and "b.py:2" in current.failures[0].message


def test_a_ranks_progress_counts_from_when_its_start_was_asked_not_from_when_every_start_was_answered(
        tmp_path: Path) -> None:
    """At thousands of ranks a start takes the controller seconds, and a fast node's ranks step meanwhile:
    a rank hung after its first step is found hang_timeout_s after that step, not after the start returned
    (0.5-0.7 s late at 16,384 simulated ranks)."""
    ctl, group, run, clock = make(tmp_path, "fault_tolerance.hang_timeout_s=5")
    asked_at, start = clock.now, group.start

    def slow_start(*args, **kwargs):
        clock.now += 3.0
        return start(*args, **kwargs)

    group.start = slow_start
    ctl.step()
    stepped = [asked_at + 1, asked_at + 1]
    group.script = [[_beat(clock, [1, 1], stepped, [True, False])]]
    ctl.step()
    clock.now = asked_at + 1 + 5 + 0.3
    group.script = [[_beat(clock, [1, 1], stepped, [True, False])]] * 2
    current = _verdict(ctl, group)
    assert isinstance(current, Recovering) and group.killed[:1] == [1]
    assert root_cause(current.failures).message.startswith("no step for 5.3")


def test_a_peer_heard_a_heartbeat_ago_is_not_frozen(tmp_path: Path) -> None:
    """Liveness arrives with the node's heartbeat: a peer waiting in the collective, last heard a
    heartbeat ago, is alive; the frozen rank is the culprit, alone."""
    ctl, group, run, clock = make(tmp_path, "fault_tolerance.hang_timeout_s=5", heartbeat_s=2.5)
    _started(ctl, group, clock)
    frozen_since = clock.now
    clock.now += 9
    group.script = [[RankUpdate(rank=0, alive_at=clock.now - 4.0, in_collective=True, where="gloo wait"),
                     RankUpdate(rank=1, alive_at=frozen_since)]]
    current = _verdict(ctl, group)
    assert isinstance(current, Recovering)
    assert [f.rank for f in current.failures] == [1]


def test_a_peer_silent_only_in_a_heartbeat_old_status_is_not_frozen(tmp_path: Path) -> None:
    """hang_timeout_s below FROZEN_AFTER_S + heartbeat: the peer waiting in the collective looks
    silent past it in its node's last heartbeat, but its agent's fresh answer shows it alive; only
    the stopped rank is the culprit (a full restart for a SIGSTOP of rank 0 on CI, before)."""
    ctl, group, run, clock = make(tmp_path, "fault_tolerance.hang_timeout_s=4", heartbeat_s=2.5)
    _started(ctl, group, clock)
    stopped_since = clock.now
    clock.now += 4.5
    group.script = [
        [RankUpdate(rank=0, alive_at=stopped_since), RankUpdate(rank=1, alive_at=clock.now - 4.2, in_collective=True)],
        [RankUpdate(rank=0, alive_at=stopped_since), RankUpdate(rank=1, alive_at=clock.now, in_collective=True)],
    ]
    current = _verdict(ctl, group)
    assert isinstance(current, Recovering)
    assert [f.rank for f in current.failures] == [0] and group.killed == [0]


def test_rank_stuck_in_its_own_code_is_the_culprit(tmp_path: Path) -> None:
    ctl, group, _, clock = make(tmp_path, "fault_tolerance.hang_timeout_s=5")
    _started(ctl, group, clock)
    clock.now += 6
    group.script = [[RankUpdate(rank=0, alive_at=clock.now, in_collective=True),
                     RankUpdate(rank=1, alive_at=clock.now, in_collective=False, where="train.py:42 in load")]]
    current = _verdict(ctl, group)
    hang = root_cause(current.failures)
    assert hang.rank == 1 and "train.py:42 in load" in hang.message


def test_no_hang_before_the_timeout(tmp_path: Path) -> None:
    ctl, group, _, clock = make(tmp_path, "fault_tolerance.hang_timeout_s=5")
    _started(ctl, group, clock)
    clock.now += 4
    _, current = ctl.step()
    assert isinstance(current, Running) and not group.killed


def test_start_up_is_not_a_hang_until_the_start_up_limit(tmp_path: Path) -> None:
    ctl, group, _, clock = make(tmp_path, "fault_tolerance.hang_timeout_s=5")
    ctl.step()  # no step yet: importing, rendezvous, engine set-up
    clock.now += 60
    _, current = ctl.step()
    assert isinstance(current, Running) and not group.killed
    clock.now += 300
    current = _verdict(ctl, group)
    assert isinstance(current, (Recovering, Failed)) and root_cause(current.failures).reason == "hang"


def test_before_any_step_a_moving_call_stack_is_progress_and_a_still_one_is_stuck(tmp_path: Path) -> None:
    ctl, group, _, clock = make(tmp_path, "fault_tolerance.hang_timeout_s=5", "fault_tolerance.stuck_timeout_s=60")
    ctl.step()
    for _ in range(10):  # 100 s without a step, the stack changing all along: a quiet script at work
        clock.now += 10
        group.script = [[RankUpdate(rank=r, alive_at=clock.now, moved_at=clock.now - 1, in_collective=r == 0)
                         for r in (0, 1)]]
        _, current = ctl.step()
        assert isinstance(current, Running) and not group.killed
    still_since = clock.now
    clock.now += 61  # rank 1 in the same place since; rank 0 waits for it in a collective
    group.script = [[RankUpdate(rank=0, alive_at=clock.now, moved_at=still_since, in_collective=True),
                     RankUpdate(rank=1, alive_at=clock.now, moved_at=still_since, where="train.py:9 in load")]]
    current = _verdict(ctl, group)
    hang = root_cause(current.failures)
    assert (hang.rank, hang.reason) == (1, "hang") and [f.rank for f in current.failures] == [1]
    assert "blocked for 61.0s (call stack unchanged, no CPU used; limit 60s" in hang.message and "train.py:9 in load" in hang.message
    assert hang.step is None, "no step reported: none to blame"


def test_a_rank_waiting_for_a_stuck_peer_is_not_blamed_when_it_goes_stale_first(tmp_path: Path) -> None:
    ctl, group, _, clock = make(tmp_path, "fault_tolerance.hang_timeout_s=5", "fault_tolerance.stuck_timeout_s=60")
    ctl.step()
    waits_since = clock.now
    clock.now += 0.5  # the stuck rank's stack stopped changing just after its peer began to wait for it
    stuck_since = clock.now
    clock.now += 59.8  # the waiting rank is past stuck_timeout_s (60.3 s), the stuck one not yet
    group.script = [[RankUpdate(rank=0, alive_at=clock.now, moved_at=waits_since, in_collective=True),
                     RankUpdate(rank=1, alive_at=clock.now, moved_at=stuck_since, where="train.py:9 in load")]]
    _, current = ctl.step()
    assert isinstance(current, Running) and not group.killed, "only the waiting rank is stale yet: nobody is blamed"
    clock.now += 1
    group.script = [[RankUpdate(rank=0, alive_at=clock.now, moved_at=waits_since, in_collective=True),
                     RankUpdate(rank=1, alive_at=clock.now, moved_at=stuck_since, where="train.py:9 in load")]]
    current = _verdict(ctl, group)
    assert [f.rank for f in current.failures] == [1] and group.killed[:1] == [1]


def test_silence_is_a_hang_even_before_the_first_step(tmp_path: Path) -> None:
    ctl, group, _, clock = make(tmp_path, "fault_tolerance.hang_timeout_s=5")
    ctl.step()
    last_beat = clock.now
    clock.now += 6
    group.script = [[RankUpdate(rank=0, alive_at=clock.now, moved_at=clock.now, in_collective=True),
                     RankUpdate(rank=1, alive_at=last_beat, moved_at=last_beat)]]
    current = _verdict(ctl, group)
    hang = root_cause(current.failures)
    assert (hang.rank, hang.reason) == (1, "hang") and "no sign of life for 6.0s" in hang.message


def test_a_script_is_restarted_in_full_and_recovered_once_its_ranks_stay_up_and_moving(tmp_path: Path) -> None:
    from orchestrator.controller.controller import SCRIPT_MOVING_S, SCRIPT_UP_S

    ctl, group, run, clock = make(tmp_path, "train.script=train.py")
    ctl.step()
    assert group.spare_requests == 1, "a script's spares are made with its first start"
    group.script = [[RankUpdate(rank=0, alive_at=clock.now),
                     RankUpdate(rank=1, returncode=-9, exited_at=clock.now, log_tail="loading\nstep 22\n")]]
    _, current = ctl.step()
    assert isinstance(current, Recovering) and current.decision.mode == "full_restart"
    ctl.step()
    assert group.starts[-1]["rejoin"] == [] and sorted(group.killed) == [0], "every rank gets a new process"
    (failure,) = of_kind(read_events(run.events), "failure_detected")
    assert "step" not in failure and failure["log_tail"] == "loading\nstep 22", failure
    assert any("  | step 22" in note for note in ctl.display.notes), "the rank's last lines reach the terminal"
    def moved(ago: float) -> list[RankUpdate]:
        return [RankUpdate(rank=r, alive_at=clock.now, moved_at=clock.now - ago) for r in (0, 1)]

    clock.now += SCRIPT_UP_S - 1
    group.script = [moved(0.1)]
    ctl.step()
    assert of_kind(read_events(run.events), "recovery_finished") == []
    clock.now += 1
    group.script = [moved(SCRIPT_MOVING_S + 1)]
    ctl.step()
    assert of_kind(read_events(run.events), "recovery_finished") == [], "up, but stalled: not back yet"
    group.script = [moved(0.1)]
    ctl.step()
    (finished,) = of_kind(read_events(run.events), "recovery_finished")
    assert (finished["signal"], finished["resumed_from_step"], finished["mode"]) == ("alive", None, "full_restart")
    assert group.spare_requests == 2, "and again after the recovery (the old spare became a rank)"


def _recover_from_rank_1_killed_after_step_2(ctl: Controller, group: FakeGroup, clock: Clock) -> None:
    """Both ranks report steps 1 and 2, rank 1 is SIGKILLed, and the controller starts its recovery."""
    group.script = [[RankUpdate(rank=r, reports=[step_msg(s, 2.0, at=clock.now) for s in (1, 2)], alive_at=clock.now)
                     for r in (0, 1)],
                    [RankUpdate(rank=0, alive_at=clock.now), RankUpdate(rank=1, returncode=-9, exited_at=clock.now)]]
    ctl.step()
    ctl.step()
    ctl.step()  # recover


def test_a_scripts_resume_report_finishes_its_recovery_with_the_step(tmp_path: Path) -> None:
    ctl, group, run, clock = make(tmp_path, "train.script=train.py")
    ctl.step()
    _recover_from_rank_1_killed_after_step_2(ctl, group, clock)
    group.script = [[RankUpdate(rank=0, reports=[Resumed(step=2, tag="checkpoint-2", at=clock.now)])]]
    ctl.step()
    (finished,) = of_kind(read_events(run.events), "recovery_finished")
    assert (finished["signal"], finished["resumed_from_step"]) == ("resumed", 2)
    (failure,) = of_kind(read_events(run.events), "failure_detected")
    assert failure["step"] == 2, "the last step the rank reported"


def test_second_failure_before_progress_falls_back_to_full_restart(tmp_path: Path) -> None:
    ctl, group, run, clock = make(tmp_path)
    ctl.step()
    group.script = _kill_rank1_then_collective_error_on_rank0(clock)
    ctl.step()
    ctl.step()  # in-place recovery started, no step yet
    group.script = _kill_rank1_then_collective_error_on_rank0(clock)
    _, current = ctl.step()
    assert isinstance(current, Recovering) and current.decision.mode == "full_restart"
    assert current.decision.delay_s > 0, "no progress since the last failure: back off"
    ctl.step()
    assert group.starts[-1]["rejoin"] == [], "a full restart gives every rank a new process"
    assert 0 in group.killed, "the live rank is killed too: every rank restarts"


def test_injected_fault_fires_once(tmp_path: Path) -> None:
    ctl, group, run, clock = make(tmp_path)
    ctl.faults = [{"kind": "kill", "rank": 1, "step": 2}]
    ctl.step()
    assert group.starts[0]["faults"] == [{"kind": "kill", "rank": 1, "step": 2}]
    group.script = _kill_rank1_then_collective_error_on_rank0(clock)
    group.script[0][1].reports = [FaultInjected(kind="kill", rank=1, step=2, at=clock.now)]
    ctl.step()
    ctl.step()
    assert group.starts[-1]["faults"] == [], "a fired fault is not armed again after the recovery"
    assert "fault_injected" in kinds(run)


def test_lost_actor_is_the_root_cause_and_only_its_rank_is_replaced(tmp_path: Path) -> None:
    ctl, group, _, clock = make(tmp_path)
    last_seen = clock.now  # _started's step reports carry this time
    _started(ctl, group, clock)
    clock.now += 0.5
    # Rank 0's collective error is seen at the same poll that finds rank 1's actor gone.
    group.script = [[RankUpdate(rank=0, reports=[error_msg("Connection reset", 1, clock.now)]),
                     RankUpdate(rank=1, lost="node agent 1 died")]]
    _, current = ctl.step()
    cause = root_cause(current.failures)
    assert (cause.rank, cause.reason, cause.at) == (1, "node_lost", last_seen)
    assert current.decision.mode == "in_place"
    ctl.step()
    assert group.starts[-1]["rejoin"] == [0]


def test_rank_killed_with_its_node_is_a_lost_node_not_a_signal(tmp_path: Path) -> None:
    """A node killed at once: its actor reports its rank's SIGKILL, then goes silent and is found lost.
    The decision waits for the silent actor instead of calling it a killed process."""
    ctl, group, run, clock = make(tmp_path)
    _started(ctl, group, clock)
    t = clock.now
    quiet = [RankUpdate(rank=0, alive_at=t, in_collective=True), RankUpdate(rank=1)]
    group.script = [
        [RankUpdate(rank=0, alive_at=t, in_collective=True), RankUpdate(rank=1, returncode=-9, exited_at=t)],
        *[quiet] * 100,
        [RankUpdate(rank=0, reports=[error_msg("Connection reset", 1, t + 1)]),
         RankUpdate(rank=1, lost="node 10.0.0.2 lost: node agent 1 died")],
    ]
    group.unheard_script = [[1]] * 101  # rank 1's actor stays silent until it is found lost
    _, current = ctl.step()
    assert isinstance(current, Recovering), "the silent actor delays the decision, not forever"
    assert clock.now - t > 1.0, "the decision waited for the silent actor"
    detected = [(e["rank"], e["reason"]) for e in failed_ranks(read_events(run.events))]
    assert sorted(detected) == [(0, "exception"), (1, "node_lost")]
    assert root_cause(current.failures).reason == "node_lost"


def test_each_new_sign_of_a_dying_node_waits_for_its_agent_to_answer_again(tmp_path: Path) -> None:
    """Nodes dying one process at a time: rank 1's agent reports its rank's SIGKILL and answers once
    more, then rank 0's agent is found dead. The decision waits for rank 1's agent to answer a poll
    sent after that death: it is dead too, so both ranks were lost with their node."""
    ctl, group, run, clock = make(tmp_path)
    _started(ctl, group, clock)
    t = clock.now
    group.script = [
        [RankUpdate(rank=0, alive_at=t, in_collective=True), RankUpdate(rank=1, returncode=-9, exited_at=t)],
        [RankUpdate(rank=0, lost="node agent 0 died"), RankUpdate(rank=1, alive_at=t)],
        *[[RankUpdate(rank=0), RankUpdate(rank=1)]] * 3,
        [RankUpdate(rank=0), RankUpdate(rank=1, lost="node 10.0.0.2 lost: node agent 1 died")],
    ]
    ctl.step()
    detected = [(e["rank"], e["reason"]) for e in failed_ranks(read_events(run.events))]
    assert sorted(detected) == [(0, "node_lost"), (1, "node_lost")]
    assert not group.script, "every scripted poll was read before deciding"


def _lose_node_1(ctl: Controller, group: FakeGroup, clock: Clock) -> None:
    """Ranks 2 and 3 (node slot 1 of two nodes x two ranks) are lost; no node takes their place."""
    _started(ctl, group, clock)
    group.script = [[RankUpdate(rank=r, reports=[error_msg("Connection reset", 1, clock.now)])
                     for r in (0, 1)] + [RankUpdate(rank=r, lost="node 10.0.0.2 lost") for r in (2, 3)]]
    group.missing = [1]
    ctl.step()  # -> RECOVERING


TWO_NODES = ("cluster.ray_address=auto", "cluster.nodes=2", "cluster.workers_per_node=2", "train.micro_batch_size=4")


def test_lost_node_without_a_spare_ends_the_run_unless_it_may_shrink(tmp_path: Path) -> None:
    ctl, group, _, clock = make(tmp_path, *TWO_NODES)
    _lose_node_1(ctl, group, clock)
    with pytest.raises(ClusterError):
        ctl.step()


def test_shrink_goes_on_with_the_nodes_left_and_the_same_global_batch(tmp_path: Path) -> None:
    ctl, group, run, clock = make(tmp_path, *TWO_NODES, "fault_tolerance.allow_shrink=true")
    assert ctl.config.global_batch == 16
    _lose_node_1(ctl, group, clock)
    _, current = ctl.step()
    assert isinstance(current, Running)
    assert group.shrunk == [[1]] and group.world_size == 2
    assert (ctl.config.cluster.nodes, ctl.config.global_batch, ctl.config.accumulation_steps(2)) == (1, 16, 2)
    assert group.starts[-1]["rejoin"] == [], "a new world size is a full restart"
    evs = read_events(run.events)
    shrunk = of_kind(evs, "world_shrunk")[0]
    assert (shrunk["nodes"], shrunk["world_size"], shrunk["world_size_before"], shrunk["global_batch"]) == (1, 2, 4, 16)
    started = of_kind(evs, "recovery_started")[0]
    assert (started["mode"], started["replaced"], started["rejoined"]) == ("full_restart", [0, 1], [])
    assert sorted(w["rank"] for w in of_kind(evs, "worker_started") if w["attempt"] == 1) == [0, 1]
    assert sorted(ctl._views) == [0, 1]


def test_interrupted_run_is_recorded(tmp_path: Path) -> None:
    ctl, _, run, _ = make(tmp_path)
    ctl.step()
    ctl.abort("interrupted")
    last = read_events(run.events)[-1]
    assert (last["event"], last["status"], last["reason"]) == ("run_finished", "failed", "interrupted")


def test_a_lost_node_is_one_line_naming_its_address_and_ranks(tmp_path: Path) -> None:
    ctl, group, _, clock = make(tmp_path, *TWO_NODES)
    _started(ctl, group, clock)
    group.script = [[RankUpdate(rank=r, alive_at=clock.now, in_collective=True) for r in (0, 1)]
                    + [RankUpdate(rank=r, lost="node 10.0.0.2 lost: its node agent sent nothing") for r in (2, 3)]]
    ctl.step()
    lines = [n for n in ctl.display.notes if "lost" in n]
    assert len(lines) == 1 and lines[0].startswith(
        "node 10.0.0.2 lost with ranks 2-3: its node agent sent nothing; retrying"), lines


def test_a_lost_spare_node_is_reported_at_once_and_counted(tmp_path: Path) -> None:
    """A spare node partitioned away while waiting: an event, a terminal line, the gauges; the header
    line names the rank nodes and the spares."""
    ctl, group, run, clock = make(tmp_path, *TWO_NODES, "cluster.spare_nodes=1", metrics=JobMetrics())
    group.spares = ["10.0.0.9"]
    _started(ctl, group, clock)
    assert "nodes: 10.0.0.1 (ranks 0-3); spare nodes: 10.0.0.9" in ctl.display.notes
    assert ctl.metrics.spare_nodes._value.get() == 1 and ctl.metrics.spare_nodes_configured._value.get() == 1
    group.spares, group.spares_lost = [], [("10.0.0.9", "node 10.0.0.9 lost: its node agent sent nothing")]
    ctl.step()
    lost = of_kind(read_events(run.events), "spare_node_lost")
    assert [(e["node_ip"], e["spare_nodes"], e["spare_nodes_configured"]) for e in lost] == [("10.0.0.9", 0, 1)]
    assert any(n.startswith("spare node 10.0.0.9 lost (") and "0 of 1 spare node(s) left; a lost node now waits" in n
               for n in ctl.display.notes), ctl.display.notes
    assert ctl.metrics.spare_nodes._value.get() == 0


@pytest.mark.parametrize("collective", [True, False], ids=["collective-errors-only", "a-user-error"])
def test_collective_errors_alone_wait_for_every_agent_until_a_silent_node_is_found_lost(
        tmp_path: Path, collective: bool) -> None:
    """A node killed at once, agent and all: the survivors' collective errors are all that is seen at
    first. Their cause is not seen yet, so the decision waits for every node's agent: rank 1's is
    found lost, the root cause. A rank's own error (raised outside a collective) explains itself:
    decided without waiting for other nodes' agents."""
    ctl, group, run, clock = make(tmp_path)
    _started(ctl, group, clock)
    t = clock.now
    error = Error(exc_type="RuntimeError", message="Connection reset by peer", traceback="", interrupted=False,
                  step=1, at=t + 0.1, collective=collective)
    group.script = [[RankUpdate(rank=0, reports=[error])],
                    *[[RankUpdate(rank=0, alive_at=t)]] * 60,
                    [RankUpdate(rank=1, lost="node 10.0.0.2 lost: its node agent sent nothing")]]
    group.unheard_script = [[1]] * 200  # rank 1's agent stays silent until it is found lost
    _, current = ctl.step()
    cause = root_cause(current.failures)
    if collective:
        assert (cause.rank, cause.reason) == (1, "node_lost") and clock.now - t > 1.0
        assert None in group.asked, "every node's agent was asked"
    else:
        assert (cause.rank, cause.reason) == (0, "exception") and clock.now - t < 1.0


def test_an_exit_seen_a_look_after_its_peers_collective_errors_is_all_the_decision_waits_for(tmp_path: Path) -> None:
    """A killed rank's exit often arrives a moment after its peers' collective errors: every node's agent is
    asked only if one more look does not show their cause (at 2,048 nodes their answers are a burst that
    holds up the one answer the decision needs: an exit decided in up to 1.01 s at 16,384 simulated ranks)."""
    ctl, group, run, clock = make(tmp_path)
    _started(ctl, group, clock)
    t, asked = clock.now, len(group.asked)
    error = Error(exc_type="DistBackendError", message="Connection reset by peer", traceback="", interrupted=False,
                  step=1, at=t + 0.05, collective=True)
    group.script = [[RankUpdate(rank=0, reports=[error])],
                    [RankUpdate(rank=1, returncode=-9, exited_at=t)]]
    _, current = ctl.step()
    assert group.asked[asked:] == [[1]], "only the killed rank's agent is asked, never every node's"
    cause = root_cause(current.failures)
    assert (cause.rank, cause.reason) == (1, "signal")


def test_a_ranks_phase_moves_only_forward_and_ends_at_finished_or_failed() -> None:
    view = RankView(progress_at=0.0)
    view.advance(Move.LEFT)
    view.advance(Move.STEPPED)  # a heartbeat's step, older than the news that it left
    assert view.phase is Phase.LEFT and not view.training
    view.advance(Move.FAILED)
    for move in Move:
        view.advance(move)
    assert view.phase is Phase.FAILED and view.ended, "a failure stands whatever comes after it"
    view.process_ended(lost=True)
    view.process_ended(lost=False)
    assert view.process is Process.LOST and not view.running
    fresh = RankView(progress_at=0.0)
    fresh.advance(Move.STEPPED)
    assert fresh.phase is Phase.TRAINING and fresh.training and not fresh.left_training


def test_the_checkpoint_interval_follows_young_and_daly_from_what_the_run_measured() -> None:
    from orchestrator.controller.cadence import CheckpointCadence, daly_interval_s

    assert daly_interval_s(0.01, 3600) == pytest.approx((2 * 0.01 * 3600) ** 0.5 - 0.01)
    assert daly_interval_s(10.0, 4.0) == 4.0, "a save dearer than two MTBFs: once per MTBF"
    now = [0.0]
    cadence = CheckpointCadence(prior_mtbf_s=3600.0, clock=lambda: now[0])
    assert cadence.steps == 50 and cadence.retune() is None, "nothing measured: the first interval stays"
    for _ in range(5):
        cadence.stepped(0.1)
    cadence.saved(blocked_s=0.02, seconds=0.05)
    now[0] = 100.0
    first = cadence.retune()  # no failure yet: the prior MTBF (longer than the 100 s run)
    assert first is not None and first.mtbf_s == 3600.0 and first.steps == round(daly_interval_s(0.02, 3600) / 0.1)
    cadence.failed()
    now[0] = 120.0
    second = cadence.retune()  # one failure in 120 s
    assert second.mtbf_s == 120.0 and second.failures == 1
    assert second.steps == round(daly_interval_s(0.02, 120.0) / 0.1) < first.steps
    assert cadence.retune() is None, "no change, no new interval"
    cadence.saved(blocked_s=0.02, seconds=3.0)  # writes that take 3 s: never more often than that
    cadence.saved(blocked_s=0.02, seconds=3.0)
    assert cadence.retune().steps == 30


def test_the_snapshot_interval_is_a_power_of_two_from_young_and_daly() -> None:
    from orchestrator.controller.cadence import MemoryCadence, daly_interval_s

    now = [0.0]
    cadence = MemoryCadence(prior_mtbf_s=3600.0, clock=lambda: now[0])
    assert cadence.steps == 1 and cadence.retune() is None, "nothing measured: a snapshot every step"
    for _ in range(5):
        cadence.stepped(0.06)
        cadence.snapshotted(0.0012)
    rare = cadence.retune()  # the prior MTBF: sqrt(2 x 1.2 ms x 3600 s) = 2.9 s, 49 steps of 60 ms
    assert (rare.steps, rare.mtbf_s, rare.failures) == (64, 3600.0, 0)
    assert cadence.retune() is None, "no change, no new interval"
    now[0] = 60.0
    cadence.failed()
    often = cadence.retune()  # one failure a minute: 0.38 s, 6.3 steps
    assert daly_interval_s(0.0012, 60.0) / 0.06 == pytest.approx(6.3, abs=0.1)
    assert (often.steps, often.mtbf_s, often.failures) == (8, 60.0, 1)
    now[0] = 220.0  # best 12.1 steps: nearer 16 than 8, but not far enough past the midpoint to flap
    assert cadence.retune() is None
    for _ in range(20):
        cadence.snapshotted(0.000001)  # nearly free: every step
    assert cadence.retune().steps == 1


def test_the_controller_tells_every_rank_the_snapshot_interval_rank_0s_costs_call_for(tmp_path: Path) -> None:
    ctl, group, run, clock = make(tmp_path, "checkpoint.memory_interval_steps=auto", "train.steps=30")
    ctl.step()
    costly = [dataclasses.replace(step_msg(s, 5.0), extra={"snapshot_s": 0.002}) for s in (1, 2, 3)]
    group.script = [[RankUpdate(rank=0, reports=costly), RankUpdate(rank=1, reports=[step_msg(3, 5.0)])]]
    ctl.step()
    assert group.memory_intervals == [32], "sqrt(2 x 2 ms x 3600 s) / 0.1 s = 38 steps: 2 ** round(5.2)"
    tuned = [e for e in read_events(run.events) if e["event"] == "memory_interval"]
    assert [(e["interval_steps"], e["snapshot_cost_s"], e["failures"]) for e in tuned] == [(32, 0.002, 0)]


@pytest.mark.parametrize(("source", "counted"), [("memory", 0), ("disk", 1)])
def test_the_disk_checkpoint_interval_counts_only_failures_memory_did_not_recover(
    tmp_path: Path, source: str, counted: int
) -> None:
    ctl, group, run, clock = make(tmp_path, "checkpoint.interval_steps=auto", "train.steps=30")
    ctl.step()
    _recover_from_rank_1_killed_after_step_2(ctl, group, clock)
    group.script = [[RankUpdate(rank=0, reports=[Resumed(step=2, tag="", source=source, at=clock.now),
                                                 step_msg(3, 2.0, at=clock.now)])]]
    ctl.step()
    (finished,) = of_kind(read_events(run.events), "recovery_finished")
    assert finished["source"] == source
    assert ctl._cadence._failures == counted


def test_a_script_that_ends_before_it_shows_it_is_back_still_has_its_recovery_finished(tmp_path: Path) -> None:
    ctl, group, run, clock = make(tmp_path, "train.script=train.py")
    ctl.step()
    group.script = [[RankUpdate(rank=0, alive_at=clock.now), RankUpdate(rank=1, returncode=-9, exited_at=clock.now)]]
    ctl.step()
    ctl.step()  # recover: a full restart
    clock.now += 3  # well within SCRIPT_UP_S: the restarted script finishes before it would count as back
    group.script = [[RankUpdate(rank=r, reports=[Finished(at=clock.now)], returncode=0) for r in (0, 1)]]
    while not ctl.state.terminal:
        ctl.step()
    evs = read_events(run.events)
    assert [e["event"] for e in evs][-2:] == ["recovery_finished", "run_finished"]
    assert (evs[-2]["signal"], evs[-2]["attempt"], evs[-1]["status"]) == ("finished", 1, "succeeded")


@pytest.mark.parametrize(("overrides", "shown"), [
    (("train.script=train.py",), ["[rank 0] hello", "[rank 0] epoch 1"]),  # auto: rank 0's, for a script
    (("train.script=train.py", "train.show_output=all"), ["[rank 0] hello", "[rank 0] epoch 1", "[rank 1] other"]),
    (("train.script=train.py", "train.show_output=none"), []),
    ((), []),  # auto: nothing for a training function, which reports steps
])
def test_the_ranks_own_output_reaches_the_terminal_as_train_show_output_says(
    tmp_path: Path, overrides: tuple[str, ...], shown: list[str]
) -> None:
    ctl, group, run, clock = make(tmp_path, *overrides)
    ctl.step()
    (run.logs / "rank0.log").write_text("=== rank 0 attempt 0: forked from the zygote ===\nhello\nepoch 1\npart")
    (run.logs / "rank1.log").write_text("other\n")
    ctl.step()
    ctl.step()
    assert [n for n in ctl.display.notes if n.startswith("[rank")] == shown, "whole lines, once, no headers"


def test_a_preemption_saves_a_few_steps_ahead_then_ends_preempted_without_spending_a_restart(tmp_path: Path) -> None:
    """SIGUSR1 or SIGTERM (the CLI's handler asks, the loop calls ``preempt``): every rank is told one
    step to save at, past rank 0's last by at least half a second of steps; once that checkpoint is
    committed the run ends ``preempted``, naming it, with no restart and no failure counted."""
    ctl, group, run, _ = make(tmp_path, "train.steps=100", "fault_tolerance.max_restarts=0")
    group.script = [[RankUpdate(rank=0, reports=[step_msg(s, 1.0) for s in range(1, 8)]), RankUpdate(rank=1)]]
    ctl.step()
    ctl.step()
    ctl.preempt("SIGUSR1")
    assert group.saves_requested == [12], "7 + max(2 steps, 0.5 s of 0.1 s steps)"
    assert isinstance(ctl.state, Preempting)
    stage(run, 12)
    group.script = [[RankUpdate(rank=0), RankUpdate(rank=1)], [saved(12)]]
    ctl.step()
    assert isinstance(ctl.state, Preempting), "not before the checkpoint asked for is committed"
    ctl.step()
    assert isinstance(ctl.state, Preempted)
    last = read_events(run.events)[-1]
    assert (last["event"], last["status"], last["reason"], last["checkpoint"]) == (
        "run_finished", "preempted", "SIGUSR1", "global_step12")
    assert (last["restarts"], last["failures_by_reason"]) == (0, {})


def test_a_preemption_ends_at_a_failure_or_its_deadline_without_counting_either(tmp_path: Path) -> None:
    """A rank that dies while a SIGUSR1's checkpoint is awaited ends the wait, as the deadline does;
    neither is a failure of the run."""
    ctl, group, run, clock = make(tmp_path, "train.steps=100", "fault_tolerance.preempt_timeout_s=5")
    group.script = [[RankUpdate(rank=0, reports=[step_msg(3, 1.0)]), RankUpdate(rank=1)]]
    ctl.step()
    ctl.step()
    ctl.preempt("SIGUSR1")
    group.script = [[RankUpdate(rank=0), RankUpdate(rank=1, returncode=-15)]]
    ctl.step()
    assert isinstance(ctl.state, Preempted)
    last = read_events(run.events)[-1]
    assert (last["status"], last.get("checkpoint"), last["failures_by_reason"]) == ("preempted", None, {})
    assert "failure_detected" not in kinds(run)

    # A checkpoint asked for and never committed: stopped at the deadline.
    ctl, group, run, clock = make(tmp_path / "deadline", "train.steps=100", "fault_tolerance.preempt_timeout_s=5")
    group.script = [[RankUpdate(rank=0, reports=[step_msg(3, 1.0)]), RankUpdate(rank=1)]]
    ctl.step()
    ctl.step()
    asked_at = clock.now
    ctl.preempt("SIGTERM")
    assert group.saves_requested == [8]
    while not ctl.state.terminal:
        ctl.step()
    assert isinstance(ctl.state, Preempted) and 5 <= clock.now - asked_at < 6

    # Nothing can be asked before any step (where the ranks will be is not known): stopped at once.
    ctl, group, run, clock = make(tmp_path / "early", "train.steps=100", "fault_tolerance.preempt_timeout_s=5")
    ctl.step()
    asked_at = clock.now
    ctl.preempt("SIGTERM")
    ctl.step()
    assert isinstance(ctl.state, Preempted) and group.saves_requested == [] and clock.now - asked_at < 1


def test_failures_that_come_with_a_preemption_are_the_preemption_not_a_failure(tmp_path: Path) -> None:
    """Slurm signals every process of the job at once: a node's ranks may be seen dying before the
    controller's own SIGTERM is handled. Asked for while those failures settle, the preemption wins:
    no failure_detected, no restart, ``preempted`` (here with no restart left, which would fail the run)."""
    ctl, group, run, _ = make(tmp_path, "train.steps=100", "fault_tolerance.max_restarts=0")
    group.script = [[RankUpdate(rank=0, reports=[step_msg(3, 1.0)]), RankUpdate(rank=1)],
                    [RankUpdate(rank=0), RankUpdate(rank=1, returncode=-15)]]
    ctl.step()
    ctl.step()
    ctl.request_preemption("SIGTERM")  # as the handler does, in the middle of the step that sees rank 1 die
    ctl.step()
    assert isinstance(ctl.state, Preempting) and group.saves_requested == []
    assert "the ranks save where they are" in ctl.display.notes[-1]
    ctl.step()
    assert isinstance(ctl.state, Preempting), "a SIGTERM took the agents too: the ranks save alone"
    assert "failure_detected" not in kinds(run)


def test_a_checkpoint_the_ranks_saved_alone_is_committed_from_their_reports(tmp_path: Path) -> None:
    """Slurm's SIGTERM took the node agents: the ranks saved alone and left their reports next to their
    files (worker/stop_signal.py). The controller, whose calls to the agents fail, commits from those
    reports and ends ``preempted`` with that checkpoint, before its deadline."""
    ctl, group, run, clock = make(tmp_path, "train.steps=100", "fault_tolerance.preempt_timeout_s=20")
    group.script = [[RankUpdate(rank=0, reports=[step_msg(s, 1.0) for s in range(1, 6)]), RankUpdate(rank=1)]]
    ctl.step()
    ctl.step()
    ctl.preempt("SIGTERM")
    group.script = [[RankUpdate(rank=0, lost="the node agent is gone"), RankUpdate(rank=1, lost="the node agent is gone")]]
    ctl.step()
    assert isinstance(ctl.state, Preempting)
    stage(run, 7)
    staged = store.staging_dir(run.checkpoints, 0) / "global_step7"
    for rank in (0, 1):
        store.write_saved_report(staged, rank, CheckpointSaved(
            step=7, tag="global_step7", attempt=0, blocked_s=0.01, write_s=0.1,
            files={"shard.pt": {"size": 1, "sha256": SHA_OF_X}} if rank == 0 else {}))
    started = clock.now
    while not ctl.state.terminal:
        ctl.step()
    assert clock.now - started < 1
    last = read_events(run.events)[-1]
    assert (last["status"], last["reason"], last["checkpoint"]) == ("preempted", "SIGTERM", "global_step7")
    assert (run.checkpoints / "global_step7" / "manifest.json").exists()
    assert "failure_detected" not in kinds(run)
