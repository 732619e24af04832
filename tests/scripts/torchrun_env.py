"""Writes the torchrun environment contract this rank sees to OUT_DIR/rank{RANK}.json, after a
gloo all-reduce over the env:// rendezvous that proves the variables work.

    torchrun --nproc_per_node 2 tests/scripts/torchrun_env.py OUT_DIR
"""

import json
import os
import sys

import torch
import torch.distributed as dist

CONTRACT = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
            "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
            "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING")

dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as fh:
    json.dump({"env": {k: os.environ.get(k) for k in CONTRACT}, "sum": total.item(), "argv": sys.argv,
               "main": __name__, "cwd": os.getcwd()}, fh)
dist.destroy_process_group()
