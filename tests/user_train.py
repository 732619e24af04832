"""User training functions used by the tests as ``train.entrypoint`` (``tests.user_train:NAME``)."""

from __future__ import annotations

import subprocess
import sys

import torch
import torch.distributed as dist

from orchestrator.api import TrainContext

CHILD = """
import json, os
targets = []
for fd in os.listdir("/proc/self/fd"):
    try:
        targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        pass  # the descriptor listdir itself used
print(json.dumps({"orch_env": sorted(k for k in os.environ if k.startswith("ORCH_")),
                  "sockets": sorted(t for t in targets if t.startswith("socket:"))}))
"""


def allreduce_counter(ctx: TrainContext) -> None:
    """A minimal user loop: join the group, all-reduce, report steps. Rank 0 first records what a
    program it starts inherits (``child.json`` in the run directory)."""
    if ctx.rank == 0:
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True)
        (ctx.run_dir / "child.json").write_text(out.stdout)
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
