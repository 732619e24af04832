"""The controller's half of a checkpoint: commit once every rank has saved its shards."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from orchestrator.checkpoint import store
from orchestrator.monitor.events import EventLog


class CommitTracker:
    """Collects per-rank ``checkpoint_saved`` reports; commits, announces and prunes when all are in."""

    def __init__(self, directory: Path, world_size: int, keep_last: int, events: EventLog) -> None:
        self._directory = directory
        self._world_size = world_size
        self._keep_last = keep_last
        self._events = events
        self._saved: dict[str, dict[int, float]] = defaultdict(dict)
        self.last_committed: str | None = store.committed_tag(directory)

    def saved(self, rank: int, tag: str, seconds: float) -> bool:
        """Record that ``rank`` saved ``tag``; returns True when this completed and committed it."""
        ranks = self._saved[tag]
        ranks[rank] = seconds
        if len(ranks) < self._world_size:
            return False
        del self._saved[tag]
        store.commit(self._directory, tag)
        self.last_committed = tag
        self._events.emit(
            "checkpoint_committed",
            step=store.step_of(tag),
            path=str(self._directory / tag),
            seconds=max(ranks.values()),
        )
        store.prune(self._directory, self._keep_last)
        return True

    def forget_partial(self) -> None:
        """Drop saves some rank did not finish (it failed): they will never be committed."""
        self._saved.clear()
