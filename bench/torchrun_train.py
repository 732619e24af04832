"""The built-in workload as a plain ``torchrun`` script: the baseline of ``bench/recovery.py``.

Same model, data and DeepSpeed config as the orchestrator's built-in workload;
checkpoints with DeepSpeed's own ``save_checkpoint``/``load_checkpoint`` (its
``latest`` file) and resumes from the latest on every (re)start, as a torchrun
user would write it. Rank 0 appends each step to
``OUT/steps.jsonl``; every rank appends its pid to ``OUT/pids.jsonl``.

    torchrun --nproc-per-node 2 --max-restarts 3 bench/torchrun_train.py \\
        --config cluster_configs/local.yaml --set train.steps=120 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from orchestrator.config import load_config
from orchestrator.training.corpus import batch, load_corpus
from orchestrator.training.engine import build_engine
from orchestrator.training.model import GPT


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    out = Path(args.out)
    rank = int(os.environ["RANK"])
    with open(out / "pids.jsonl", "a") as fh:
        fh.write(json.dumps({"rank": rank, "pid": os.getpid(), "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT")}) + "\n")

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(config.train.seed)
    engine = build_engine(config, GPT(config.model))
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    done = 0
    if (ckpt / "latest").exists():
        _, client = engine.load_checkpoint(str(ckpt))
        done = client["step"]

    corpus = load_corpus()
    dp_rank, dp_size = dist.get_rank(group=engine.data_parallel_group), engine.dp_world_size
    steps_log = open(out / "steps.jsonl", "a") if rank == 0 else None
    for step in range(done + 1, config.train.steps + 1):
        inputs, targets = batch(corpus, seed=config.train.seed, step=step, seq_len=config.model.seq_len,
                                micro_batch=config.train.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
        loss = engine(inputs, targets)
        engine.backward(loss)
        engine.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= dist.get_world_size()
        if steps_log is not None:
            steps_log.write(json.dumps({"ts": time.time(), "step": step, "loss": mean_loss.item()}) + "\n")
            steps_log.flush()
        interval = config.checkpoint.interval_steps
        if interval and (step % interval == 0 or step == config.train.steps):
            engine.save_checkpoint(str(ckpt), tag=f"global_step{step}", client_state={"step": step})
    if steps_log is not None:
        steps_log.close()
    dist.barrier()
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    main()
