"""Copy a DeepSpeed save into host memory, so training can go on while it is written.

:class:`SnapshotEngine` is a DeepSpeed checkpoint engine: ``engine.save_checkpoint``
hands it each file's state dict, and instead of writing it copies every tensor
into a host buffer and keeps the file for the background writer. Buffers are
reused from one save to the next (a page-faulting fresh allocation costs
about as much as the copy itself); at most one save is in flight, so a
buffer is never overwritten while it is being written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (
    CheckpointCommitInfo,
    CheckpointEngine,
)


class SnapshotEngine(CheckpointEngine):
    """Collects ``(path, host copy of the state)`` for each file DeepSpeed saves."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "OrchestratorSnapshotEngine"
        self._files: list[tuple[Path, Any]] = []
        self._buffers: dict[tuple[str, ...], torch.Tensor] = {}
        self._pinned = torch.cuda.is_available()

    def create(self, info: CheckpointCommitInfo) -> None:
        self._files = []

    def save(self, state_dict: Any, path: str) -> None:
        self._files.append((Path(path), self._copy(state_dict, (os.path.basename(path),))))

    def load(self, path: str, map_location: Any = None) -> Any:
        # Trusted-only: unpickles DeepSpeed's files (see docs/checkpoints.md).
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        if self._pinned:
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return True

    def preserves_storage_sharing(self) -> bool:
        # DeepSpeed would clone every tensor before save(); the snapshot copies them once itself.
        return False

    def take(self) -> list[tuple[Path, Any]]:
        """The files of the save that just finished; the engine starts empty again."""
        files, self._files = self._files, []
        return files

    def _copy(self, item: Any, key: tuple[str, ...]) -> Any:
        if torch.is_tensor(item):
            return self._copy_tensor(item, key)
        if isinstance(item, dict):
            return type(item)({k: self._copy(v, (*key, str(k))) for k, v in item.items()})
        if isinstance(item, (list, tuple)):
            copied = [self._copy(v, (*key, str(i))) for i, v in enumerate(item)]
            return copied if isinstance(item, list) else tuple(copied)
        return item

    def _copy_tensor(self, tensor: torch.Tensor, key: tuple[str, ...]) -> torch.Tensor:
        tensor = tensor.detach()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self._pinned)
            self._buffers[key] = buffer
        buffer.copy_(tensor, non_blocking=self._pinned)
        return buffer


def install(engine: Any) -> SnapshotEngine:
    """Make ``engine`` save through a :class:`SnapshotEngine` (once; later calls return it)."""
    current = engine.checkpoint_engine
    if not isinstance(current, SnapshotEngine):
        current = SnapshotEngine()
        engine.checkpoint_engine = current
    return current
