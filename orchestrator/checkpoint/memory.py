"""A rank's training state in host memory: taken every few steps, restored without touching disk.

:func:`capture` names what a DeepSpeed engine needs to go on exactly where it
was: for ZeRO stages 1 and 2 (any precision) the optimizer's own state dict
(this rank's shard of fp32 master weights and optimizer moments, the loss
scaler) with the engine's counters and learning-rate schedule; for an engine
without ZeRO, the module's and the torch optimizer's state dicts. The model's
working (bf16, fp16 or fp32) weights are not copied: a restore recomputes them
from the master shards and all-gathers them, as DeepSpeed does after every step.

:class:`HostSnapshots` keeps the two newest snapshots of a rank, each packed in
one reusable :class:`Region` of host memory (a memfd; page-locked on a GPU node)
with every tensor at an aligned offset, so that a snapshot costs one copy per
tensor and no allocation, and a buddy rank on the same node can map the very
same memory (``worker/mirror.py``).
"""

from __future__ import annotations

import copy
import math
import mmap
import os
import pickle
import random
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_ALIGN = 64  # bytes: any dtype's view of an aligned offset is valid, and cache lines are not shared
# Leaves that are never changed in place: kept as they are (a state dict holds thousands: parameter ids).
_ATOMS = frozenset({int, float, bool, str, bytes, type(None)})


# Keys of a ZeRO optimizer's state dict that only a conversion to another layout reads.
_FOR_OTHERS = frozenset({"param_slice_mappings", "universal_checkpoint_info"})


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
        # What a restore into the same layout reads (the universal checkpoint's maps are for others).
        state: dict[str, Any] = {"optimizer": {k: v for k, v in optimizer.state_dict().items() if k not in _FOR_OTHERS}}
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
    masters = hasattr(optimizer, "single_partition_of_fp32_groups") or hasattr(optimizer, "fp32_groups_flat_partition")
    return masters and callable(getattr(optimizer, "update_lp_params", None))


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


def _tree_map(item: Any, leaf: Callable[[Any], Any]) -> Any:
    """``item`` (dicts, lists and tuples of leaves) with ``leaf`` applied to each leaf other than the
    atoms; a namedtuple is a leaf, a tuple of atoms is kept as it is (it never changes)."""
    if type(item) in _ATOMS:
        return item
    if isinstance(item, dict):
        return type(item)((k, _tree_map(v, leaf)) for k, v in item.items())
    if isinstance(item, (list, tuple)) and all(map(_ATOMS.__contains__, map(type, item))):
        return item if isinstance(item, tuple) else list(item)
    if isinstance(item, (list, tuple)) and not hasattr(item, "_fields"):
        mapped = [_tree_map(v, leaf) for v in item]
        return mapped if isinstance(item, list) else tuple(mapped)
    return leaf(item)


def _detached_copy(item: Any) -> Any:
    """A copy whose tensors own their memory (torch's optimizer keeps the tensors it is loaded with)."""
    import torch

    return _tree_map(item, lambda leaf: leaf.clone() if torch.is_tensor(leaf) else leaf)


_HEADER = struct.Struct("<QqQQQI")  # version, step, payload bytes, meta offset, meta bytes, checksum
DATA_OFFSET = 64  # where the payload starts in a region
_BLOCK_WORDS = 512  # 4 KiB


def checksum(payload: Any) -> int:
    """CRC-32 of the payload's 4 KiB blocks' sums (64-bit words, modulo 2**64): every bit of every
    word counts, and where it lies to the block; about 20 times faster than a CRC-32 of the bytes
    (it must not take the CPU a training step needs). ``payload``'s length is a multiple of 8."""
    import numpy as np

    words = np.frombuffer(payload, dtype=np.uint64)
    whole = len(words) // _BLOCK_WORDS * _BLOCK_WORDS
    sums = np.add.reduce(words[:whole].reshape(-1, _BLOCK_WORDS), axis=1)
    tail = np.add.reduce(words[whole:], keepdims=True, dtype=np.uint64)
    return zlib.crc32(np.concatenate([sums, tail]).tobytes())


@dataclass(frozen=True)
class RegionHeader:
    """What a region holds: written last by the rank that took the snapshot (``version`` odd while
    it writes), read by its buddy on the same node, which maps the same memory."""

    version: int
    step: int
    nbytes: int
    meta_offset: int
    meta_len: int
    checksum: int

    @property
    def whole(self) -> bool:
        return self.version % 2 == 0 and self.step >= 0


class Region:
    """One snapshot's host memory: a memfd, mapped. A buddy rank on the same node is handed the
    descriptor (``worker/mirror.py``) and maps it too: the snapshot is in its memory without a copy,
    and stays there when this process dies, for as long as the buddy keeps the descriptor."""

    def __init__(self, size: int, fd: int | None = None) -> None:
        import torch

        made = fd is None
        if fd is None:
            fd = os.memfd_create("orchestrator-snapshot", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd, self.size = fd, size
        self.map = mmap.mmap(fd, size)
        self.tensor = torch.frombuffer(self.map, dtype=torch.uint8)
        if made:
            self._write_header(RegionHeader(0, -1, 0, 0, 0, 0))  # holds nothing yet

    @classmethod
    def attach(cls, fd: int) -> Region:
        """Map a region another process made (its descriptor, received)."""
        return cls(os.fstat(fd).st_size, fd)

    def header(self) -> RegionHeader:
        return RegionHeader(*_HEADER.unpack_from(self.map, 0))

    def _write_header(self, header: RegionHeader) -> None:
        _HEADER.pack_into(self.map, 0, header.version, header.step, header.nbytes, header.meta_offset,
                          header.meta_len, header.checksum)

    def begin_write(self) -> None:
        """Mark the region as being rewritten (version odd): a reader that sees this, or sees the
        version change under it, has no whole snapshot."""
        self._write_header(RegionHeader(self.header().version | 1, -1, 0, 0, 0, 0))

    def finish_write(self, step: int, nbytes: int, meta: bytes, crc: int) -> None:
        """After :meth:`begin_write` and the payload's ``nbytes``: store ``meta`` after the payload
        and the header that makes the region whole (version even)."""
        meta_offset = DATA_OFFSET + nbytes
        self.map[meta_offset:meta_offset + len(meta)] = meta
        self._write_header(RegionHeader(self.header().version + 1, step, nbytes, meta_offset, len(meta), crc))

    def invalidate(self) -> None:
        """Hold no snapshot any more (version kept even: nothing is being written)."""
        self._write_header(RegionHeader(self.header().version + 2, -1, 0, 0, 0, 0))

    def payload(self, nbytes: int) -> Any:
        """The payload's bytes, as a uint8 tensor view."""
        return self.tensor[DATA_OFFSET:DATA_OFFSET + nbytes]

    def meta(self, header: RegionHeader) -> bytes:
        return bytes(self.map[header.meta_offset:header.meta_offset + header.meta_len])

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Snapshot:
    """One of a rank's two snapshots: its region, and, in the process that took it, the state's tree
    (each tensor a :class:`Slot` into the payload) and user state, so that it restores without
    unpickling."""

    region: Region | None = None
    tree: Any = None
    user_state: Any = None
    step: int = -1
    nbytes: int = 0
    complete: bool = False

    def state(self) -> Any:
        """The tree with each slot as a tensor view of the region (valid until it is rewritten)."""
        assert self.region is not None
        return unpack(self.tree, self.region.payload(self.nbytes))


@dataclass
class HostSnapshots:
    """The two newest snapshots of this rank's state; one is written while the other stays whole."""

    pinned: bool = False
    slots: list[Snapshot] = field(default_factory=lambda: [Snapshot(), Snapshot()])
    lock: threading.Lock = field(default_factory=threading.Lock)
    regions_changed: int = 0  # +1 each time a region is replaced: a buddy on the node needs the new one

    def take(self, state: dict[str, Any], step: int, user_state: Any = None) -> Snapshot:
        """Copy ``state`` (references, from :func:`capture`) into the older slot; returns it, complete."""
        target = min(self.slots, key=lambda s: (s.complete, s.step))
        tensors: list[Any] = []
        cursor = [0]
        tree = _layout(state, tensors, cursor)
        nbytes = cursor[0]
        user_state = copy.deepcopy(user_state)
        meta = pickle.dumps({"tree": tree, "user_state": user_state}, protocol=pickle.HIGHEST_PROTOCOL)
        need = DATA_OFFSET + nbytes + len(meta)
        with self.lock:
            target.complete = False
            if target.region is None or target.region.size < need:
                target.region = self._region(need + need // 4 + (64 << 10))  # room for the state to grow a little
            target.region.begin_write()
        payload = target.region.payload(nbytes)
        for tensor, slot in tensors:
            _view(payload, slot).copy_(tensor.detach().reshape(slot.shape), non_blocking=self.pinned)
        if self.pinned:
            import torch

            torch.cuda.current_stream().synchronize()
        crc = checksum(payload.numpy())
        target.tree, target.user_state, target.step, target.nbytes = tree, user_state, step, nbytes
        with self.lock:
            target.region.finish_write(step, nbytes, meta, crc)
            target.complete = True
        return target

    def _region(self, size: int) -> Region:
        region = Region(size)
        if self.pinned:
            import torch

            # Page-locked, so device-to-host copies run at full speed; pageable memory still works.
            torch.cuda.cudart().cudaHostRegister(region.tensor.data_ptr(), size, 0)
        self.regions_changed += 1
        return region

    def regions(self) -> list[Region]:
        """The regions made so far (what a buddy on the node maps)."""
        return [s.region for s in self.slots if s.region is not None]

    def newest(self) -> Snapshot | None:
        """The newest complete snapshot, or None."""
        whole = [s for s in self.slots if s.complete]
        return max(whole, key=lambda s: s.step) if whole else None

    def at(self, step: int) -> Snapshot | None:
        """The complete snapshot of ``step``, or None."""
        return next((s for s in self.slots if s.complete and s.step == step), None)

    def steps(self) -> list[int]:
        """Steps held whole, oldest first."""
        return sorted(s.step for s in self.slots if s.complete)

    def forget(self, newer_than: int | None = None) -> None:
        """Drop the snapshots of steps after ``newer_than`` (every one when None), here and in what a
        buddy maps; the regions are kept for reuse."""
        with self.lock:
            for slot in self.slots:
                if slot.complete and (newer_than is None or slot.step > newer_than):
                    slot.complete = False
                    assert slot.region is not None
                    slot.region.invalidate()


def _layout(item: Any, tensors: list[Any], cursor: list[int]) -> Any:
    """``item`` with each tensor replaced by its :class:`Slot` (``cursor[0]``: the next free offset,
    at the end the payload's size); other leaves copied (a loss scaler's counters change at the
    next step)."""
    import torch

    def lay(leaf: Any) -> Any:
        if not torch.is_tensor(leaf):
            return copy.deepcopy(leaf)
        slot = Slot(offset=cursor[0], dtype=str(leaf.dtype).removeprefix("torch."), shape=tuple(leaf.shape))
        cursor[0] += -(-leaf.numel() * leaf.element_size() // _ALIGN) * _ALIGN
        tensors.append((leaf, slot))
        return slot

    return _tree_map(item, lay)


def _view(buffer: Any, slot: Slot) -> Any:
    import torch

    dtype = getattr(torch, slot.dtype)
    size = math.prod(slot.shape) * dtype.itemsize
    return buffer[slot.offset:slot.offset + size].view(dtype).view(slot.shape)


def unpack(item: Any, buffer: Any) -> Any:
    """``item`` (a tree of :class:`Slot`) with each slot as a tensor view of ``buffer``."""
    return _tree_map(item, lambda leaf: _view(buffer, leaf) if isinstance(leaf, Slot) else leaf)
