"""Model FLOPs utilisation of the built-in GPT on one NVIDIA GPU: the orchestrator (DeepSpeed
ZeRO-2, nccl, Ray actor, checkpoints off) against a plain PyTorch loop on the same GPU, same model
and batch, in the same run.

MFU = model FLOPs per step (6 x parameters x tokens, attention's own left out: what the training
loop reports) / step time / the GPU's dense fp32 peak (training runs in fp32; the peak table is
``orchestrator.monitor.metrics.PEAK_FLOPS``). The ratio orchestrator / plain loop is what the
orchestrator costs (ideally ~1.0); the absolute MFU is what this small model gets out of the GPU.

    .venv/bin/python bench/gpu.py [--steps 200] [--warmup 20] [--layers 12 --dim 768 --heads 12 --seq-len 512 --micro-batch 16]

Needs a CUDA GPU; exits 2 with the reason elsewhere.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.config import load_config  # noqa: E402
from orchestrator.events import read_events  # noqa: E402
from orchestrator.monitor.metrics import PEAK_FLOPS  # noqa: E402

CONFIG = REPO / "cluster_configs" / "local.yaml"


def peak_flops(name: str) -> float | None:
    return next((peak for part, peak in PEAK_FLOPS if part in name), None)


def plain_loop(overrides: list[str], steps: int, warmup: int) -> tuple[float, float]:
    """Median step time and FLOPs per step of a plain fp32 PyTorch loop (AdamW) on cuda:0."""
    import torch

    from orchestrator.training.corpus import batch, load_corpus
    from orchestrator.training.model import GPT

    cfg = load_config(CONFIG, overrides)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    corpus = load_corpus()
    tokens = cfg.train.micro_batch_size * cfg.model.seq_len
    flops = 6 * sum(p.numel() for p in model.parameters()) * tokens
    times = []
    for step in range(1, warmup + steps + 1):
        torch.cuda.synchronize()
        started = time.perf_counter()
        inputs, targets = batch(corpus, seed=cfg.train.seed, step=step, seq_len=cfg.model.seq_len,
                                micro_batch=cfg.train.micro_batch_size, dp_rank=0, dp_size=1)
        loss = model(inputs.cuda(), targets.cuda())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the orchestrator's loop reads the loss every step too
        if step > warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times), flops


def orchestrator_run(overrides: list[str], steps: int, warmup: int) -> tuple[float, float]:
    """Median step time and FLOPs per step of ``orchestrator launch`` on one GPU (from its event log)."""
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "orchestrator", "launch", str(CONFIG), "--run-dir", str(run_dir)]
        for item in [*overrides, f"train.steps={warmup + steps}", "metrics.port=0"]:
            cmd += ["--set", item]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise SystemExit(f"orchestrator launch failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        steps_seen = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "step" and e["step"] > warmup]
    return statistics.median(e["step_time_s"] for e in steps_seen), steps_seen[0]["flops"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=16)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name)
    shape = [f"model.layers={args.layers}", f"model.dim={args.dim}", f"model.heads={args.heads}",
             f"model.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}"]
    job = [*shape, "cluster.device=gpu", "cluster.workers_per_node=1", "checkpoint.interval_steps=0"]

    plain_s, flops = plain_loop(shape, args.steps, args.warmup)
    torch.cuda.empty_cache()
    orch_s, orch_flops = orchestrator_run(job, args.steps, args.warmup)
    assert orch_flops == flops, (orch_flops, flops)

    print(f"GPU: {name} (dense fp32 peak {peak / 1e12:.1f} TFLOP/s)" if peak else f"GPU: {name} (peak unknown)")
    print(f"model: {' '.join(shape)}; {flops / 1e9:.1f} GFLOP per step; median of {args.steps} steps "
          f"after {args.warmup} warm-up")
    print(f"{'':28}{'step time':>12}{'TFLOP/s':>10}{'MFU':>8}")
    for label, seconds in (("plain PyTorch loop", plain_s), ("orchestrator (ZeRO-2)", orch_s)):
        tflops = flops / seconds / 1e12
        mfu = f"{flops / seconds / peak:.1%}" if peak else "n/a"
        print(f"{label:28}{seconds * 1e3:>10.1f}ms{tflops:>10.1f}{mfu:>8}")
    print(f"ratio orchestrator / plain loop (throughput): {plain_s / orch_s:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
