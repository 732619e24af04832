"""When the controller looks for hung ranks, and when it may call them hung.

Which ranks hang is :mod:`orchestrator.controller.hangs`' pure verdict on the views. This keeps what
that verdict needs over time: how recently each node's ranks were heard from (its beats'), so that a
look visits only the ranks of nodes gone quiet; and the confirmation a verdict waits for: a rank's
liveness and steps arrive with its node's heartbeat, seconds old, so suspects' agents are asked for
fresh statuses first, and the suspects are called hung only once those answered (or ``CONFIRM_S``
passed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.controller import hangs
from orchestrator.controller.failures import Failure
from orchestrator.controller.views import Move, RankView
from orchestrator.controller.worker_group import WorkerGroup

# How long a hang's verdict waits for the suspects' agents to answer (they answer at once; one that
# does not is on a node being lost, which its own timeout decides).
CONFIRM_S = 1.0


@dataclass(frozen=True, kw_only=True)
class Confirming:
    """Hung ranks' agents asked (request ``mark``) for fresh statuses before the verdict."""

    mark: int
    ranks: set[int]
    asked_at: float


class HangWatch:
    """Finds hung ranks among the controller's views, for ``group``'s nodes of ``per_node`` ranks."""

    def __init__(self, group: WorkerGroup, limits: hangs.Limits, per_node: int, *, every_s: float,
                 clock: Callable[[], float]) -> None:
        """Looks ``every_s`` apart: a look visits only the ranks of nodes not heard from within
        ``hang_timeout_s`` (none, mostly): 0.3 ms at 16,384 ranks."""
        self._group = group
        self._every_s = every_s
        self._limits = limits
        self._per_node = per_node
        self._clock = clock
        # Node slot -> a time at or before every one of its ranks' last progress and sign of life, as of
        # its last beat (progress only moves on): a look skips nodes heard from since the limit.
        self._node_heard: dict[int, float] = {}
        self._checked_at = float("-inf")
        self._confirming: Confirming | None = None
        self.verdict_mark = 0  # the request whose answers confirmed the last hang

    @property
    def confirming(self) -> bool:
        """Whether suspects' fresh statuses are awaited (the controller then looks sooner)."""
        return self._confirming is not None

    def new_attempt(self) -> None:
        """Forget what the last attempt's beats said: every rank is looked at until every node beat."""
        self._node_heard = {}

    def node_beat(self, ranks: list[int], oldest: float) -> None:
        """A beat of ``ranks`` came whose oldest progress or sign of life is ``oldest``: if they are a
        whole node slot's, that node has nothing stale until ``oldest`` + ``hang_timeout_s``."""
        per_node = self._per_node
        if len(ranks) == per_node and ranks[0] % per_node == 0:
            self._node_heard[ranks[0] // per_node] = oldest

    def look(self, views: dict[int, RankView]) -> list[Failure]:
        """The ranks found hung, confirmed (their views moved to FAILED; their processes still run); none
        between looks ``every_s`` apart, unless a verdict awaits its confirmation."""
        now = self._clock()
        if self._confirming is None and now - self._checked_at < self._every_s:
            return []
        self._checked_at = now
        culprits = hangs.culprits(views, now, self._limits, self.candidates(now, len(views)))
        if not self._confirmed(culprits, now):
            return []
        failures = []
        for rank in culprits:
            view = views[rank]
            failures.append(Failure(rank=rank, reason="hang", at=now, step=view.step,
                                    message=hangs.why(view, now, self._limits)))
            view.advance(Move.FAILED)
        return failures

    def candidates(self, now: float, ranks: int) -> list[int] | None:
        """Of ``ranks`` ranks, those that may be stale: those of nodes not heard from within
        ``hang_timeout_s`` (a node whose oldest progress or sign of life is newer has none); None (every
        rank) until every node's beat came in this attempt."""
        per_node = self._per_node
        if len(self._node_heard) * per_node != ranks:
            return None
        since = now - self._limits.hang_timeout_s
        stale = sorted(slot for slot, heard in self._node_heard.items() if heard < since)  # nearly always none
        return [rank for slot in stale for rank in range(slot * per_node, (slot + 1) * per_node)]

    def _confirmed(self, culprits: list[int], now: float) -> bool:
        """Whether hung ``culprits`` may be called hung: once their agents have answered a request for
        fresh statuses, or ``CONFIRM_S`` after it."""
        if not culprits:
            self._confirming = None
            return False
        if self._confirming is None or not set(culprits) <= self._confirming.ranks:
            self._confirming = Confirming(mark=self._group.poll_mark(culprits), ranks=set(culprits), asked_at=now)
            return False
        if self._group.unheard(self._confirming.mark, culprits) and now - self._confirming.asked_at < CONFIRM_S:
            return False
        self.verdict_mark, self._confirming = self._confirming.mark, None
        return True
