"""A script that trains for --seconds with gloo all-reduces and never reports progress.

With --busy-s S, every rank of the first attempt first computes for S seconds in a loop on one
line of native calls (its call stack never changes; only its CPU time shows it is busy). With
--stall-attempt N, rank 1 stops making progress (sleeps forever) in restart N, while rank 0 waits
for it in an all-reduce: a hang only its blocked main thread shows.
"""

import argparse
import os
import time
import zlib

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--seconds", type=float, required=True)
parser.add_argument("--stall-attempt", type=int, default=-1)
parser.add_argument("--busy-s", type=float, default=0.0)
args = parser.parse_args()

dist.init_process_group("gloo")
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
weights = torch.randn(256, 256)
print("looping", flush=True)
if attempt == 0:
    block, t = os.urandom(2**20), time.time()
    while time.time() - t < args.busy_s: zlib.compress(block, 9)  # noqa: E701
deadline = time.monotonic() + args.seconds
i = 0
while True:
    done = torch.tensor([1.0 if time.monotonic() > deadline else 0.0])
    dist.all_reduce(done, op=dist.ReduceOp.MAX)  # every rank stops after the same iteration
    if done.item():
        break
    if attempt == args.stall_attempt and dist.get_rank() == 1 and i == 20:
        print("stalling", flush=True)
        time.sleep(1e9)
    grad = weights @ weights.T
    dist.all_reduce(grad)
    weights -= 1e-6 * grad / dist.get_world_size()
    i += 1
    time.sleep(0.02)
print(f"rank {dist.get_rank()}: {i} iterations", flush=True)
dist.destroy_process_group()
