"""The controller's states. Each ``step`` does one unit of work and returns the next state.

    STARTING -> RUNNING -> SUCCEEDED
                       \\-> FAILED

States decide; the :class:`~orchestrator.controller.controller.Controller`
they are given does (starts processes, writes events). Tests drive one
``Controller.step()`` at a time against a fake worker group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from orchestrator.controller.failures import Failure, first_per_rank

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
    """Watch the ranks until all finish or one fails."""

    name = "RUNNING"

    def step(self, ctl: Controller) -> State:
        failures = ctl.observe()
        if failures:
            # Collect the survivors' consequent errors too, so the root cause is chosen from all;
            # what happened after our own stop (SIGTERM exits) is not a failure.
            stopped_at = ctl.stop_workers()
            late = [f for f in ctl.observe() if f.at < stopped_at]
            return Failed(failures=first_per_rank(failures + late))
        if ctl.all_finished():
            return Succeeded()
        ctl.wait()
        return self


class Succeeded(State):
    """Every rank finished training."""

    name = "SUCCEEDED"
    terminal = True


@dataclass(repr=False)
class Failed(State):
    """The run failed; ``failures`` holds every rank's failure, the root cause among them."""

    name: ClassVar[str] = "FAILED"
    terminal: ClassVar[bool] = True
    failures: list[Failure] = field(default_factory=list)
