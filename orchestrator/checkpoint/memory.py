"""A rank's training state in host memory: taken every few steps, restored without touching disk.

:func:`capture` names what a DeepSpeed engine needs to go on exactly where it
was: for ZeRO stages 1 and 2 (any precision) the optimizer's own state dict
(this rank's shard of fp32 master weights and optimizer moments, the loss
scaler) with the engine's counters and learning-rate schedule; for an engine
without ZeRO, the module's and the torch optimizer's state dicts. The model's
working (bf16, fp16 or fp32) weights are not copied: a restore recomputes them
from the master shards and all-gathers them, as DeepSpeed does after every step.

:class:`HostSnapshots` keeps the two newest snapshots of a rank, each packed in
one reusable host buffer (pinned on a GPU node) with every tensor at an aligned
offset, so that a snapshot costs one copy per tensor, no allocation, and its
bytes can be mirrored to a peer as they are (``worker/mirror.py``).
"""

from __future__ import annotations

import copy
import random
import threading
from dataclasses import dataclass, field
from typing import Any

_ALIGN = 64  # bytes: any dtype's view of an aligned offset is valid, and cache lines are not shared


class Unsupported(Exception):
    """This engine's state cannot be snapshotted in memory (its recovery reads the disk checkpoint)."""


@dataclass(frozen=True)
class Slot:
    """Where a tensor lies in a packed buffer."""

    offset: int
    dtype: str
    shape: tuple[int, ...]


def capture(engine: Any) -> dict[str, Any]:
    """References to everything of ``engine``'s state that a restore needs (nothing copied yet)."""
    import torch

    optimizer = engine.optimizer
    if _is_partitioned(optimizer):
        state: dict[str, Any] = {"optimizer": optimizer.state_dict()}
    elif engine.zero_optimization_stage() == 0 and isinstance(optimizer, torch.optim.Optimizer):
        state = {"module": engine.module.state_dict(), "optimizer": optimizer.state_dict()}
    else:
        raise Unsupported(f"{type(optimizer).__name__} (ZeRO stage {engine.zero_optimization_stage()}): memory "
                          "snapshots cover ZeRO stages 0 (fp32), 1 and 2")
    state["counters"] = {name: getattr(engine, name) for name in ("global_steps", "global_samples", "skipped_steps")}
    if engine.lr_scheduler is not None:
        state["lr_scheduler"] = engine.lr_scheduler.state_dict()
    state["rng"] = rng_state()
    return state


def restore(engine: Any, state: dict[str, Any]) -> None:
    """Put ``state`` (as :func:`capture` named it) back into ``engine``; a collective (the working
    weights are all-gathered from the restored master shards). ``state``'s tensors are copied from,
    never kept: the buffers they live in are reused."""
    import torch.distributed as dist

    state = _detached_copy(state)
    optimizer = engine.optimizer
    if "module" in state:
        engine.module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
    else:
        dp_size = dist.get_world_size(group=optimizer.dp_process_group)
        dp_rank = dist.get_rank(group=optimizer.dp_process_group)
        listed = [state["optimizer"] if i == dp_rank else None for i in range(dp_size)]
        optimizer.load_state_dict(state_dict_list=listed, load_optimizer_states=True, load_from_fp32_weights=True)
        optimizer.update_lp_params()
    for name, value in state["counters"].items():
        setattr(engine, name, value)
    if "lr_scheduler" in state and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    set_rng_state(state["rng"])


def _is_partitioned(optimizer: Any) -> bool:
    """ZeRO-1/2's optimizer and DeepSpeed's bf16 one: fp32 master shards, and a way back to the weights."""
    return callable(getattr(optimizer, "update_lp_params", None)) and callable(getattr(optimizer, "load_state_dict", None)) \
        and (hasattr(optimizer, "single_partition_of_fp32_groups") or hasattr(optimizer, "fp32_groups_flat_partition"))


def rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _detached_copy(item: Any) -> Any:
    """A copy whose tensors own their memory (torch's optimizer keeps the tensors it is loaded with)."""
    import torch

    if torch.is_tensor(item):
        return item.clone()
    if isinstance(item, dict):
        return type(item)((k, _detached_copy(v)) for k, v in item.items())
    if isinstance(item, (list, tuple)) and not hasattr(item, "_fields"):
        copied = [_detached_copy(v) for v in item]
        return copied if isinstance(item, list) else tuple(copied)
    return item


@dataclass
class Snapshot:
    """One packed snapshot: ``tree`` is the state with every tensor replaced by a :class:`Slot` into
    ``buffer`` (a flat uint8 tensor); ``complete`` only once every tensor is in."""

    buffer: Any = None
    tree: Any = None
    step: int = -1
    user_state: Any = None
    complete: bool = False
    # Odd while the training thread writes it: a reader that saw the version change saw a torn copy.
    version: int = 0
    nbytes: int = 0

    def state(self) -> Any:
        """The tree with each slot as a tensor view of the buffer (valid until the buffer is rewritten)."""
        return unpack(self.tree, self.buffer)


@dataclass
class HostSnapshots:
    """The two newest snapshots of this rank's state; one is written while the other stays whole."""

    pinned: bool = False
    _slots: list[Snapshot] = field(default_factory=lambda: [Snapshot(), Snapshot()])
    lock: threading.Lock = field(default_factory=threading.Lock)
    taken_s: float = 0.0  # the last snapshot's copy time, for the logs and benchmarks

    def take(self, state: dict[str, Any], step: int, user_state: Any = None) -> Snapshot:
        """Copy ``state`` (references, from :func:`capture`) into the older slot; returns it, complete."""
        import torch

        target = min(self._slots, key=lambda s: (s.complete, s.step))
        tensors: list[Any] = []
        tree = _layout(state, tensors, [0])
        nbytes = _aligned_size(tensors)
        with self.lock:
            target.complete = False
            target.version += 1
        if target.buffer is None or target.buffer.numel() < nbytes:
            target.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        for tensor, slot in tensors:
            view = _view(target.buffer, slot)
            view.copy_(tensor.detach().reshape(slot.shape), non_blocking=self.pinned)
        if self.pinned:
            torch.cuda.current_stream().synchronize()
        target.tree, target.step, target.nbytes = tree, step, nbytes
        target.user_state = copy.deepcopy(user_state)
        with self.lock:
            target.complete = True
            target.version += 1
        return target

    def newest(self) -> Snapshot | None:
        """The newest complete snapshot, or None."""
        whole = [s for s in self._slots if s.complete]
        return max(whole, key=lambda s: s.step) if whole else None

    def at(self, step: int) -> Snapshot | None:
        """The complete snapshot of ``step``, or None."""
        return next((s for s in self._slots if s.complete and s.step == step), None)

    def steps(self) -> list[int]:
        """Steps held whole, oldest first."""
        return sorted(s.step for s in self._slots if s.complete)

    def forget(self, newer_than: int | None = None) -> None:
        """Drop the snapshots of steps after ``newer_than`` (every one when None); buffers are kept."""
        with self.lock:
            for slot in self._slots:
                if slot.complete and (newer_than is None or slot.step > newer_than):
                    slot.complete = False
                    slot.version += 1


def _layout(item: Any, tensors: list[Any], cursor: list[int]) -> Any:
    """``item`` with each tensor replaced by its :class:`Slot`; non-tensor leaves copied (a loss
    scaler's counters change at the next step)."""
    import torch

    if torch.is_tensor(item):
        slot = Slot(offset=cursor[0], dtype=str(item.dtype).removeprefix("torch."), shape=tuple(item.shape))
        cursor[0] += -(-item.numel() * item.element_size() // _ALIGN) * _ALIGN
        tensors.append((item, slot))
        return slot
    if isinstance(item, dict):
        return type(item)((k, _layout(v, tensors, cursor)) for k, v in item.items())
    if isinstance(item, (list, tuple)) and not hasattr(item, "_fields"):
        laid = [_layout(v, tensors, cursor) for v in item]
        return laid if isinstance(item, list) else tuple(laid)
    return copy.deepcopy(item)


def _aligned_size(tensors: list[Any]) -> int:
    if not tensors:
        return 0
    tensor, slot = tensors[-1]
    return slot.offset + -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN


def _view(buffer: Any, slot: Slot) -> Any:
    import torch

    dtype = getattr(torch, slot.dtype)
    count = 1
    for dim in slot.shape:
        count *= dim
    size = count * dtype.itemsize
    return buffer[slot.offset:slot.offset + size].view(dtype).view(slot.shape)


def unpack(item: Any, buffer: Any) -> Any:
    """``item`` (a tree of :class:`Slot`) with each slot as a tensor view of ``buffer``."""
    if isinstance(item, Slot):
        return _view(buffer, item)
    if isinstance(item, dict):
        return type(item)((k, unpack(v, buffer)) for k, v in item.items())
    if isinstance(item, (list, tuple)) and not hasattr(item, "_fields"):
        unpacked = [unpack(v, buffer) for v in item]
        return unpacked if isinstance(item, list) else tuple(unpacked)
    return item
