"""What a checkpoint costs the training loop: synchronous against asynchronous saves, side by side.

One process builds the built-in GPT under DeepSpeed (ZeRO-2, one gloo rank),
takes two optimizer steps so that every state exists, and then saves the same
state through the orchestrator's own path (``TrainContext.save_checkpoint``),
alternating ``checkpoint.async_save`` false and true, ``--repeats`` times:

- blocked time: how long ``save_checkpoint`` keeps the training loop, per mode;
- background write throughput: bytes / time the writer thread took to
  serialise, checksum and fsync them (asynchronous saves);
- plain write throughput: the same bytes written by one ``write`` and an
  ``fsync`` to a file on the same disk, measured in the same invocation.

Targets (issue 4): async blocked <= 1/10 of sync blocked, background write
>= 1/2 of the plain write's throughput.

    PATH=.venv/bin:$PATH .venv/bin/python bench/checkpoint.py [--dim 768] [--layers 6] [--repeats 3] [--dir runs]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.config import load_config
from orchestrator.worker.context import TrainContext

REPO = Path(__file__).resolve().parent.parent


class Recorder:
    """Stands in for the control channel: keeps what the rank reports."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=str(REPO / "runs"), help="where to write (the disk under test)")
    args = parser.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    import torch

    from orchestrator.training.corpus import batch, load_corpus
    from orchestrator.training.engine import build_engine
    from orchestrator.training.model import GPT

    overrides = ["cluster.workers_per_node=1", f"model.dim={args.dim}", f"model.layers={args.layers}",
                 "model.heads=8", "train.micro_batch_size=2"]
    configs = {mode: load_config(REPO / "cluster_configs" / "local.yaml", [*overrides, f"checkpoint.async_save={mode}"])
               for mode in ("false", "true")}
    recorder = Recorder()
    contexts = {mode: TrainContext(rank=0, local_rank=0, world_size=1, node="bench", attempt=0, config=cfg,
                                   run_dir=work, resume_tag=None, _channel=recorder)  # type: ignore[arg-type]
                for mode, cfg in configs.items()}
    cfg = configs["true"]
    contexts["true"].init_distributed()
    torch.manual_seed(0)
    engine = build_engine(cfg, GPT(cfg.model))
    corpus = load_corpus()
    for step in (1, 2):
        inputs, targets = batch(corpus, seed=0, step=step, seq_len=cfg.model.seq_len, micro_batch=2, dp_rank=0, dp_size=1)
        engine.backward(engine(inputs, targets))
        engine.step()

    blocked: dict[str, list[float]] = {"false": [], "true": []}
    background: list[float] = []
    plain: list[float] = []
    step = 100
    for _ in range(args.repeats):
        for mode, ctx in contexts.items():
            step += 1
            recorder.messages.clear()
            started = time.perf_counter()
            ctx.save_checkpoint(engine, step)
            blocked[mode].append(time.perf_counter() - started)
            ctx.wait_for_saves()
            [saved] = [m for m in recorder.messages if m["type"] == "checkpoint_saved"]
            size = sum(f["size"] for f in saved["files"].values())
            if mode == "true":
                background.append(size / saved["write_s"])
                plain.append(plain_write(work, size))
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
    engine.destroy()

    sync_s, async_s = statistics.median(blocked["false"]), statistics.median(blocked["true"])
    bg, base = statistics.median(background), statistics.median(plain)
    mib = size / 2**20
    print(f"state: {mib:.0f} MiB per save, {args.repeats} saves per mode (medians)")
    print(f"blocked by a synchronous save:   {sync_s * 1000:8.1f} ms")
    print(f"blocked by an asynchronous save: {async_s * 1000:8.1f} ms")
    print(f"background write throughput:     {bg / 2**20:8.0f} MiB/s")
    print(f"plain write+fsync throughput:    {base / 2**20:8.0f} MiB/s")
    print(f"ratio blocked async/sync: {async_s / sync_s:.3f} (target <= 0.1)")
    print(f"ratio write background/plain: {bg / base:.2f} (target >= 0.5)")
    return 0 if async_s / sync_s <= 0.1 and bg / base >= 0.5 else 1


def plain_write(directory: Path, size: int) -> float:
    """Throughput of writing ``size`` bytes with one write and an fsync, on the same disk."""
    data = os.urandom(size)
    path = directory / "plain.bin"
    started = time.perf_counter()
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return size / seconds


if __name__ == "__main__":
    sys.exit(main())
