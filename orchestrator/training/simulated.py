"""Light simulated ranks, for measuring the control plane on a real cluster with hundreds of ranks
(``bench/cluster_scale.py``): ``train.entrypoint: orchestrator.training.simulated:train``.

A simulated rank is a real rank process (started, beating, interrupted, rejoined, killed and
replaced like any other) whose training imports no torch and joins no process group: it reports
a step every ``SIMULATED_STEP_S`` seconds (``cluster.env``; default 0.5), on the wall clock so that
every rank steps at about the same moment, and saves a small file of its own at each checkpoint
step, which the controller commits like any other checkpoint. Nothing ties the ranks together: a
killed rank's peers go on stepping until the controller interrupts them for the recovery, as it
interrupts real survivors. Hundreds fit on two cores, where real ranks would need gigabytes each.
"""

from __future__ import annotations

import hashlib
import os
import time

from orchestrator.checkpoint import store
from orchestrator.messages import CheckpointSaved
from orchestrator.worker.context import TrainContext

# The rank process and the node's zygote import torch and DeepSpeed only for entry points without this.
FRAMEWORKS = False
STEP_S_ENV = "SIMULATED_STEP_S"


def train(ctx: TrainContext) -> None:
    """Step until ``train.steps``, from the resumed checkpoint's step; save at the checkpoint steps."""
    step_s = float(os.environ.get(STEP_S_ENV, "0.5"))
    step = store.step_of(ctx.resume_tag) if ctx.resume_tag else 0
    first, started = step, time.time()
    while step < ctx.config.train.steps:
        step += 1
        time.sleep(max(0.0, started + (step - first) * step_s - time.time()))
        ctx.report(step, loss=1.0 / step, step_time_s=step_s)
        if ctx.should_checkpoint(step):
            _save(ctx, step)


def _save(ctx: TrainContext, step: int) -> None:
    """This rank's part of checkpoint ``step``: one small file, durable before it is reported."""
    started = time.perf_counter()
    tag = store.tag_for(step)
    directory = store.staging_dir(ctx.checkpoint_dir, ctx.attempt) / tag
    directory.mkdir(parents=True, exist_ok=True)
    name = f"simulated_rank_{ctx.rank:05d}.txt"
    data = f"rank {ctx.rank} step {step}\n".encode()
    with open(directory / name, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    write_s = time.perf_counter() - started
    # The context's own save needs a DeepSpeed engine; its report is the same.
    ctx._channel.send(CheckpointSaved(step=step, tag=tag, attempt=ctx.attempt, blocked_s=write_s, write_s=write_s,
                                      files={name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}))
