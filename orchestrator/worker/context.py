"""What a training function receives: rank information, the config, and the orchestrator's services.

A training function is ``def train(ctx: TrainContext) -> None``. The built-in
GPT workload (``orchestrator.training.workload``) uses exactly this API; see
``docs/user-api.md`` for a user-written example.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.checkpoint import store
from orchestrator.checkpoint.writer import BackgroundWriter, SaveJob, SaveResult
from orchestrator.config.schema import Config
from orchestrator.installation import use_prebuilt_cpu_op
from orchestrator.messages import (
    FIRST_CHECKPOINT_INTERVAL,
    Cadence,
    CheckpointFailed,
    CheckpointSaved,
    CheckpointSkipped,
    Saving,
)
from orchestrator.worker import rendezvous
from orchestrator.worker.buddies import MemoryKeeper, holder_of, plan_restore
from orchestrator.worker.channel import Channel
from orchestrator.worker.reporter import Reporter

# While a save is being written, the rank tells the controller it is busy, not hung, this often.
_SAVE_BEAT_S = 1.0
# A write that takes longer than this is stuck (a dead network filesystem, say).
SAVE_WRITE_TIMEOUT_S = 3600.0


# Dynamic loss scaling as DeepSpeed recommends: start at 2**16, halve on overflow (after 2 in a row),
# double after 1000 clean steps. The scaler's state is in the checkpoint, so a resume is exact.
_FP16_LOSS_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                      "min_loss_scale": 1}


def torch_dtype(precision: str) -> Any:
    """The torch dtype of ``precision`` (``train.precision``)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def deepspeed_precision(precision: str) -> dict[str, Any]:
    """DeepSpeed's config sections for ``precision`` (``train.precision``); none for fp32. bf16 and fp16
    keep fp32 master weights in the optimizer (and in checkpoints)."""
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":
        return {"fp16": {"enabled": True, **_FP16_LOSS_SCALING}}
    return {}


@dataclass
class Told:
    """What the controller told this rank process about when to save (the latest of each), updated on
    the process's reading thread and read by the training loop."""

    interval_steps: int | None = None  # checkpoint.interval_steps: auto (None: nothing chosen yet)
    memory_interval_steps: int | None = None  # checkpoint.memory_interval_steps: auto (the same)
    save_at_step: int | None = None  # a preemption: save at this step too
    # The scheduler's SIGTERM took the agent (stop_signal.py): save at the next step every rank agrees on, exit.
    alone: bool = False

    def hear(self, word: Cadence) -> None:
        self.interval_steps = word.interval_steps or self.interval_steps
        self.memory_interval_steps = word.memory_interval_steps or self.memory_interval_steps
        self.save_at_step = word.save_at_step or self.save_at_step


def _distributed() -> bool:
    """Whether this process is in a torch.distributed process group (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


class StoppedAlone(BaseException):
    """Raised by :meth:`TrainContext.save_checkpoint` once the checkpoint a rank saved alone is durable
    (``stop_signal.py``): the training function ends there. A ``BaseException``, as ``SystemExit``:
    ``except Exception`` in training code does not stop it."""


@dataclass(kw_only=True)
class TrainContext:
    """Per-rank handle given to training code.

    Attributes:
        rank, local_rank, world_size: this process's place in the job.
        node: the host name of the node it runs on.
        attempt: 0 for the first start, +1 per restart of the group.
        config: the job's validated config tree.
        run_dir: the run directory; ``checkpoint_dir`` is its ``checkpoints/``.
        resume_tag: the committed checkpoint to resume from, or None for a fresh start.
        faults: injected faults (``--inject-fault``) this rank still has to fire.
        last_step: the last step reported (or resumed from); 0 before any.
        engines: DeepSpeed engines given to :meth:`load_checkpoint`; torn down by the
            orchestrator when this rank has to rejoin a new process group.
        resumed_from: where the last :meth:`load_checkpoint` restored from: ``disk``, ``memory``
            or None (a fresh start).
    """

    rank: int
    local_rank: int
    world_size: int
    node: str
    attempt: int
    config: Config
    run_dir: Path
    resume_tag: str | None
    _channel: Channel
    _writer: BackgroundWriter = field(default_factory=BackgroundWriter)
    faults: list[dict[str, Any]] = field(default_factory=list)
    engines: list[Any] = field(default_factory=list)
    _told: Told = field(default_factory=lambda: Told())
    # checkpoint.memory_interval_steps not 0: this process's snapshots, mirror server and sender, made
    # at first use (a training function that never snapshots starts no threads for them).
    _memory_keeper: Callable[[], MemoryKeeper | None] = lambda: None
    resumed_from: str | None = None
    _reporter: Reporter = field(init=False)
    _last_save_step: int = field(init=False, default=0)
    # The ranks' word on the next step, in flight (step, flags, work): rank 0's (checkpoint.interval_steps:
    # auto), and whether any rank must save there (a preemption).
    _word_next: tuple[int, Any, Any] | None = field(init=False, default=None)
    _alone_at: int | None = field(init=False, default=None)  # the step saved alone (stop_signal.py)
    _snapshot_s: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._reporter = Reporter(self._channel, self.rank, self.faults)

    @property
    def last_step(self) -> int:
        return self._reporter.last_step or 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def backend(self) -> str:
        """The torch.distributed backend for this job's device: gloo on CPU, nccl on GPU."""
        return "nccl" if self.config.cluster.device == "gpu" else "gloo"

    @property
    def device(self) -> str:
        """The torch device for this rank's tensors."""
        return f"cuda:{self.local_rank}" if self.config.cluster.device == "gpu" else "cpu"

    @property
    def precision(self) -> str:
        """``train.precision``: ``fp32``, ``bf16`` or ``fp16``."""
        return self.config.train.precision

    @property
    def dtype(self) -> Any:
        """The torch dtype the model trains in (``train.precision``)."""
        return torch_dtype(self.precision)

    def deepspeed_precision(self) -> dict[str, Any]:
        """The sections of a DeepSpeed config that train in ``train.precision`` (merge them into yours)."""
        return deepspeed_precision(self.precision)

    def init_distributed(self) -> None:
        """Join the job's process group (rendezvous at MASTER_ADDR:MASTER_PORT, whose store listens on
        that address only), then DeepSpeed's comm layer on it."""
        import deepspeed
        import torch
        import torch.distributed as dist
        from deepspeed.constants import default_pg_timeout

        extra: dict[str, Any] = {}
        if self.config.cluster.device == "gpu":
            torch.cuda.set_device(self.local_rank)
            if self.world_size > 1:
                extra["device_id"] = torch.device("cuda", self.local_rank)  # as DeepSpeed does: NCCL set up eagerly
        else:
            use_prebuilt_cpu_op()  # on every node: the controller checked only its own
        if not dist.is_initialized():
            store = rendezvous.store(self.rank, self.world_size, default_pg_timeout)
            dist.init_process_group(self.backend, store=store, rank=self.rank, world_size=self.world_size,
                                    timeout=default_pg_timeout, **extra)
        deepspeed.init_distributed(dist_backend=self.backend)

    def report(self, step: int, loss: float | None = None, step_time_s: float | None = None, **metrics: float) -> None:
        """Report a finished step; it is also this rank's heartbeat.

        ``step_time_s`` defaults to the time since the previous report.
        Keyword metrics travel with it: ``tokens`` (global tokens in the step, for tokens/s),
        ``lr``, ``grad_norm``, ``flops``, and any other number, which rank 0's ``step`` event
        carries under its name. With ``checkpoint.memory_interval_steps: auto`` the first report
        after a snapshot also carries ``snapshot_s``, the time it blocked this rank.
        """
        if self._snapshot_s is not None:
            metrics.setdefault("snapshot_s", self._snapshot_s)
            self._snapshot_s = None
        self._reporter.step(step, loss, step_time_s=step_time_s, **metrics)

    def should_checkpoint(self, step: int) -> bool:
        """True when ``step`` is a checkpoint step: every ``checkpoint.interval_steps`` (with ``auto``, when
        rank 0 says so, at the interval the controller chose) and the last, and the step every rank
        agreed on when the job is being preempted (docs/launching.md).

        A collective, which every rank calls at every step: the ranks' word on the next step travels
        in a one-step-ahead asynchronous all-reduce, which runs while the step trains (a blocking one
        would stall every rank at every step for the skew between ranks). A preemption's step is
        saved wherever one rank heard of it in time, so that every rank saves the same step."""
        interval = self.config.checkpoint.interval_steps
        if _distributed():
            due_by_word, preempted = self._word_on(step)
        else:  # a training function without a process group (orchestrator/training/simulated.py) decides alone
            due_by_word, preempted = False, self._told.alone or step == self._told.save_at_step
        due = interval != 0 and (step == self.config.train.steps or due_by_word
                                 or (interval != "auto" and step % interval == 0))
        if preempted and self._told.alone:
            self._alone_at = step
        if due or preempted:
            self._last_save_step = step
        if step < self.config.train.steps and _distributed():
            self._send_word(step + 1)
        return due or preempted

    def _word_on(self, step: int) -> tuple[bool, bool]:
        """The ranks' word on ``step`` sent one step ahead: (rank 0 says it is due, a rank must save)."""
        decided, self._word_next = self._word_next, None
        if decided is None:
            return False, False
        for_step, flags, work = decided
        work.wait()
        if for_step != step:
            return False, False
        due, preempted = flags.tolist()
        return due > 0, preempted > 0

    def _send_word(self, step: int) -> None:
        import torch
        import torch.distributed as dist

        due = (self.rank == 0 and self.config.checkpoint.interval_steps == "auto"
               and step - self._last_save_step >= (self._told.interval_steps or FIRST_CHECKPOINT_INTERVAL))
        preempted = self._told.alone or self._told.save_at_step == step
        flags = torch.tensor([float(due), float(preempted)], device=self.device)
        self._word_next = (step, flags, dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True))

    def save_checkpoint(self, engine: Any, step: int, user_state: dict | None = None) -> None:
        """Save a DeepSpeed checkpoint for ``step`` (collective: every rank calls it).

        Training blocks only while the state is copied to host memory; the
        files are written, checksummed and fsynced in the background, and the
        controller commits the checkpoint once every rank's files are durable
        (``checkpoint.async_save: false`` writes before returning). With a
        save still in flight this waits for it, or skips this one when
        ``checkpoint.when_busy`` is ``skip``. ``user_state`` (picklable)
        comes back from :meth:`load_checkpoint`.
        """
        settings = self.config.checkpoint
        started = time.perf_counter()
        if settings.when_busy == "skip" and self._any_rank_busy():
            self._channel.send(CheckpointSkipped(step=step, attempt=self.attempt))
            return
        self.wait_for_saves()
        directory, files = store.snapshot_save(engine, self.checkpoint_dir, self.attempt, step, self.rank, user_state)
        snapshot_s = time.perf_counter() - started
        which = {"step": step, "tag": store.tag_for(step), "attempt": self.attempt}
        alone = step == self._alone_at

        def done(result: SaveResult) -> None:
            if result.error is not None:
                self._channel.send(CheckpointFailed(
                    **which, path=str(result.failed_path), error=result.error.strerror or str(result.error),
                    errno=result.error.errno,
                ))
                return
            blocked_s = snapshot_s if settings.async_save else snapshot_s + result.write_s
            saved = CheckpointSaved(**which, blocked_s=blocked_s, write_s=result.write_s,
                                    files={name: vars(entry) for name, entry in result.files.items()})
            self._channel.send(saved)
            if alone:  # nobody to tell: the controller finds it next to the files
                store.write_saved_report(directory, self.rank, saved)

        self._writer.submit(SaveJob(directory=directory, files=files, done=done))
        if alone:
            self.wait_for_saves()
            raise StoppedAlone(f"SIGTERM with the node agent gone: saved step {step} with the other ranks")
        if not settings.async_save:
            self.wait_for_saves()
        self._reporter.restart_clock()

    def wait_for_saves(self) -> None:
        """Block until this rank's save in flight (if any) is written and reported."""
        deadline = time.monotonic() + SAVE_WRITE_TIMEOUT_S
        while not self._writer.wait(_SAVE_BEAT_S):
            if time.monotonic() > deadline:
                raise TimeoutError(f"a checkpoint write did not finish in {SAVE_WRITE_TIMEOUT_S:.0f}s")
            self._channel.send(Saving())

    def _any_rank_busy(self) -> bool:
        """Whether some rank still writes the previous save (all ranks must skip together)."""
        import torch
        import torch.distributed as dist

        busy = torch.tensor([1.0 if self._writer.busy else 0.0], device=self.device)
        dist.all_reduce(busy, op=dist.ReduceOp.MAX)
        return bool(busy.item())

    def snapshot(self, engine: Any, step: int, user_state: dict | None = None) -> None:
        """Keep ``engine``'s state after ``step`` in host memory, mirrored to a buddy rank's memory,
        every ``checkpoint.memory_interval_steps`` steps (a no-op at other steps, and with 0; with
        ``auto``, at the interval the controller chose from the measured cost and failure rate).

        Call it on every rank after each optimizer step; it is not a collective. Training blocks for
        the copy to host memory only (its own reused buffers); the mirror is sent in the background.
        After a failure, :meth:`load_checkpoint` goes back to the newest step that every rank holds
        in memory when that is newer than the disk checkpoint. ``user_state`` (picklable) comes back
        from :meth:`load_checkpoint` as with :meth:`save_checkpoint`.
        """
        every = self.config.checkpoint.memory_interval_steps
        if every == "auto":
            every = self._told.memory_interval_steps or 1
        keeper = self._memory_keeper()
        if keeper is None or every == 0 or step % every:
            return
        if not any(e is engine for e in self.engines):
            self.engines.append(engine)
        started = time.perf_counter()
        keeper.snapshot(engine, step, user_state)
        if self.config.checkpoint.memory_interval_steps == "auto":
            self._snapshot_s = time.perf_counter() - started  # told with the next step (the cadence's cost)

    def load_checkpoint(self, engine: Any) -> tuple[int, dict | None]:
        """Restore ``engine`` after a failure or a restart, if there is anything to restore.

        From memory (:meth:`snapshot`) when every rank holds a snapshot of a step at least as new as
        the committed checkpoint, else from the committed checkpoint on disk. A collective: every rank
        calls it. Returns ``(step, user_state)``: the number of steps already done (0 on a fresh
        start) and what was given to :meth:`save_checkpoint` or :meth:`snapshot`.
        """
        if not any(e is engine for e in self.engines):
            self.engines.append(engine)
        disk_step = store.step_of(self.resume_tag) if self.resume_tag else 0
        holder, keeper = None, self._memory_keeper()
        if keeper is not None:
            restored, holder = self._restore_from_memory(keeper, engine, disk_step)
            if restored is not None:
                step, user_state = restored
                keeper.settle(self.rank, self.world_size, step, holder)
                self._last_save_step = disk_step
                self.resumed_from = "memory"
                self._reporter.resumed(step, self.resume_tag or "", source="memory")
                return step, user_state
        step, user_state = 0, None
        if self.resume_tag is not None:
            step, user_state = store.load(engine, self.checkpoint_dir, self.resume_tag, self.rank, self.config.layout)
            self._last_save_step = step
            self.resumed_from = "disk"
            self._reporter.resumed(step, self.resume_tag)
        if keeper is not None:
            keeper.settle(self.rank, self.world_size, step, holder)
        return step, user_state

    def _restore_from_memory(self, keeper: MemoryKeeper, engine: Any,
                             disk_step: int) -> tuple[tuple[int, Any] | None, Any]:
        """Gather every rank's offer; restore the plan's step when every rank can. Returns
        ``((step, user_state) or None, the address of this rank's buddy)``."""
        import torch
        import torch.distributed as dist

        from orchestrator.checkpoint import memory

        offers: list[Any] = [None] * self.world_size
        dist.all_gather_object(offers, keeper.offer(self.rank, self.world_size))
        buddy = holder_of(self.rank, {o.rank: o.node for o in offers})
        holder = offers[buddy].mirror_target(keeper.host) if buddy is not None else None
        plan = plan_restore(offers, disk_step)
        if plan is None:
            return None, holder
        state = keeper.restore_own_or_fetch(plan, self.rank)
        whole = torch.tensor([0.0 if state is None else 1.0], device=self.device)
        dist.all_reduce(whole, op=dist.ReduceOp.MIN)
        if not whole.item():
            return None, holder
        tree, user_state, _keep_alive = state
        memory.restore(engine, tree)
        return (plan.step, user_state), holder


