"""The controller: runs the state machine over a worker group and records what happens.

It owns the run's bookkeeping: the event log, the progress display, which
ranks finished, which checkpoint is committed. Processes are only ever
touched through the :class:`~orchestrator.controller.worker_group.WorkerGroup`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from orchestrator.checkpoint import store
from orchestrator.checkpoint.commit import CommitTracker
from orchestrator.config.schema import Config
from orchestrator.controller.failures import Failure, failure_from, root_cause
from orchestrator.controller.states import Failed, Starting, State, Succeeded
from orchestrator.controller.worker_group import WorkerGroup
from orchestrator.monitor.events import EventLog
from orchestrator.monitor.progress import ProgressDisplay
from orchestrator.run_dir import RunDir

POLL_INTERVAL_S = 0.05


class Controller:
    """Drives one job from STARTING to SUCCEEDED or FAILED."""

    def __init__(
        self,
        config: Config,
        run: RunDir,
        group: WorkerGroup,
        events: EventLog,
        display: ProgressDisplay,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.run_dir = run
        self.group = group
        self.events = events
        self.display = display
        self.state: State = Starting()
        self.attempt = 0
        self.last_step = 0
        self.last_loss: float | None = None
        self._sleep = sleep
        self._finished: set[int] = set()
        self._errors: dict[int, dict[str, Any]] = {}
        self._commits = CommitTracker(
            run.checkpoints, group.world_size, config.checkpoint.keep_last, events
        )
        self.resume_tag = self._commits.last_committed

    def run(self) -> State:
        """Run to a terminal state; emits ``run_started`` and ``run_finished``."""
        resumed = store.step_of(self.resume_tag) if self.resume_tag else 0
        self.last_step = resumed
        self.events.emit(
            "run_started",
            run_id=self.run_dir.run_id,
            world_size=self.group.world_size,
            resumed_from_step=resumed,
            config=self.config.model_dump(mode="json"),
        )
        if self.resume_tag:
            self.display.note(f"resuming from checkpoint {self.resume_tag}")
        while not self.state.terminal:
            self.step()
        return self.state

    def step(self) -> tuple[State, State]:
        """One state-machine iteration: returns (previous, next)."""
        previous = self.state
        self.state = previous.step(self)
        if self.state is not previous and self.state.terminal:
            self._finish(self.state)
        return previous, self.state

    # --- called by states -------------------------------------------------

    def start_workers(self) -> None:
        self._finished.clear()
        self._errors.clear()
        for info in self.group.start(self.attempt, self.resume_tag):
            self.events.emit("worker_started", rank=info.rank, pid=info.pid, node=info.node, attempt=info.attempt)

    def stop_workers(self) -> float:
        """Stop every rank; returns when the stop began."""
        began = time.time()
        self.group.stop()
        return began

    def observe(self) -> list[Failure]:
        """Poll every rank once, record its reports; returns the failures seen."""
        failures = []
        for update in self.group.poll():
            for message in update.messages:
                self._absorb(update.rank, message)
            if update.returncode == 0:
                self._finished.add(update.rank)
            failure = failure_from(update, self._errors.get(update.rank))
            if failure is not None:
                failures.append(failure)
        return failures

    def all_finished(self) -> bool:
        return len(self._finished) == self.group.world_size

    def wait(self) -> None:
        self._sleep(POLL_INTERVAL_S)

    def abort(self, reason: str, message: str | None = None) -> None:
        """Record a run ended from outside the state machine: ``interrupted`` (Ctrl-C, SIGTERM), ``cluster_error``."""
        extra = {"message": message} if message else {}
        self.events.emit(
            "run_finished", status="failed", reason=reason, step=self.last_step, final_loss=self.last_loss, **extra
        )

    # --- bookkeeping --------------------------------------------------------

    def _absorb(self, rank: int, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "step" and rank == 0:
            self._record_step(message)
        elif kind == "checkpoint_saved":
            if self._commits.saved(rank, message["tag"], message["seconds"]):
                self.display.note(f"checkpoint {message['tag']} committed")
        elif kind == "resumed" and rank == 0:
            self.display.note(f"rank 0 resumed at step {message['step']}")
        elif kind == "error":
            self._errors[rank] = message
        elif kind == "finished":
            self._finished.add(rank)

    def _record_step(self, message: dict[str, Any]) -> None:
        step, loss, seconds = message["step"], message["loss"], message["step_time_s"]
        tokens = message.get("tokens")
        rate = tokens / seconds if tokens and seconds > 0 else None
        extra = {k: message[k] for k in ("lr", "grad_norm") if k in message}
        self.events.emit("step", step=step, loss=loss, step_time_s=seconds, tokens_per_s=rate, **extra)
        self.last_step, self.last_loss = step, loss
        self.display.step(step, self.config.train.steps, loss, rate)

    def _finish(self, state: State) -> None:
        if isinstance(state, Succeeded):
            self.events.emit("run_finished", status="succeeded", step=self.last_step, final_loss=self.last_loss)
            return
        assert isinstance(state, Failed)
        cause = root_cause(state.failures)
        for failure in sorted(state.failures, key=lambda f: f.at):
            self.events.emit("failure_detected", root_cause=failure is cause, **failure.event_fields())
        self.events.emit(
            "run_finished",
            status="failed",
            step=self.last_step,
            final_loss=self.last_loss,
            root_cause=cause.event_fields(),
        )
