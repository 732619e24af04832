"""The controller's states. Each ``step`` does one unit of work and returns the next state.

    STARTING -> RUNNING -> SUCCEEDED
                 ^    \\
                 |     +-> FAILED           (policy: not retryable, or budget spent)
                 |     \\
                 +---- RECOVERING           (policy: retry, in place or full restart)

    any non-terminal state -> PREEMPTING -> PREEMPTED   (SIGUSR1 or SIGTERM: Controller.preempt)

States decide, from what the controller observed and what the failure
policy says; the :class:`~orchestrator.controller.controller.Controller`
does (starts, signals and replaces processes, writes events). Tests drive
one ``Controller.step()`` at a time against a fake worker group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from orchestrator.controller.failures import Failure
from orchestrator.controller.policy import Decision

if TYPE_CHECKING:
    from orchestrator.controller.controller import Controller


class State:
    """Base state: not terminal, ``step`` must be overridden."""

    name: ClassVar[str]
    terminal: ClassVar[bool] = False

    def step(self, ctl: Controller) -> State:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class Starting(State):
    """Start every rank from the latest committed checkpoint."""

    name = "STARTING"

    def step(self, ctl: Controller) -> State:
        ctl.start_workers()
        return Running()


class Running(State):
    """Watch the ranks until all finish or some fail; then ask the policy."""

    name = "RUNNING"

    def step(self, ctl: Controller) -> State:
        failures = ctl.observe()
        if failures:
            ctl.stop_hung(failures)
            failures = ctl.settle(failures)
            if (preempting := ctl.preempted_meanwhile()) is not None:
                return preempting  # the scheduler's stop reached some ranks before it reached us
            decision = ctl.decide(failures)
            if decision.retry:
                return Recovering(failures=failures, decision=decision)
            return Failed(failures=failures, reason=decision.reason)
        if ctl.all_finished():
            return Succeeded()
        ctl.wait()
        return self


@dataclass(repr=False)
class Recovering(State):
    """Replace the failed ranks (in place, or every rank) and resume from the latest commit."""

    name: ClassVar[str] = "RECOVERING"
    failures: list[Failure] = field(default_factory=list)
    decision: Decision | None = None

    def step(self, ctl: Controller) -> State:
        assert self.decision is not None
        ctl.recover(self.failures, self.decision)
        return Running()


@dataclass(repr=False)
class Preempting(State):
    """The scheduler wants the job stopped (``reason``: the signal): wait for the checkpoint of step
    ``save_at`` (None: none was asked for) until ``deadline``, then stop. Failures meanwhile are the
    same signal reaching ranks, not failures of the run: they end the wait, unless the ranks may save
    ``alone`` (a SIGTERM, which took their agents too: then their own checkpoint is awaited)."""

    name: ClassVar[str] = "PREEMPTING"
    reason: str = ""
    save_at: int | None = None
    alone: bool = False
    deadline: float = 0.0

    def step(self, ctl: Controller) -> State:
        failures = ctl.observe()
        if ctl.all_finished() and not failures:
            return Succeeded()
        if self.alone:
            ctl.absorb_saved_alone()
        if ((failures and not self.alone) or ctl.preempt_saved(self.save_at)
                or ctl.now() >= self.deadline):
            return Preempted(reason=self.reason)
        ctl.wait(fast=True)
        return self


@dataclass(repr=False)
class Preempted(State):
    """Stopped by the scheduler; the next launch (a requeue) resumes from the last committed checkpoint."""

    name: ClassVar[str] = "PREEMPTED"
    terminal: ClassVar[bool] = True
    reason: str = ""


class Succeeded(State):
    """Every rank finished training."""

    name = "SUCCEEDED"
    terminal = True


@dataclass(repr=False)
class Failed(State):
    """The run failed: ``failures`` of the last episode (root cause among them), and why it was not retried."""

    name: ClassVar[str] = "FAILED"
    terminal: ClassVar[bool] = True
    failures: list[Failure] = field(default_factory=list)
    reason: str = ""
