"""The built-in training function: a small GPT on the stdlib corpus, through the public TrainContext API."""

from __future__ import annotations

import os
import time
from typing import Any

from orchestrator.config.schema import Config
from orchestrator.worker.context import TrainContext


def preload(config: Config) -> None:
    """Run by the node's zygote before it forks spares: data every spare inherits (no threads)."""
    from orchestrator.training.corpus import load_corpus

    load_corpus()


def warmup(config: Config) -> None:
    """Run by a warm spare before it is needed: a full rehearsal on a private one-rank group.

    The first ``deepspeed.initialize`` and the first step in a process pay
    one-time costs (lazy imports, optimizer and autograd set-up: ~1.5 s on
    2 cores) that a spare must not pay during a recovery. On a GPU node the
    spare does not know which GPU it will take: it rehearses on each of the
    node's GPUs (a CUDA context, cuBLAS handles, kernels loaded, NCCL), with
    one block of the model, so as not to take the memory of the rank training
    there; the memory is returned, the contexts are kept.
    """
    import torch

    if config.cluster.device == "gpu":
        one_block = config.model_copy(update={"model": config.model.model_copy(update={"layers": 1})})
        for device in range(torch.cuda.device_count()):
            torch.cuda.set_device(device)
            _rehearse(one_block, "nccl")
        torch.cuda.set_device(0)
        torch.cuda.empty_cache()
    else:
        _rehearse(config, "gloo")
    torch.manual_seed(0)


def _rehearse(config: Config, backend: str) -> None:
    """One engine set-up and training step of ``config``'s model, alone, on the current device."""
    import torch.distributed as dist

    from orchestrator.training.corpus import batch, load_corpus
    from orchestrator.training.engine import build_engine
    from orchestrator.training.model import GPT
    from orchestrator.worker.teardown import tear_down

    solo = config.model_copy(update={"parallel": config.parallel.model_copy(update={"tensor_parallel": 1})})
    corpus = load_corpus()
    rehearsal_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in rehearsal_env}
    os.environ.update(rehearsal_env)  # DeepSpeed reads them even for an existing group
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    engine = build_engine(solo, GPT(config.model))
    try:
        inputs, targets = batch(corpus, seed=0, step=0, seq_len=config.model.seq_len,
                                micro_batch=config.train.micro_batch_size, dp_rank=0, dp_size=1)
        loss = engine(inputs.to(engine.device), targets.to(engine.device))
        engine.backward(loss)
        engine.step()
    finally:
        tear_down([engine])
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train(ctx: TrainContext) -> None:
    """Train ``train.steps`` steps, resuming from the committed checkpoint when there is one."""
    import torch
    import torch.distributed as dist

    from orchestrator.training.corpus import batch, heldout_windows, load_corpus, split_heldout
    from orchestrator.training.engine import build_engine
    from orchestrator.training.model import GPT, flops_per_token

    cfg = ctx.config
    ctx.init_distributed()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = GPT(cfg.model).to(ctx.device)
    per_token = flops_per_token(model, cfg.model)  # the whole model: AutoTP shards it in build_engine
    engine = build_engine(cfg, model)
    done, _ = ctx.load_checkpoint(engine)

    corpus, heldout = split_heldout(load_corpus(), cfg.evaluation.heldout_bytes)
    windows = heldout_windows(heldout, seq_len=cfg.model.seq_len, count=cfg.evaluation.batches) if heldout is not None else None
    # Ranks of one tensor-parallel group must see the same batch: shard by data-parallel rank.
    dp_rank, dp_size = dist.get_rank(group=engine.data_parallel_group), engine.dp_world_size
    # With train.global_batch_size, each step accumulates micro-batches so the global batch (and so the
    # optimisation) is the same on any data-parallel size: micro-batch m of replica r is block r*k+m.
    micro_steps = engine.gradient_accumulation_steps()
    tokens_per_step = cfg.train.micro_batch_size * cfg.model.seq_len * dp_size * micro_steps

    for step in range(done + 1, cfg.train.steps + 1):
        started = time.perf_counter()
        step_loss = torch.zeros((), device=ctx.device)
        for micro in range(micro_steps):
            inputs, targets = batch(
                corpus, seed=cfg.train.seed, step=step, seq_len=cfg.model.seq_len,
                micro_batch=cfg.train.micro_batch_size, dp_rank=dp_rank * micro_steps + micro,
                dp_size=dp_size * micro_steps,
            )
            loss = engine(inputs.to(ctx.device), targets.to(ctx.device))
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer on the last micro-batch only
            step_loss += loss.detach()
        # The mean over the world equals the data-parallel mean: TP peers hold the same loss.
        dist.all_reduce(step_loss)
        step_loss /= ctx.world_size * micro_steps
        step_time_s = time.perf_counter() - started
        evaluated = {}
        if windows is not None and _evaluates(cfg, step):
            evaluated["heldout_loss"] = heldout_loss(engine, windows, cfg.train.micro_batch_size, ctx.device)
        ctx.report(
            step,
            loss=step_loss.item(),
            step_time_s=step_time_s,
            tokens=tokens_per_step,
            flops=per_token * tokens_per_step,
            lr=engine.get_lr()[0],
            grad_norm=float(engine.get_global_grad_norm() or 0.0),
            **evaluated,
        )
        ctx.snapshot(engine, step)
        if ctx.should_checkpoint(step):
            ctx.save_checkpoint(engine, step)


def _evaluates(cfg: Config, step: int) -> bool:
    interval = cfg.evaluation.interval_steps
    return step == cfg.train.steps or (interval > 0 and step % interval == 0)


def heldout_loss(engine: Any, windows: tuple[Any, Any], micro_batch: int, device: Any) -> float:
    """Mean cross-entropy on the held-out windows. Every rank evaluates all of them (the same
    forwards on every rank, as ZeRO-3 and tensor parallelism need), so every rank gets the same value."""
    import torch

    inputs, targets = windows
    total, count = 0.0, 0
    engine.eval()
    try:
        with torch.no_grad():
            for start in range(0, inputs.shape[0], micro_batch):
                x, y = inputs[start:start + micro_batch], targets[start:start + micro_batch]
                total += float(engine(x.to(device), y.to(device))) * x.shape[0]
                count += x.shape[0]
    finally:
        engine.train()
    return total / count
