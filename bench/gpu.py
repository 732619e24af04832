"""Model FLOPs utilisation on one NVIDIA GPU: the orchestrator (DeepSpeed ZeRO-2, nccl, Ray, checkpoints
off) against a plain PyTorch loop of the same model, batch and precision, on the same GPU in the same run.

MFU = model FLOPs per step / step time / the GPU's dense peak in the dtype trained in.
Model FLOPs per token (``orchestrator.training.model.flops_per_token``, what the built-in workload
reports): 6 per weight of a matrix product (forward and backward; the embeddings are lookups) plus
attention's score and value products, 12 x layers x seq_len x dim (PaLM, appendix B). The peak is
read off ``orchestrator.monitor.metrics.PEAK_FLOPS`` for the GPU NVML names (H100 SXM and H200: 989
TFLOP/s in bf16; fp32 figures only with ``--precision fp32``, and labelled so).

The default model is one a GPU trains for real: 20 layers of width 2048 (16 heads of 128), sequence
2048, about 1.0 B parameters, bf16 (fp32 master weights), PyTorch's fused attention
(``scaled_dot_product_attention``). The plain loop is what a PyTorch user writes: fp32 weights,
``torch.autocast`` to bf16, fused AdamW. The ratio orchestrator / plain loop is what the
orchestrator costs (target >= 0.97).

    .venv/bin/python bench/gpu.py [--steps 30] [--warmup 10] [--precision bf16] [--json PATH]
                                  [--layers 20 --dim 2048 --heads 16 --seq-len 2048 --micro-batch 8]
    .venv/bin/python bench/gpu.py --dry-run    # on a CPU: a toy model through the same code, no MFU

Needs a CUDA GPU (exits 2 with the reason elsewhere), except with ``--dry-run``.
"""

from __future__ import annotations

import argparse
import json
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
from orchestrator.monitor.metrics import peak_flops  # noqa: E402
from orchestrator.worker.context import torch_dtype  # noqa: E402

CONFIG = REPO / "cluster_configs" / "local.yaml"
DRY_SHAPE = {"layers": 2, "dim": 64, "heads": 4, "seq_len": 64, "micro_batch": 2}


def gpu_name() -> str:
    """GPU 0's model as NVML names it (the name the peak table is keyed by)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    finally:
        pynvml.nvmlShutdown()
    return name.decode() if isinstance(name, bytes) else name


def plain_loop(overrides: list[str], steps: int, warmup: int, device: str) -> tuple[float, float, int]:
    """Median step time, model FLOPs per step and parameters of a plain PyTorch loop: fp32 weights,
    autocast to ``train.precision`` (none for fp32; GradScaler for fp16), fused AdamW where the device
    has it."""
    import torch

    from orchestrator.training.corpus import batch, load_corpus
    from orchestrator.training.model import GPT, flops_per_token

    cfg = load_config(CONFIG, overrides)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0,
                                  fused=device.startswith("cuda"))
    precision = cfg.train.precision
    autocast = torch.autocast(device.split(":")[0], dtype=torch_dtype(precision),
                              enabled=precision != "fp32")
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    corpus = load_corpus()
    flops = flops_per_token(model, cfg.model) * cfg.train.micro_batch_size * cfg.model.seq_len
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for step in range(1, warmup + steps + 1):
        sync()
        started = time.perf_counter()
        inputs, targets = batch(corpus, seed=cfg.train.seed, step=step, seq_len=cfg.model.seq_len,
                                micro_batch=cfg.train.micro_batch_size, dp_rank=0, dp_size=1)
        with autocast:
            loss = model(inputs.to(device), targets.to(device))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the orchestrator's DeepSpeed config
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the orchestrator's loop reads the loss every step too
        if step > warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times), flops, sum(p.numel() for p in model.parameters())


def orchestrator_run(overrides: list[str], steps: int, warmup: int) -> tuple[float, float]:
    """Median step time and model FLOPs per step of ``orchestrator launch`` (from its event log)."""
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
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--dry-run", action="store_true",
                        help="on a CPU: a toy model through both loops, to check the script itself (no MFU)")
    args = parser.parse_args()
    if args.dry_run:
        for key, value in DRY_SHAPE.items():
            setattr(args, key, value)
        args.steps, args.warmup = 3, 1

    import torch

    if args.dry_run:
        device, name, peak = "cpu", "CPU (dry run)", None
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False); "
              "--dry-run checks the script on a CPU", file=sys.stderr)
        return 2
    else:
        device, name = "cuda:0", gpu_name()
        peak = peak_flops(name, args.precision)
    shape = [f"model.layers={args.layers}", f"model.dim={args.dim}", f"model.heads={args.heads}",
             f"model.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
             f"train.precision={args.precision}"]
    job = [*shape, f"cluster.device={'cpu' if args.dry_run else 'gpu'}", "cluster.workers_per_node=1",
           "checkpoint.interval_steps=0"]

    plain_s, flops, parameters = plain_loop(shape, args.steps, args.warmup, device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    orch_s, orch_flops = orchestrator_run(job, args.steps, args.warmup)
    assert orch_flops == flops, (orch_flops, flops)

    peak_text = f"dense {args.precision} peak {peak / 1e12:.0f} TFLOP/s" if peak else "no known peak"
    print(f"GPU: {name} ({peak_text})")
    print(f"model: {' '.join(shape)}; {parameters / 1e9:.3f} B parameters; {flops / 1e12:.2f} TFLOP per step "
          f"(attention included); median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'':30}{'step time':>12}{'TFLOP/s':>10}{'MFU':>8}")
    rows = {}
    for label, seconds in (("plain PyTorch loop (autocast)", plain_s), ("orchestrator (ZeRO-2)", orch_s)):
        mfu = flops / seconds / peak if peak else None
        rows[label] = {"step_s": seconds, "tflops": flops / seconds / 1e12, "mfu": mfu}
        print(f"{label:30}{seconds * 1e3:>10.1f}ms{flops / seconds / 1e12:>10.1f}"
              f"{f'{mfu:.1%}' if mfu is not None else 'n/a':>8}")
    ratio = plain_s / orch_s
    print(f"ratio orchestrator / plain loop (throughput): {ratio:.3f} (target >= 0.97)")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "gpu": name, "precision": args.precision, "peak_flops": peak, "parameters": parameters,
            "flops_per_step": flops, "shape": shape, "steps": args.steps, "warmup": args.warmup,
            "plain": rows["plain PyTorch loop (autocast)"], "orchestrator": rows["orchestrator (ZeRO-2)"],
            "ratio": ratio, "dry_run": args.dry_run,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
