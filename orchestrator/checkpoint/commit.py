"""The controller's half of a checkpoint: commit once every rank's files are durable.

A rank reports ``checkpoint_saved`` (its files, sizes and checksums) when
its background writer has fsynced them into the attempt's staging
directory; its node's agent folds its ranks' reports into one
(:class:`~orchestrator.messages.NodeSaved`). When all ranks have reported, the controller

1. writes ``manifest.json`` into the staged directory (temp file, fsync, rename),
2. renames the staged directory to ``checkpoints/TAG`` and fsyncs ``checkpoints/``,
3. replaces ``latest`` atomically, then emits ``checkpoint_committed`` and prunes.

A crash between any two of these leaves either no new checkpoint (staging
is removed at the next start) or a complete one, and ``latest`` always
names a complete checkpoint.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import events as ev
from orchestrator.checkpoint import store
from orchestrator.checkpoint.manifest import FileEntry, Manifest, fsync_dir
from orchestrator.config.schema import Config
from orchestrator.events import EventLog
from orchestrator.messages import CheckpointFailed, NodeSaved


@dataclass(frozen=True, kw_only=True)
class CommitOutcome:
    """What became of a report: a checkpoint committed, or a save that failed (and why)."""

    tag: str
    committed: bool
    message: str = ""
    blocked_s: float = 0.0  # committed: the longest any rank's training was blocked by this save
    seconds: float = 0.0  # committed: the slowest rank's save, blocked and background write


@dataclass(kw_only=True)
class _Saves:
    """The nodes' save reports of one checkpoint so far, and the ranks they cover."""

    reports: list[NodeSaved] = field(default_factory=list)
    ranks: set[int] = field(default_factory=set)


class CommitTracker:
    """Collects the nodes' save reports for the current attempt; commits, announces and prunes."""

    def __init__(self, checkpoints: Path, config: Config, world_size: int, events: EventLog) -> None:
        self._checkpoints = checkpoints
        self._config = config
        self._world_size = world_size
        self._events = events
        self._saved: dict[str, _Saves] = defaultdict(_Saves)
        self._failed: set[str] = set()
        self.attempt = 0
        self.last_committed: str | None = None
        self.in_use: str | None = None

    def saved(self, report: NodeSaved) -> CommitOutcome | None:
        """Record a node's save report (some of its ranks' parts of one checkpoint); commits when it
        brought the last ranks missing."""
        tag = report.tag
        if report.attempt != self.attempt or tag in self._failed:
            return None  # a save of an attempt that was abandoned, or one another rank failed
        saves = self._saved[tag]
        saves.reports.append(report)
        saves.ranks.update(report.ranks)
        if len(saves.ranks) < self._world_size:
            return None
        reports = self._saved.pop(tag).reports
        try:
            manifest = self._commit(tag, reports)
        except OSError as exc:
            return self._fail(tag, report.step, None, exc.filename or str(self._checkpoints), _reason(exc))
        seconds, blocked_s = max(r.blocked_s + r.write_s for r in reports), max(r.blocked_s for r in reports)
        self._events.emit(ev.CheckpointCommitted(step=manifest.step, path=str(self._checkpoints / tag), seconds=seconds,
                                                 blocked_s=blocked_s, bytes=manifest.total_bytes))
        try:
            store.prune(self._checkpoints, self._config.checkpoint.keep_last, protect={tag, self.in_use or tag})
        except OSError as exc:  # the commit stands; an old checkpoint is kept a while longer
            self._events.emit(ev.RunWarning(message=f"could not remove an old checkpoint in {self._checkpoints}: "
                                            f"{exc.strerror or exc} ({exc.filename or ''}); it is kept, remove it by hand"))
        return CommitOutcome(tag=tag, committed=True, blocked_s=blocked_s, seconds=seconds)

    def failed(self, rank: int, report: CheckpointFailed) -> CommitOutcome | None:
        """Record that ``rank`` could not write its part of a checkpoint: it will never be committed."""
        if report.attempt != self.attempt or report.tag in self._failed:
            return None
        self._saved.pop(report.tag, None)
        return self._fail(report.tag, report.step, rank, report.path, report.error)

    def resize(self, config: Config, world_size: int) -> None:
        """The job goes on as ``config`` on ``world_size`` ranks (a shrink): later commits wait for that many."""
        self._config, self._world_size = config, world_size
        self._saved.clear()

    def forget_partial(self, next_attempt: int) -> None:
        """A new attempt starts: saves the old one did not finish will never be committed."""
        self._saved.clear()
        self._failed.clear()
        self.attempt = next_attempt

    def _commit(self, tag: str, reports: list[NodeSaved]) -> Manifest:
        staged = store.staging_dir(self._checkpoints, self.attempt) / tag
        files = {name: FileEntry(**entry) for r in reports for name, entry in r.files.items()}
        config = self._config
        manifest = Manifest(
            tag=tag,
            step=store.step_of(tag),
            world_size=self._world_size,
            data_parallel_size=config.data_parallel_size,
            tensor_parallel=config.parallel.tensor_parallel,
            zero_stage=config.parallel.zero_stage,
            global_batch=config.global_batch,
            files=files,
            config=config.redacted_dump(),
            created=time.time(),
        )
        manifest.write(staged)
        target = self._checkpoints / tag
        # A committed directory of the same step can only be a damaged one skipped at start.
        store.discard(target, self._checkpoints)
        os.rename(staged, target)
        script = staged.parent / "zero_to_fp32.py"
        if script.exists():
            os.replace(script, self._checkpoints / script.name)
        fsync_dir(self._checkpoints)
        store.set_latest(self._checkpoints, tag)
        self.last_committed = tag
        return manifest

    def _fail(self, tag: str, step: int, rank: int | None, path: str, reason: str) -> CommitOutcome:
        self._failed.add(tag)
        store.discard(store.staging_dir(self._checkpoints, self.attempt) / tag, self._checkpoints)
        where = f"rank {rank}" if rank is not None else "the controller"
        message = f"checkpoint {tag} not saved: {where} could not write {path}: {reason}"
        self._events.emit(ev.CheckpointFailed(step=step, rank=rank, path=path, error=reason, message=message))
        return CommitOutcome(tag=tag, committed=False, message=message)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
