"""``checkpoint.interval_steps: auto``: how often to checkpoint, from what the run measures.

Saving too often spends training time on saves; too rarely, recomputing the steps lost to a failure.
Young (1974) and Daly (2006) give the interval that minimises both for a save that blocks training
``δ`` seconds and a mean time between failures ``M``: ``T = sqrt(2·δ·M) − δ`` (``M`` once ``δ`` reaches
``2·M``). Here ``δ`` is the median time the last saves blocked training (the slowest rank's, as
``checkpoint_committed`` reports it), ``M`` the run's time so far over its failures that were not
recovered from memory snapshots (those cost no disk checkpoint anything), or
``checkpoint.mtbf_s`` while there have been none (at least the time the run has lasted), and ``T`` is
turned into steps with the median of the recent step times. It is never shorter than a save takes
from start to commit (an asynchronous save's write included): saves would queue up behind each other.

Until the first save has been measured, ranks save every ``FIRST_CHECKPOINT_INTERVAL`` steps. The
controller tells rank 0, which decides for every rank (``TrainContext.should_checkpoint``).

``checkpoint.memory_interval_steps: auto`` is the same rule for memory snapshots: ``δ`` is the time
a snapshot blocks rank 0 (it reports it with its steps), ``M`` the same, and the interval is a
power of two steps, so that every rank snapshots at every step of the longer of two intervals
while a change reaches them (each rank is told; no collective decides a snapshot). Until the
first snapshot has been measured, every step.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.messages import FIRST_CHECKPOINT_INTERVAL

_RECENT_SAVES = 9
_RECENT_STEPS = 20
# A new interval is sent only when it differs from the one in force by more than this: every
# commit measures a slightly different cost, and rank 0 need not hear of each.
_CHANGE = 0.25
# The snapshot interval moves to another power of two when the best interval is this far from the one
# in force, in powers of two (0.5 would follow every wobble across a midpoint).
_POWER_CHANGE = 0.75


def daly_interval_s(save_cost_s: float, mtbf_s: float) -> float:
    """The checkpoint interval, in seconds of training, that loses the least time (Daly's first order)."""
    if save_cost_s >= 2 * mtbf_s:
        return mtbf_s
    return math.sqrt(2 * save_cost_s * mtbf_s) - save_cost_s


@dataclass(frozen=True, kw_only=True)
class Interval:
    """An interval chosen, and what it was chosen from."""

    steps: int
    save_cost_s: float
    mtbf_s: float
    step_time_s: float
    failures: int


class _Cadence:
    """Step times and failures seen since the run began: what an interval is chosen from."""

    def __init__(self, prior_mtbf_s: float, clock: Callable[[], float]) -> None:
        self._prior_mtbf_s = prior_mtbf_s
        self._clock = clock
        self._started = clock()
        self._steps: deque[float] = deque(maxlen=_RECENT_STEPS)
        self._failures = 0

    def stepped(self, step_time_s: float | None) -> None:
        if step_time_s is not None and step_time_s > 0:
            self._steps.append(step_time_s)

    def failed(self) -> None:
        self._failures += 1

    def _mtbf_s(self) -> float:
        elapsed = self._clock() - self._started
        return elapsed / self._failures if self._failures else max(self._prior_mtbf_s, elapsed)


class CheckpointCadence(_Cadence):
    """Collects save costs, step times and failures; says when the interval should change."""

    def __init__(self, prior_mtbf_s: float, clock: Callable[[], float]) -> None:
        super().__init__(prior_mtbf_s, clock)
        self._saves: deque[tuple[float, float]] = deque(maxlen=_RECENT_SAVES)
        self.steps = FIRST_CHECKPOINT_INTERVAL  # the interval in force

    def saved(self, blocked_s: float, seconds: float) -> None:
        """A checkpoint committed: training blocked ``blocked_s``, and it took ``seconds`` to commit."""
        self._saves.append((blocked_s, seconds))

    def retune(self) -> Interval | None:
        """The new interval, when what was measured moves it by more than 25%; else None."""
        if not self._saves or not self._steps:
            return None
        mtbf = self._mtbf_s()
        cost = statistics.median(blocked for blocked, _ in self._saves)
        whole = statistics.median(seconds for _, seconds in self._saves)
        step = statistics.median(self._steps)
        steps = max(1, round(daly_interval_s(cost, mtbf) / step), math.ceil(whole / step))
        if abs(steps - self.steps) <= _CHANGE * self.steps:
            return None
        self.steps = steps
        return Interval(steps=steps, save_cost_s=cost, mtbf_s=mtbf, step_time_s=step, failures=self._failures)


class MemoryCadence(_Cadence):
    """``checkpoint.memory_interval_steps: auto``: snapshot costs, step times and failures; a power of
    two steps between snapshots."""

    def __init__(self, prior_mtbf_s: float, clock: Callable[[], float]) -> None:
        super().__init__(prior_mtbf_s, clock)
        self._costs: deque[float] = deque(maxlen=_RECENT_STEPS)
        self.steps = 1  # the interval in force

    def snapshotted(self, blocked_s: float) -> None:
        """A snapshot blocked rank 0 ``blocked_s`` seconds."""
        self._costs.append(blocked_s)

    def retune(self) -> Interval | None:
        """The new interval, when the best one has moved well past the power of two in force (not
        back and forth across the midpoint between two as the measurements wobble); else None."""
        if not self._costs or not self._steps:
            return None
        mtbf = self._mtbf_s()
        cost = statistics.median(self._costs)
        step = statistics.median(self._steps)
        best = math.log2(max(1.0, daly_interval_s(cost, mtbf) / step))
        if abs(best - math.log2(self.steps)) <= _POWER_CHANGE:
            return None
        steps = 2 ** round(best)
        self.steps = steps
        return Interval(steps=steps, save_cost_s=cost, mtbf_s=mtbf, step_time_s=step, failures=self._failures)
