"""The controller: runs the state machine over a worker group and records what happens.

It owns the run's bookkeeping: the event log, the progress display, what
each rank last did, which checkpoint is committed, the failure history and
restart counters. Processes are only ever touched through the
:class:`~orchestrator.controller.worker_group.WorkerGroup`. When to look for hung
ranks is :class:`~orchestrator.controller.hang_watch.HangWatch`'s, what is told of
the nodes (layout, networks, spares) :class:`~orchestrator.controller.node_news.NodeNews`'.

Read it in the order a run goes: ``prepare`` (which checkpoint), then the
states (``states.py``) call ``start_workers``, ``observe`` (poll, absorb, find
failures), ``settle``, ``decide`` and ``recover``; the bookkeeping they share
comes after.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import events as ev
from orchestrator.checkpoint import resume, store
from orchestrator.checkpoint.commit import CommitOutcome, CommitTracker
from orchestrator.checkpoint.manifest import Manifest
from orchestrator.config.schema import Config
from orchestrator.controller import hangs
from orchestrator.controller.cadence import CheckpointCadence, Interval, MemoryCadence
from orchestrator.controller.failures import Failure, failure_from, one_per_rank, rank_ranges, root_cause
from orchestrator.controller.hang_watch import HangWatch
from orchestrator.controller.node_news import NodeNews
from orchestrator.controller.policy import Attempt, Decision, FailurePolicy, shrunk_config
from orchestrator.controller.states import Failed, Preempted, Preempting, Running, Starting, State, Succeeded
from orchestrator.controller.views import Move, Phase, Process, RankView
from orchestrator.controller.worker_group import RankUpdate, WorkerGroup, WorkerInfo
from orchestrator.events import EventLog
from orchestrator.messages import (
    CheckpointFailed,
    CheckpointSkipped,
    Error,
    FaultInjected,
    Finished,
    NodeBeat,
    NodeLeft,
    NodeSaved,
    Report,
    Resumed,
    Saving,
    ScriptCheckpoint,
    Step,
)
from orchestrator.monitor.gpu_endpoint import TargetsFile
from orchestrator.monitor.metrics import JobMetrics, RankSample
from orchestrator.monitor.progress import ProgressDisplay
from orchestrator.monitor.rank_output import RankOutput
from orchestrator.run_dir import RunDir

# Steady state: every poll costs the agents and Ray CPU that training could use. While a
# failure is being handled, poll fast.
POLL_INTERVAL_S = 0.2
FAST_POLL_INTERVAL_S = 0.02
# After the first failure, keep listening this long for its consequences (peers' collective errors).
SETTLE_S = 0.5
# A script that reports nothing is back after a restart once every rank has run this long, its call
# stack still moving (changed within SCRIPT_MOVING_S): a restart that stalls is not a recovery.
SCRIPT_UP_S = 10.0
SCRIPT_MOVING_S = 2.0
# Lines of a failed rank's log (or traceback) shown with a failure the run recovers from.
_NOTE_LINES = 6
# A preemption's checkpoint is asked for this far ahead of rank 0's last step (in steps, and in time):
# every rank must hear of the step before it gets there.
_PREEMPT_AHEAD_STEPS = 2
_PREEMPT_AHEAD_S = 0.5
# A step event's own fields: a user's extra metric of the same name cannot overwrite them.
_STEP_FIELDS = frozenset(f.name for f in dataclasses.fields(ev.Step)) | {"event"}


@dataclass(frozen=True, kw_only=True)
class PendingRecovery:
    """A recovery waiting for its first step (or, for a script that reports none, for its ranks to stay up)."""

    attempt: int
    mode: str
    resumed_from_step: int | None
    detected_at: float
    started_at: float
    replaced: list[int]
    reached_step: int | None  # the last step reported before the failure
    source: str | None  # what the ranks restored from: disk or memory (a script: None, its own affair)


def _rank_output(config: Config, logs: Path, world_size: int, display: ProgressDisplay) -> RankOutput | None:
    """Whose output ``train.show_output`` puts on the terminal (None: nobody's)."""
    show = config.train.show_output
    if show == "auto":
        show = "rank0" if config.train.is_script else "none"
    if show == "none":
        return None
    return RankOutput(logs, [0] if show == "rank0" else list(range(world_size)), display)


class Controller:
    """Drives one job from STARTING to SUCCEEDED or FAILED, recovering failures on the way."""

    def __init__(
        self,
        config: Config,
        run: RunDir,
        group: WorkerGroup,
        events: EventLog,
        display: ProgressDisplay,
        *,
        faults: list[dict[str, Any]] | None = None,
        metrics: JobMetrics | None = None,
        gpu_targets: TargetsFile | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.run_dir = run
        self.group = group
        self.events = events
        self.display = display
        self.state: State = Starting()
        self.attempt = 0
        self.last_step: int | None = None
        self.last_loss: float | None = None
        self.last_heldout_loss: float | None = None  # the last evaluation.heldout_bytes loss reported
        self.total_steps: int | None = config.train.steps if config.train.is_builtin else None
        self._steps_reported = False
        self.faults = list(faults or [])
        # A script owns its process group: its survivors cannot leave it and rejoin a new one.
        self.policy = FailurePolicy(
            max_restarts=config.fault_tolerance.max_restarts,
            prefer="full_restart" if config.train.is_script else config.fault_tolerance.recovery,
        )
        self.history: list[Attempt] = []
        self.failures_by_reason: Counter[str] = Counter()
        self.restarts_by_reason: Counter[str] = Counter()
        self._sleep = sleep
        self._clock = clock
        self._views: dict[int, RankView] = {}
        ft = config.fault_tolerance
        limits = hangs.Limits(hang_timeout_s=ft.hang_timeout_s, stuck_timeout_s=ft.stuck_timeout_s,
                              heartbeat_s=group.heartbeat_s)
        self._hangs = HangWatch(group, limits, config.cluster.workers_per_node, every_s=POLL_INTERVAL_S, clock=clock)
        self._nodes = NodeNews(config, group, events, display, metrics, gpu_targets, clock)
        self._pending: PendingRecovery | None = None
        self._spares_started = False
        self._attempt_started_at = 0.0
        self._commits = CommitTracker(run.checkpoints, config, group.world_size, events)
        self._output = _rank_output(config, run.logs, group.world_size, display)
        self._cadence = (CheckpointCadence(config.checkpoint.mtbf_s, clock)
                         if config.checkpoint.interval_steps == "auto" else None)
        self._memory_cadence = (MemoryCadence(config.checkpoint.mtbf_s, clock)
                                if config.checkpoint.memory_interval_steps == "auto" else None)
        self._checkpoint_failures: list[Failure] = []
        self._preemption: str | None = None  # a preemption asked for, carried out before the next step
        self._saved_alone: set[tuple[int, str]] = set()  # (rank, tag) reports of saves made alone, absorbed
        self.metrics = metrics
        if metrics is not None:
            events.subscribe(metrics.on_event)
            metrics.watch_ranks(self._rank_samples)
        self.resume_tag: str | None = None

    def run(self) -> State:
        """Run to a terminal state; emits ``run_started`` and ``run_finished``."""
        self.prepare()
        while not self.state.terminal:
            if self._preemption is not None:
                self.preempt(self._preemption)
            self.step()
        return self.state

    def request_preemption(self, reason: str) -> None:
        """Ask for :meth:`preempt` before the next step (safe from a signal handler: it only notes it)."""
        self._preemption = reason

    def prepare(self) -> None:
        """Choose the checkpoint to resume from (converted if the layout changed); emits ``run_started``."""
        checkpoints = self.run_dir.checkpoints
        manifest, rejected = resume.select(checkpoints)
        self.last_step = manifest.step if manifest else None
        self.events.emit(ev.RunStarted(
            run_id=self.run_dir.run_id,
            world_size=self.group.world_size,
            resumed_from_step=self.last_step or 0,
            config=self.config.redacted_dump(),
        ))
        for damaged in rejected:
            message = f"checkpoint {damaged.tag} is damaged, not used (moved to {damaged.moved_to}): {damaged.problems[0]}"
            self.events.emit(ev.CheckpointInvalid(step=store.step_of(damaged.tag),
                                                  path=str(checkpoints / damaged.tag), moved_to=str(damaged.moved_to),
                                                  problems=damaged.problems, message=message))
            self.display.note(message)
        if self._cadence is not None:  # the ranks' own first interval: nothing to tell them yet
            self.display.note(f"checkpoint interval: auto, every {self._cadence.steps} steps until a save is measured")
        if manifest is not None:
            resume.prepare(checkpoints, manifest, self.config, self.events)
            self.resume_tag = self._commits.last_committed = self._commits.in_use = manifest.tag
            self.display.note(f"resuming from checkpoint {manifest.tag}")

    def step(self) -> tuple[State, State]:
        """One state-machine iteration: returns (previous, next)."""
        previous = self.state
        self.state = previous.step(self)
        if self.state is not previous and self.state.terminal:
            self._finish(self.state)
        return previous, self.state

    # --- called by states -------------------------------------------------

    def start_workers(self) -> None:
        began = self._clock()
        self._begin_attempt(began, self.group.start(self.attempt, self.resume_tag, self.faults))

    def observe(self) -> list[Failure]:
        """Poll every rank once and record its reports; returns the new failures (hangs included: their
        processes still run until :meth:`stop_hung`)."""
        failures = []
        for update in self.group.poll():
            if isinstance(update, NodeBeat):
                self._absorb_beat(update)
            elif isinstance(update, NodeSaved):
                self._absorb_saved(update)
            elif isinstance(update, NodeLeft):
                failures += self._absorb_left(update)
            elif (failure := self._absorb(update)) is not None:
                failures.append(failure)
        failures += self._hangs.look(self._views)
        failures += self._checkpoint_failures
        self._checkpoint_failures = []
        if not failures:
            self._check_quiet_script()
        self._nodes.look()
        if self._output is not None:
            self._output.look()
        return failures

    def _rank_samples(self) -> list[RankSample]:
        """The ranks for a scrape (on the exporter's thread: the views of the moment, never changed here)."""
        now = self._clock()
        return [RankSample(rank=rank, running=v.running and v.phase is not Phase.FINISHED, age_s=now - v.progress_at,
                           step=v.step or 0, step_time_s=v.step_time_s) for rank, v in list(self._views.items())]

    def settle(self, failures: list[Failure]) -> list[Failure]:
        """Listen briefly for the failure's consequences so the root cause is chosen from all of them.

        A failure that may be the first sign of its whole node dying (a process killed or gone: the
        node's agent sees its ranks die a moment before it dies itself) is not fully known until
        that node's agent has answered a poll sent after it, which proves the node is still there,
        or is found lost (``node_lost``, the true root cause). Each such failure starts that wait
        again for its own node. A peer's collective error is a consequence, not such a sign, and
        starts nothing; nor does a slow agent elsewhere hold the decision. But while collective
        errors are all there is, their cause is not seen yet (a node gone at once, agent and all):
        then every node's agent must answer again, or be found lost.
        """
        suspects = {f.rank for f in failures if f.reason != "exception"}

        def unexplained() -> bool:
            return all(f.reason == "exception" and f.collective for f in failures)

        def awaited() -> Collection[int]:
            """Whose agents must answer: every rank's while collective errors are all there is."""
            return range(self.group.world_size) if unexplained() else suspects

        # Only the agents whose answer is awaited are asked: at 2,048 nodes, asking all is a burst
        # of 2,048 statuses to read while the decision waits. A hang's agents were asked for its
        # verdict, after it was judged: their answers prove their nodes alive as a new request would.
        # While collective errors are all there is, every agent is asked only if one more look does
        # not show their cause: a killed rank's exit often arrives a moment after its peers' errors.
        mark: int | None
        if all(f.reason == "hang" for f in failures):
            mark = self._hangs.verdict_mark
        elif unexplained():
            mark = None
        else:
            mark = self.group.poll_mark(awaited())
        start = self._clock()
        give_up = start + self.config.fault_tolerance.node_timeout_s + SETTLE_S
        # Consequences come within SETTLE_S of the first failure, not of when it was seen here.
        listened = min(start, min(f.at for f in failures)) + SETTLE_S
        looked = False
        while self._clock() < give_up:
            if mark is None and looked:
                mark = self.group.poll_mark(awaited())
            settled = all(v.phase in (Phase.FAILED, Phase.LEFT) or not v.running for v in self._views.values())
            # A hang was judged on its agent's fresh answer: its node lives, and its peers, waiting for
            # it, fail only once it is killed (their errors belong to the attempt that ends now).
            hangs_only = all(f.reason == "hang" for f in failures)
            if (mark is not None and not self.group.unheard(mark, awaited())
                    and (settled or hangs_only or self._clock() >= listened)):
                break
            self.wait(fast=True)
            new = self.observe()
            looked = True
            self.stop_hung(new)
            failures = failures + new
            signs = {f.rank for f in new if f.reason != "exception"}
            if signs:
                suspects |= signs
                mark = self.group.poll_mark(suspects)
        return one_per_rank(failures)

    def decide(self, failures: list[Failure]) -> Decision:
        """Record the failures and ask the policy what to do."""
        cause = root_cause(failures)
        now = self._clock()
        self.failures_by_reason.update(f.reason for f in failures)
        self.events.emit(ev.FailureDetected(attempt=self.attempt, detection_s=max(0.0, now - cause.at),
                                            **cause.event_fields()))
        others = [f for f in failures if f is not cause]
        if others:
            # The rest, however many ranks: one event with its ranks in compact form (and one message
            # per reason), so that an incident at 16,384 ranks stays a few kilobytes.
            by_reason: dict[str, list[Failure]] = {}
            for failure in others:
                by_reason.setdefault(failure.reason, []).append(failure)
            self.events.emit(ev.FailureConsequences(
                attempt=self.attempt, root_rank=cause.rank, count=len(others),
                ranks=rank_ranges([f.rank for f in others]),
                by_reason={reason: rank_ranges([f.rank for f in group]) for reason, group in by_reason.items()},
                messages={reason: group[0].message for reason, group in by_reason.items()},
                detection_s=max(0.0, now - min(f.at for f in others)),
            ))
        if self._memory_cadence is not None:
            self._memory_cadence.failed()
            self._retune_snapshots()
        decision = self.policy.decide(cause, self.history)
        if cause.reason == "node_lost":
            # One line for the node, whatever Ray said about each of its ranks.
            lost = rank_ranges([f.rank for f in failures if f.reason == "node_lost" and f.message == cause.message])
            node, found, why = cause.message.partition(" lost: ")
            what = f"{node} lost with ranks {lost}: {why}" if found else f"{cause.message} (ranks {lost})"
            self.display.note(f"{what}; {decision.reason}")
        else:
            self.display.note(f"rank {cause.rank} failed ({cause.message}); {decision.reason}")
        if decision.retry and cause.details():
            # The run goes on, so the end-of-run report will not show this: its last lines, now.
            tail = cause.details().rstrip().splitlines()[-_NOTE_LINES:]
            self.display.note("\n".join(f"  | {line}" for line in tail))
        return decision

    def recover(self, failures: list[Failure], decision: Decision) -> None:
        """Carry out a retry decision: replace failed ranks, let survivors rejoin, resume from the commit."""
        detected_at = min(f.at for f in failures)
        cause = root_cause(failures)
        if decision.delay_s:
            self._sleep(decision.delay_s)
        replace = self._to_replace(failures, decision)
        survivors = [r for r in range(self.group.world_size) if r not in replace]
        self.group.kill([r for r in replace if self._views[r].running])
        missing = self.group.replace_lost(allow_missing=self.config.fault_tolerance.allow_shrink)
        if missing:
            self.group.kill([r for r in survivors if self._views[r].running])
            self._shrink(missing)
            replace, survivors = set(range(self.group.world_size)), []
        # Survivors still in their training function are interrupted by their agents as the attempt
        # starts and rejoin once they have left it: nobody here waits for them.
        unwinding = [r for r in survivors if not self._views[r].left_training]
        mode = "full_restart" if not survivors else "in_place"
        self.attempt += 1
        self._commits.forget_partial(self.attempt)
        self.resume_tag = self._commits.in_use = self._commits.last_committed
        self.restarts_by_reason[cause.reason] += 1
        self.history.append(Attempt(cause=cause, mode=mode, progressed=False))
        self.events.emit(ev.RecoveryStarted(
            attempt=self.attempt,
            reason=cause.reason,
            mode=mode,
            replaced=sorted(replace),
            rejoined=survivors,
            resume_from=self.resume_tag,
            restarts_left=self.config.fault_tolerance.max_restarts - len(self.history),
        ))
        began = self._clock()
        infos = self.group.start(self.attempt, self.resume_tag, self.faults, rejoin=survivors, interrupt=unwinding)
        self._begin_attempt(began, infos)
        # A script resumes from checkpoints of its own: where, it says when it reports (if it does).
        resumed = None if self.config.train.is_script else store.step_of(self.resume_tag) if self.resume_tag else 0
        self._pending = PendingRecovery(
            attempt=self.attempt,
            mode=mode,
            resumed_from_step=resumed,
            detected_at=detected_at,
            started_at=self._clock(),
            replaced=sorted(replace),
            reached_step=self.last_step,
            source=None if self.config.train.is_script else "disk",
        )

    def _shrink(self, slots: list[int]) -> None:
        """Go on without node slots ``slots`` (lost, nothing took their place): fewer ranks, the same
        global batch, every rank restarted from the last commit (converted for the new layout)."""
        before = self.config
        self.config = config = shrunk_config(before, len(slots))
        self.group.shrink(config, slots)
        self._commits.resize(config, self.group.world_size)
        if self._commits.last_committed is not None:
            manifest = Manifest.read(self.run_dir.checkpoints / self._commits.last_committed)
            resume.prepare(self.run_dir.checkpoints, manifest, config, self.events)
        self.events.emit(ev.WorldShrunk(
            lost_node_slots=sorted(slots),
            nodes=config.cluster.nodes,
            nodes_before=before.cluster.nodes,
            world_size=config.cluster.world_size,
            world_size_before=before.cluster.world_size,
            global_batch=config.global_batch,
            accumulation_steps=config.accumulation_steps(config.data_parallel_size),
        ))
        self.display.note(
            f"going on with {config.cluster.nodes} node(s), {config.cluster.world_size} ranks "
            f"(fault_tolerance.allow_shrink); global batch {config.global_batch} kept by "
            f"{config.accumulation_steps(config.data_parallel_size)} micro-batches a step"
        )

    def all_finished(self) -> bool:
        return bool(self._views) and all(view.phase is Phase.FINISHED for view in self._views.values())

    def wait(self, fast: bool = False) -> None:
        """Until the next look: sooner while a failure is handled or a hang awaits its confirmation,
        and at once (``FAST_POLL_INTERVAL_S`` after the last) when an agent tells of a failure."""
        interval = FAST_POLL_INTERVAL_S if fast or self._hangs.confirming else POLL_INTERVAL_S
        self.group.wait(interval, soonest_s=FAST_POLL_INTERVAL_S)

    def preempt(self, reason: str) -> None:
        """The scheduler wants the job stopped (``reason``: the signal, ``SIGUSR1`` or ``SIGTERM``). A
        training function that checkpoints is told to save a few steps ahead (every rank the same step,
        far enough ahead that each hears of it first); ``run`` then goes on until that checkpoint is
        committed or ``fault_tolerance.preempt_timeout_s`` passes, and ends ``PREEMPTED``. A
        preemption is not a failure: it spends no restart."""
        if self.state.terminal or isinstance(self.state, Preempting):
            return
        self.state = self._preempting(reason, self._preempt_save_step())

    def preempted_meanwhile(self) -> Preempting | None:
        """While failures were being settled, a preemption was asked for: those failures are the same
        stop reaching ranks first (Slurm signals every process of a job at once), not failures of the
        run. No checkpoint is asked for (failed ranks cannot take it); after a SIGTERM the ranks may
        still save one alone (:meth:`absorb_saved_alone`)."""
        if self._preemption is None:
            return None
        return self._preempting(self._preemption, None)

    def _preempting(self, reason: str, save_at: int | None) -> Preempting:
        # A SIGTERM reached every process of the job (as Slurm sends it): the ranks whose agents it took
        # save on their own (worker/stop_signal.py), and leave their reports where absorb_saved_alone looks.
        alone = reason == "SIGTERM" and self._ranks_checkpoint() and self.last_step is not None
        wait_s = self.config.fault_tolerance.preempt_timeout_s
        if save_at is not None:
            self.group.request_save(save_at)
            self.display.note(f"{reason}: preempted; saving a checkpoint at step {save_at}, then stopping every rank")
        elif alone:
            self.display.note(f"{reason}: preempted; waiting up to {wait_s:.0f}s for the checkpoint the ranks save "
                              "where they are, then stopping every rank")
        else:
            kept = self.last_checkpoint or "none"
            self.display.note(f"{reason}: preempted; stopping every rank (the last checkpoint committed: {kept})")
            wait_s = 0.0  # nothing to wait for: stop at the next look
        return Preempting(reason=reason, save_at=save_at, alone=alone, deadline=self._clock() + wait_s)

    def _ranks_checkpoint(self) -> bool:
        """Whether the training function checkpoints through the orchestrator (a script keeps its own; 0
        turns checkpoints off)."""
        return not self.config.train.is_script and self.config.checkpoint.interval_steps != 0

    def absorb_saved_alone(self) -> None:
        """The reports of ranks that saved a checkpoint alone (their agents gone with the scheduler's
        SIGTERM), found next to their files: absorbed as an agent's would be, committed when all are in."""
        for rank, report in store.saved_reports(self.run_dir.checkpoints, self._commits.attempt):
            if (rank, report.tag) in self._saved_alone or rank not in self._views:
                continue
            self._saved_alone.add((rank, report.tag))
            self._absorb_saved(NodeSaved(ranks=[rank], step=report.step, tag=report.tag, attempt=report.attempt,
                                         blocked_s=report.blocked_s, write_s=report.write_s, files=report.files,
                                         at=time.time()))
            if self.last_checkpoint == report.tag:
                # The ranks trained to it without a word to anyone: it is the last step known.
                self.last_step = max(self.last_step or 0, report.step)

    def _preempt_save_step(self) -> int | None:
        """The step every rank saves at on a preemption, or None where none can be asked for: a script
        (it keeps its own checkpoints), checkpoints off, no step trained since the last commit."""
        if not self._ranks_checkpoint() or self.last_step is None or not isinstance(self.state, Running):
            return None  # also while starting or recovering: where the ranks will be is not known yet
        view = self._views.get(0)
        step_s = view.step_time_s if view is not None and view.step_time_s else 0.0
        ahead = max(_PREEMPT_AHEAD_STEPS, math.ceil(_PREEMPT_AHEAD_S / step_s) if step_s else _PREEMPT_AHEAD_STEPS)
        save_at = self.last_step + ahead
        return min(save_at, self.total_steps) if self.total_steps is not None else save_at

    def preempt_saved(self, step: int | None) -> bool:
        """Whether the checkpoint a preemption asked for (of ``step``) is committed, or the one the ranks
        saved alone."""
        tag = self.last_checkpoint
        if tag is None:
            return False
        saved_alone = any(tag == alone for _, alone in self._saved_alone)
        return saved_alone or (step is not None and store.step_of(tag) >= step)

    def now(self) -> float:
        return self._clock()

    @property
    def last_checkpoint(self) -> str | None:
        """The tag of the last checkpoint committed (or resumed from), None before any."""
        return self._commits.last_committed

    def abort(self, reason: str, message: str | None = None) -> None:
        """Record a run ended from outside the state machine: ``interrupted`` (Ctrl-C), ``cluster_error``."""
        self.events.emit(ev.RunFinished(status="failed", reason=reason, message=message or None, **self._totals()))

    # --- bookkeeping --------------------------------------------------------

    def _begin_attempt(self, began: float, infos: list[WorkerInfo]) -> None:
        """The attempt whose start was asked at ``began`` has started ``infos`` (and the rejoining ranks)."""
        self._attempt_started_at = self._clock()
        old = self._views
        # A rank's progress counts from when its start was asked, not from when every node's start was
        # answered: at thousands of ranks that takes seconds, and a fast node's ranks step meanwhile (a
        # rank hung after its first steps was found that much late: 0.5-0.7 s at 16,384 ranks).
        self._views = {r: RankView(progress_at=began, step=old[r].step if r in old else None)
                       for r in range(self.group.world_size)}
        self._hangs.new_attempt()
        self._nodes.attempt_began()
        if self.config.train.is_script and not self._spares_started:
            # A script's spare rehearses nothing (forked, its imports are the zygote's): made at once, it
            # costs the ranks' start-up no CPU, and a failure in the first seconds finds it ready.
            self._spares_started = True
            self.group.ensure_spares()
        for info in infos:
            self.events.emit(ev.WorkerStarted(
                rank=info.rank, pid=info.pid, node=info.node, node_ip=info.node_ip,
                node_id=info.node_id, attempt=info.attempt, spare=info.spare, forked=info.forked,
            ))
        # What lives for the whole attempt (the views, the worker group's books: at 16,384 ranks over a
        # hundred thousand objects) is left out of the collector's full passes, which otherwise took
        # 0.07-0.27 s every few seconds, found nothing, and held up every thread. None of it is in a
        # reference cycle: what is dropped is freed by its reference count as before.
        gc.freeze()

    def _absorb_beat(self, beat: NodeBeat) -> None:
        """A node's beat: its ranks' liveness, and their latest steps of this attempt (a fast node's first
        steps may finish before every node's start was answered). Thousands a second at scale: one pass,
        which also notes the oldest progress or sign of life of the node's ranks (for the hang watch)."""
        views, attempt, starting = self._views, self.attempt, Phase.STARTING  # a member looked up once, not per rank
        oldest = float("inf")
        for rank, alive_at, moved_at, where, in_collective, step, step_at, step_time_s, step_attempt in zip(
                beat.ranks, beat.alive_at, beat.moved_at, beat.where, beat.in_collective, beat.step, beat.step_at,
                beat.step_time_s, beat.step_attempt):
            view = views[rank]
            view.alive_at, view.moved_at, view.where, view.in_collective = alive_at, moved_at, where, in_collective
            if step is not None and step_attempt == attempt:
                view.step, view.step_time_s = step, step_time_s
                if view.phase is starting:
                    view.advance(Move.STEPPED)
                view.progressed(step_at)
            # Comparisons, not min(): its call costs about as much as the rest of this loop's turn.
            if view.progress_at < oldest:
                oldest = view.progress_at
            if alive_at < oldest:
                oldest = alive_at
        self._hangs.node_beat(beat.ranks, oldest)

    def _absorb_saved(self, saved: NodeSaved) -> None:
        """A node's ranks saved their parts of a checkpoint (progress: a rank saving is not hung)."""
        for rank in saved.ranks:
            self._views[rank].progressed(saved.at)
        self._on_checkpoint(saved.ranks[0], self._commits.saved(saved))

    def _absorb_left(self, left: NodeLeft) -> list[Failure]:
        """A node's ranks that left with errors that are consequences: each as its own ``Error`` report."""
        if 0 <= left.attempt != self.attempt:
            return []
        return [failure for rank, error in left.errors()
                if (failure := self._absorb(RankUpdate(rank=rank, reports=[error]))) is not None]

    def _absorb(self, update: RankUpdate) -> Failure | None:
        view = self._views[update.rank]
        if update.alive_at is not None:
            view.alive_at, view.where, view.in_collective = update.alive_at, update.where, update.in_collective
            view.moved_at = update.moved_at
        for report in update.reports:
            self._on_report(update.rank, view, report)
        if update.returncode is not None:
            view.process_ended(lost=False)
            if update.returncode == 0:
                view.advance(Move.FINISHED)
        if update.lost is not None:
            already_lost = view.process is Process.LOST
            view.process_ended(lost=True)
            if view.phase is Phase.FAILED and not already_lost:
                # It died with its node: the node, not the process, is the failure.
                return failure_from(update, view.error, view.step, last_seen=view.alive_at)
        if view.ended:
            return None
        error = view.error if view.error and not view.error.interrupted else None
        if update.returncode is None and update.lost is None and error is None:
            return None
        failure = failure_from(update, error, view.step, last_seen=view.alive_at)
        if failure is not None:
            view.advance(Move.FAILED)
        return failure

    def _on_report(self, rank: int, view: RankView, report: Report) -> None:
        if 0 <= report.attempt != self.attempt:
            return  # of another attempt: how a survivor left the last one, or made before this one began
        match report:
            case Step() | Resumed():
                view.step = report.step
                view.progressed(report.at)
                view.advance(Move.STEPPED)
                if isinstance(report, Step):
                    view.step_time_s = report.step_time_s
                    if rank == 0:
                        self._record_step(report)
                elif rank == 0:
                    self.last_step = report.step
                    if self._pending is not None and self.config.train.is_script:
                        # A script's resume is its first word after a restart; the built-in workload's
                        # recovery ends with its first step.
                        self._finish_recovery(self._pending, "resumed", report.step)
                    elif self._pending is not None:  # restored from memory, or from the disk checkpoint
                        self._pending = dataclasses.replace(self._pending, resumed_from_step=report.step,
                                                            source=report.source)
            case ScriptCheckpoint():
                view.progressed(report.at)
                if rank == 0:
                    self.events.emit(ev.CheckpointSaved(step=report.step, path=report.path, by="script"))
                    self.display.note(f"the script saved a checkpoint at step {report.step}: {report.path}")
            case CheckpointFailed():
                view.progressed(report.at)
                self._on_checkpoint(rank, self._commits.failed(rank, report))
            case CheckpointSkipped():
                if rank == 0:
                    self.events.emit(ev.CheckpointSkipped(step=report.step, reason="previous save still writing"))
            case Saving():
                view.progressed(report.at)  # busy writing a checkpoint, not hung
            case Error():
                view.error = report
                view.advance(Move.LEFT)
            case Finished():
                view.advance(Move.FINISHED)
            case FaultInjected():
                fired = {"kind": report.kind, "rank": report.rank, "step": report.step}
                self.faults = [f for f in self.faults if f != fired]
                self.events.emit(ev.FaultInjected(**fired))

    def _on_checkpoint(self, rank: int, outcome: CommitOutcome | None) -> None:
        if outcome is None:
            return
        if outcome.committed:
            self.display.note(f"checkpoint {outcome.tag} committed")
            if self._cadence is not None:
                self._cadence.saved(outcome.blocked_s, outcome.seconds)
                self._retune_checkpoints()
            return
        self.display.note(outcome.message)
        if self.config.checkpoint.on_failure == "stop":
            self._checkpoint_failures.append(
                Failure(rank=rank, reason="checkpoint", at=self._clock(), step=store.step_of(outcome.tag),
                        message=outcome.message)
            )

    def _retune_checkpoints(self) -> None:
        """``checkpoint.interval_steps: auto``: a new interval, once what was measured moves it."""
        self._retune(self._cadence, self.group.set_checkpoint_interval, lambda i: ev.CheckpointInterval(
            interval_steps=i.steps, save_cost_s=i.save_cost_s, mtbf_s=i.mtbf_s, step_time_s=i.step_time_s,
            failures=i.failures), lambda i: f"checkpoint interval: every {i.steps} steps (auto: a save blocks "
            f"{i.save_cost_s:.3f}s, a step takes {i.step_time_s:.3f}s, MTBF {i.mtbf_s:.0f}s)")

    def _retune_snapshots(self) -> None:
        """``checkpoint.memory_interval_steps: auto``: a new interval, once what was measured moves it."""
        self._retune(self._memory_cadence, self.group.set_memory_interval, lambda i: ev.MemoryInterval(
            interval_steps=i.steps, snapshot_cost_s=i.save_cost_s, mtbf_s=i.mtbf_s, step_time_s=i.step_time_s,
            failures=i.failures), lambda i: f"memory snapshots: every {i.steps} steps (auto: a snapshot blocks "
            f"{i.save_cost_s * 1000:.1f} ms, a step takes {i.step_time_s:.3f}s, MTBF {i.mtbf_s:.0f}s)")

    def _retune(self, cadence: CheckpointCadence | MemoryCadence, tell: Callable[[int], None],
                event: Callable[[Interval], ev.Event], note: Callable[[Interval], str]) -> None:
        interval = cadence.retune()
        if interval is None:
            return
        tell(interval.steps)
        self.events.emit(event(interval))
        self.display.note(note(interval))

    def stop_hung(self, failures: list[Failure]) -> None:
        """Kill the processes of the hung ranks among ``failures``: their peers, waiting for them in a
        collective, then fail at once, which the settle hears."""
        if hung := [f.rank for f in failures if f.reason == "hang"]:
            self.group.kill(hung)

    def _check_quiet_script(self) -> None:
        """For a script that has reported no step in this run: call a restart recovered once every rank
        has stayed up ``SCRIPT_UP_S`` and is still moving."""
        if not self.config.train.is_script or self._steps_reported:
            return
        now = self._clock()
        up_s = now - self._attempt_started_at
        if not all(v.running and v.phase is not Phase.FAILED for v in self._views.values()):
            return
        moving = all(v.moved_at is not None and now - v.moved_at <= SCRIPT_MOVING_S for v in self._views.values())
        if self._pending is not None and up_s >= SCRIPT_UP_S and moving:
            self._finish_recovery(self._pending, "alive", None)

    def _to_replace(self, failures: list[Failure], decision: Decision) -> set[int]:
        """Ranks that get a new process: the failed ones (but not survivors that only saw a peer's failure)."""
        if decision.mode == "full_restart":
            return set(range(self.group.world_size))
        cause = root_cause(failures)
        replace = {r for r, v in self._views.items() if not v.running}
        for failure in failures:
            if failure.reason != "exception" or failure is cause:
                replace.add(failure.rank)
        return replace

    def _record_step(self, report: Step) -> None:
        step, loss, seconds = report.step, report.loss, report.step_time_s
        rate = report.tokens / seconds if report.tokens and seconds > 0 else None
        if self._cadence is not None:
            self._cadence.stepped(seconds)
        if self._memory_cadence is not None:
            self._memory_cadence.stepped(seconds)
            if isinstance(cost := report.extra.get("snapshot_s"), float):
                self._memory_cadence.snapshotted(cost)
                self._retune_snapshots()
        if self.config.train.show_output == "auto":
            self._output = None  # the progress line takes over from the ranks' own output
        self.events.emit(ev.Step(
            step=step, loss=loss, step_time_s=seconds, tokens_per_s=rate, lr=report.lr, grad_norm=report.grad_norm,
            flops=report.flops, heldout_loss=report.extra.get("heldout_loss"),
            extra={k: v for k, v in report.extra.items() if k not in _STEP_FIELDS},
        ))
        self._steps_reported = True
        self.last_step = step
        if loss is not None:
            self.last_loss = loss
        if isinstance(report.extra.get("heldout_loss"), float):
            self.last_heldout_loss = report.extra["heldout_loss"]
        if report.total is not None:
            self.total_steps = report.total
        self.display.step(step, self.total_steps, loss, rate)
        if self._pending is not None:
            self._finish_recovery(self._pending, "step", step - 1)
        elif not self._spares_started:
            # Not before: the nodes' zygotes would compete with the ranks' start-up for the CPU.
            self._spares_started = True
            self.group.ensure_spares()

    def _finish_recovery(self, pending: PendingRecovery, signal: str, resumed_at: int | None) -> None:
        """``signal``: what showed the ranks back (``step``, ``resumed``, or ``alive`` for a script
        that reports nothing); ``resumed_at``: the step training went on from, as that showed it.
        The nodes' spares are made again."""
        self._recovered(pending, signal, resumed_at)
        self._spares_started = True
        self.group.ensure_spares()

    def _recovered(self, pending: PendingRecovery, signal: str, resumed_at: int | None) -> None:
        seconds = self._clock() - pending.detected_at
        resumed = pending.resumed_from_step if pending.resumed_from_step is not None else resumed_at
        known = pending.reached_step is not None and resumed is not None
        lost = max(0, pending.reached_step - resumed) if known else None
        self.events.emit(ev.RecoveryFinished(
            attempt=pending.attempt,
            resumed_from_step=resumed,
            mode=pending.mode,
            seconds=seconds,
            replaced=pending.replaced,
            signal=signal,
            source=pending.source,
            steps_lost=lost,
        ))
        where = f"from step {resumed}" if resumed is not None else "(the script did not say from which step)"
        if pending.source is not None:
            where += f" ({pending.source}, {lost} step(s) lost)" if lost is not None else f" ({pending.source})"
        self.display.note(f"recovered ({pending.mode}, attempt {pending.attempt}) {where} in {seconds:.2f}s")
        if self._cadence is not None and pending.source != "memory":
            # A failure recovered from memory snapshots cost no disk checkpoint anything.
            self._cadence.failed()
            self._retune_checkpoints()
        self.history[-1] = dataclasses.replace(self.history[-1], progressed=True)
        self._pending = None

    def _totals(self) -> dict[str, Any]:
        return {
            "step": self.last_step,
            "final_loss": self.last_loss,
            "heldout_loss": self.last_heldout_loss,
            "restarts": sum(self.restarts_by_reason.values()),
            "restarts_by_reason": dict(self.restarts_by_reason),
            "failures_by_reason": dict(self.failures_by_reason),
        }

    def _finish(self, state: State) -> None:
        if isinstance(state, Succeeded):
            if self._pending is not None:  # a script that finished before it had shown it was back
                self._recovered(self._pending, "finished", None)
            self.events.emit(ev.RunFinished(status="succeeded", **self._totals()))
            return
        if isinstance(state, Preempted):
            tag = self.last_checkpoint
            self.events.emit(ev.RunFinished(status="preempted", reason=state.reason, checkpoint=tag, **self._totals()))
            return
        assert isinstance(state, Failed)
        self.events.emit(ev.RunFinished(
            status="failed", reason=state.reason, root_cause=root_cause(state.failures).event_fields(),
            **self._totals(),
        ))
