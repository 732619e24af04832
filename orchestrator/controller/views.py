"""What the controller knows of each rank in the current attempt: its phase and its process, each an
enum moved only by :meth:`RankView.advance` and :meth:`RankView.process_ended`.

    STARTING --stepped--> TRAINING --left--> LEFT
        \\________________\\___________\\--finished--> FINISHED
         \\________________\\___________\\--failed--> FAILED

FINISHED and FAILED end a rank's attempt: nothing moves it out of them (a failure stands whatever its
process does next; a finished rank's later exit or lost node is no failure). LEFT is a rank that left
its training function (it raised, or waits for the decision) while its process lives on for a rejoin.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from orchestrator.messages import Error


class Phase(enum.Enum):
    STARTING = "starting"  # no step yet in this attempt: imports, rendezvous, engine set-up
    TRAINING = "training"  # reported a step (or its resume) in this attempt
    LEFT = "left"  # left its training function and waits, its process alive
    FINISHED = "finished"  # finished training
    FAILED = "failed"  # a failure of this attempt was recorded for it


class Move(enum.Enum):
    STEPPED = "stepped"
    LEFT = "left"
    FINISHED = "finished"
    FAILED = "failed"


class Process(enum.Enum):
    RUNNING = "running"
    EXITED = "exited"  # its exit status is known
    LOST = "lost"  # its node (or the node's agent) is gone


_NEXT: dict[tuple[Phase, Move], Phase] = {
    (Phase.STARTING, Move.STEPPED): Phase.TRAINING,
    (Phase.TRAINING, Move.STEPPED): Phase.TRAINING,
    (Phase.LEFT, Move.STEPPED): Phase.LEFT,  # a heartbeat's step, older than the news that it left
    **{(phase, Move.LEFT): Phase.LEFT for phase in (Phase.STARTING, Phase.TRAINING, Phase.LEFT)},
    **{(phase, Move.FINISHED): Phase.FINISHED for phase in (Phase.STARTING, Phase.TRAINING, Phase.LEFT)},
    **{(phase, Move.FAILED): Phase.FAILED for phase in (Phase.STARTING, Phase.TRAINING, Phase.LEFT)},
}


@dataclass(kw_only=True, slots=True)
class RankView:
    """One rank in the current attempt: its phase and process, its progress and liveness as last heard."""

    progress_at: float
    phase: Phase = Phase.STARTING
    process: Process = Process.RUNNING
    step: int | None = None
    step_time_s: float | None = None
    alive_at: float | None = None
    moved_at: float | None = None
    where: str = ""
    in_collective: bool = False
    error: Error | None = None  # what it raised in this attempt

    def advance(self, move: Move) -> None:
        """The one way the phase changes; a move that does not apply (anything once the attempt
        ended for the rank) leaves it as it is."""
        self.phase = _NEXT.get((self.phase, move), self.phase)

    def progressed(self, at: float) -> None:
        """It made progress (a step, a save) at ``at``; progress never goes back: news that arrives late
        (a report behind a newer beat) leaves the later time."""
        if at > self.progress_at:
            self.progress_at = at

    def process_ended(self, lost: bool) -> None:
        """Its exit status arrived (``lost``: its node did); a lost process stays lost."""
        if self.process is not Process.LOST:
            self.process = Process.LOST if lost else Process.EXITED

    @property
    def running(self) -> bool:
        return self.process is Process.RUNNING

    @property
    def ended(self) -> bool:
        """Its attempt is over: it finished or failed."""
        return self.phase in (Phase.FINISHED, Phase.FAILED)

    @property
    def training(self) -> bool:
        """Running and still in its training function: the ranks hang detection watches."""
        return self.running and self.phase in (Phase.STARTING, Phase.TRAINING)

    @property
    def left_training(self) -> bool:
        """It left its training function: it reported why (it is tearing down, then waits for the
        decision, which may be sent to it meanwhile) or is already waiting."""
        return self.phase is Phase.LEFT or self.error is not None
