"""Goodput: the share of wall time spent on training steps that count, and where the rest went.

Pure bookkeeping over the run's events; the controller feeds it every event
it emits. Productive time is the step time of each step the first time it
is trained. Badput causes:

- ``startup``: from the start until the first step began (imports, Ray, rendezvous, load);
- ``checkpoint``: training blocked by saves (the longest rank, per save);
- ``failure_detection``: from a failure until the controller noticed it;
- ``recovery``: from then until the first step after the recovery began;
- ``lost_work``: steps trained again after a recovery (work since the last checkpoint);
- ``other``: the rest (the loop between steps, logging, waits).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from orchestrator.events import CheckpointCommitted, Event, FailureDetected, RunFinished, RunStarted, Step

CAUSES = ("startup", "checkpoint", "failure_detection", "recovery", "lost_work", "other")


@dataclass(frozen=True)
class GoodputReport:
    """Totals up to a moment."""

    wall_s: float
    productive_s: float
    badput_s: dict[str, float]

    @property
    def ratio(self) -> float:
        return self.productive_s / self.wall_s if self.wall_s > 0 else 0.0


class GoodputTracker:
    """Feed it events in order with :meth:`on_event`; read totals with :meth:`report`."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._end: float | None = None
        self._productive = 0.0
        self._badput: Counter[str] = Counter()
        self._high_water = 0
        self._waiting_first_step = True
        self._recovering_since: float | None = None

    def on_event(self, event: Event) -> None:
        ts = event.ts
        match event:
            case RunStarted():
                self._start, self._end = ts, None
                self._high_water = max(self._high_water, event.resumed_from_step)
                self._waiting_first_step = True
            case Step():
                began = ts - event.step_time_s
                if self._waiting_first_step and self._start is not None:
                    self._badput["startup"] += max(0.0, began - self._start)
                    self._waiting_first_step = False
                if self._recovering_since is not None:
                    self._badput["recovery"] += max(0.0, began - self._recovering_since)
                    self._recovering_since = None
                if event.step > self._high_water:
                    self._productive += event.step_time_s
                    self._high_water = event.step
                else:
                    self._badput["lost_work"] += event.step_time_s
            case CheckpointCommitted():
                self._badput["checkpoint"] += event.blocked_s
            case FailureDetected(root_cause=True):
                self._badput["failure_detection"] += max(0.0, event.detection_s)
                self._recovering_since = ts
            case RunFinished():
                self._end = ts

    def report(self, now: float) -> GoodputReport:
        if self._start is None:
            return GoodputReport(wall_s=0.0, productive_s=0.0, badput_s={c: 0.0 for c in CAUSES})
        wall = (self._end or now) - self._start
        badput = {cause: self._badput[cause] for cause in CAUSES if cause != "other"}
        badput["other"] = max(0.0, wall - self._productive - sum(badput.values()))
        return GoodputReport(wall_s=wall, productive_s=self._productive, badput_s=badput)
