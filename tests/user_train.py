"""User training functions used by the tests as ``train.entrypoint`` (``tests.user_train:NAME``)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from orchestrator.worker.context import TrainContext


def allreduce_counter(ctx: TrainContext) -> None:
    """A minimal user loop: join the group, all-reduce, report steps."""
    ctx.init_distributed()
    for step in range(1, ctx.config.train.steps + 1):
        value = torch.tensor([float(ctx.rank + step)])
        dist.all_reduce(value)
        ctx.report(step, loss=value.item())


def raises_at_step_3(ctx: TrainContext) -> None:
    """Fails the same way on every rank and every attempt: a bug, not a fault."""
    ctx.init_distributed()
    for step in range(1, ctx.config.train.steps + 1):
        if step == 3:
            raise ValueError(f"user bug at step {step}")
        ctx.report(step, loss=1.0)
