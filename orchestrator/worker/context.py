"""What a training function receives: rank information, the config, and the orchestrator's services.

A training function is ``def train(ctx: TrainContext) -> None``. The built-in
GPT workload (``orchestrator.training.workload``) uses exactly this API; see
``docs/user-api.md`` for a user-written example.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.checkpoint import store
from orchestrator.config.schema import Config
from orchestrator.worker.channel import Channel


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
        last_step: the last step reported.
        engines: DeepSpeed engines given to :meth:`load_checkpoint`; torn down by the
            orchestrator when this rank has to rejoin a new process group.
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
    faults: list[dict[str, Any]] = field(default_factory=list)
    last_step: int = 0
    engines: list[Any] = field(default_factory=list)
    _last_report: float = field(default_factory=time.perf_counter)

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

    def init_distributed(self) -> None:
        """Join the job's process group (DeepSpeed's comm layer, from RANK/MASTER_* in the environment)."""
        import deepspeed

        if self.config.cluster.device == "gpu":
            import torch

            torch.cuda.set_device(self.local_rank)
        deepspeed.init_distributed(dist_backend=self.backend)

    def report(self, step: int, loss: float, step_time_s: float | None = None, **metrics: float) -> None:
        """Report a finished step; it is also this rank's heartbeat.

        ``step_time_s`` defaults to the time since the previous report.
        Extra keyword metrics (tokens, lr, grad_norm, ...) travel with it.
        """
        now = time.perf_counter()
        if step_time_s is None:
            step_time_s = now - self._last_report
        self._last_report = now
        self._channel.send(
            {"type": "step", "step": step, "loss": float(loss), "step_time_s": step_time_s, **metrics}
        )
        self.last_step = step
        for fault in self.faults:
            if fault["rank"] == self.rank and fault["step"] == step:
                self._channel.send({"type": "fault_injected", **fault})
                inject(fault["kind"], step)

    def should_checkpoint(self, step: int) -> bool:
        """True when ``step`` is a checkpoint step (every ``checkpoint.interval_steps`` and the last)."""
        interval = self.config.checkpoint.interval_steps
        if interval == 0:
            return False
        return step % interval == 0 or step == self.config.train.steps

    def save_checkpoint(self, engine: Any, step: int, user_state: dict | None = None) -> None:
        """Save a DeepSpeed checkpoint for ``step`` (collective: every rank calls it).

        The controller commits it once every rank has saved; ``user_state``
        (picklable) comes back from :meth:`load_checkpoint`.
        """
        started = time.perf_counter()
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tag = store.save(engine, self.checkpoint_dir, step, self.rank, user_state)
        seconds = time.perf_counter() - started
        self._channel.send({"type": "checkpoint_saved", "step": step, "tag": tag, "seconds": seconds})
        self._last_report = time.perf_counter()

    def load_checkpoint(self, engine: Any) -> tuple[int, dict | None]:
        """Load the committed checkpoint into ``engine``, if any.

        Returns ``(step, user_state)``: the number of steps already done (0 on a
        fresh start) and what was given to :meth:`save_checkpoint`.
        """
        if not any(e is engine for e in self.engines):
            self.engines.append(engine)
        if self.resume_tag is None:
            return 0, None
        step, user_state = store.load(engine, self.checkpoint_dir, self.resume_tag, self.rank)
        self.last_step = step
        self._channel.send({"type": "resumed", "step": step, "tag": self.resume_tag})
        self._last_report = time.perf_counter()
        return step, user_state



FAULT_KINDS = ("kill", "hang", "raise", "exit")


def inject(kind: str, step: int) -> None:
    """Make this process fail the way ``kind`` says (``--inject-fault``)."""
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "exit":
        os._exit(3)
    elif kind == "raise":
        raise RuntimeError(f"injected fault at step {step}")
    elif kind == "hang":
        threading.Event().wait()  # alive, but never reports another step
    else:
        raise AssertionError(f"unknown fault kind {kind!r}")
