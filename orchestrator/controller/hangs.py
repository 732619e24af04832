"""Which ranks hang: a pure function of the ranks' views and the time now.

A rank is stale when it makes no progress: no step for ``hang_timeout_s`` once it reported one;
before that (starting up, or a script that reports none), a call stack unchanged for
``stuck_timeout_s``; and, either way, no sign of life at all for ``hang_timeout_s``. Of the stale
ranks, the culprits are those that are frozen (no sign of life: SIGSTOP, a stuck interpreter) or
not waiting in a collective (stuck in their own code): a rank waiting in a collective waits for
the culprit, which becomes stale a moment later (it stopped moving after they started waiting).
Only when every rank waits, and nothing else failed that they could be waiting for, are all suspect.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from orchestrator.controller.views import Phase, Process, RankView

# No sign of life (not even the once-a-second liveness beat) for this long beyond the node's
# heartbeat (which brings it): the process is frozen.
FROZEN_AFTER_S = 3.0


@dataclass(frozen=True, kw_only=True)
class Limits:
    hang_timeout_s: float
    stuck_timeout_s: float
    heartbeat_s: float  # how old a live rank's liveness may be when it reaches the controller

    @property
    def frozen_after_s(self) -> float:
        # Silent past hang_timeout_s is frozen whatever the heartbeat; a user who sets it below
        # FROZEN_AFTER_S + heartbeat trusts liveness to arrive sooner than that.
        return min(FROZEN_AFTER_S + self.heartbeat_s, self.hang_timeout_s)

    def of(self, view: RankView) -> float:
        """How long ``view`` may go without progress."""
        return self.hang_timeout_s if view.phase is Phase.TRAINING else max(self.hang_timeout_s, self.stuck_timeout_s)


def idle_s(view: RankView, now: float) -> float:
    """Since its last progress: a step (or save), or before its first, its call stack moving."""
    moved = view.progress_at if view.phase is Phase.TRAINING else max(view.progress_at, view.moved_at or 0.0)
    return now - moved


def silent_s(view: RankView, now: float) -> float:
    """Since its last sign of life of any kind."""
    return now - (view.alive_at if view.alive_at is not None else view.progress_at)


def culprits(views: Mapping[int, RankView], now: float, limits: Limits,
             candidates: Collection[int] | None = None) -> list[int]:
    """The hung ranks to kill, in rank order (none while only ranks waiting for a peer are stale).

    ``candidates``: the only ranks that may be stale (the others made progress and showed life within
    ``hang_timeout_s``); None: any rank. It runs twice a second, so :func:`idle_s`, :func:`silent_s`
    and :meth:`Limits.of` are written out inline here (10 ms at 16,384 ranks where calling them takes
    20): a change to one of them is a change here too (``tests/test_hangs.py`` checks both)."""
    hang, before_step = limits.hang_timeout_s, max(limits.hang_timeout_s, limits.stuck_timeout_s)
    frozen_after = limits.frozen_after_s
    watched, stale, found, any_failed = 0, [], [], False
    for rank in views if candidates is None else candidates:
        v = views[rank]
        phase = v.phase
        if phase is Phase.FAILED:
            any_failed = True
        if v.process is not Process.RUNNING or (phase is not Phase.TRAINING and phase is not Phase.STARTING):
            continue
        watched += 1
        silent = now - (v.alive_at if v.alive_at is not None else v.progress_at)
        if phase is Phase.TRAINING:
            idle_too_long = now - v.progress_at > hang
        else:
            idle_too_long = now - max(v.progress_at, v.moved_at or 0.0) > before_step
        if idle_too_long or silent > hang:
            stale.append(rank)
            if silent > frozen_after or not v.in_collective:
                found.append(rank)
    if not found and stale and len(stale) == watched and not any_failed:
        if candidates is not None and len(candidates) < len(views):
            return culprits(views, now, limits)  # "every rank waits" is a statement about every rank
        found = stale
    return found


def why(view: RankView, now: float, limits: Limits) -> str:
    """The failure message of a culprit."""
    if silent_s(view, now) > limits.frozen_after_s:
        return f"no sign of life for {silent_s(view, now):.1f}s (stopped or frozen)"
    if view.phase is Phase.TRAINING:
        return f"no step for {idle_s(view, now):.1f}s (limit {limits.of(view):g}s); main thread at {view.where}"
    return (f"its main thread has been blocked for {idle_s(view, now):.1f}s (call stack unchanged, no CPU used; "
            f"limit {limits.of(view):g}s, before any reported step); main thread at {view.where}")
