"""The environment of a rank's training process, built in one place from the config.

torch.distributed, DeepSpeed and NCCL read their settings from the
environment; building it here (and nowhere else) keeps that configuration
visible and testable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator.config.schema import Config
from orchestrator.worker.network import NCCL_ERROR_HANDLING


@dataclass(frozen=True, kw_only=True, slots=True)
class RankPlacement:
    """Where one rank runs and who its rendezvous peer is."""

    rank: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    node_cpus: int
    cuda_visible_devices: str | None = None
    network_env: Mapping[str, str] = field(default_factory=dict)


def rank_env(config: Config, placement: RankPlacement) -> dict[str, str]:
    """The rank's settings; the node agent lays them over its own environment.

    Layered: the node's detected network (``worker/network.py``), then ``cluster.env``, then
    what the rank's place in the job fixes.
    """
    env = {**placement.network_env, **config.cluster.env}
    env.update(
        RANK=str(placement.rank),
        LOCAL_RANK=str(placement.local_rank),
        WORLD_SIZE=str(config.cluster.world_size),
        LOCAL_WORLD_SIZE=str(placement.local_world_size),
        MASTER_ADDR=placement.master_addr,
        MASTER_PORT=str(placement.master_port),
        PYTHONUNBUFFERED="1",
        # Explicit, instead of DeepSpeed probing for a GPU (and warning when it finds none).
        DS_ACCELERATOR="cpu" if config.cluster.device == "cpu" else "cuda",
    )
    if config.cluster.device == "cpu":
        # Ranks sharing a node split its cores; oversubscribed OpenMP pools thrash.
        threads = max(1, placement.node_cpus // placement.local_world_size)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        if placement.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = placement.cuda_visible_devices
    return env


# Every rank's process (and what it starts) gets the run directory here: a script may keep its
# own checkpoints and outputs under it (docs/scripts.md).
RUN_DIR_ENV = "ORCHESTRATOR_RUN_DIR"


def torchrun_env(config: Config, rank: int, attempt: int, run_id: str) -> dict[str, str]:
    """The rest of torchrun's environment contract (``torch.distributed.run``), beside
    ``rank_env``'s ranks, world sizes and rendezvous address: code written for torchrun reads the
    same names with the same meaning. One role ("default") spans the job; a "group" is a node.

    A script's process group connects to a store that rank 0's process serves before the script
    starts (on ``MASTER_ADDR`` only), as torchrun's agent does: ``TORCHELASTIC_USE_AGENT_STORE``.
    """
    cluster = config.cluster
    return {
        "GROUP_RANK": str(rank // cluster.workers_per_node),
        "GROUP_WORLD_SIZE": str(cluster.nodes),
        "ROLE_RANK": str(rank),
        "ROLE_NAME": "default",
        "ROLE_WORLD_SIZE": str(cluster.world_size),
        "TORCHELASTIC_RESTART_COUNT": str(attempt),
        "TORCHELASTIC_MAX_RESTARTS": str(config.fault_tolerance.max_restarts),
        "TORCHELASTIC_RUN_ID": run_id,
        "TORCHELASTIC_USE_AGENT_STORE": str(config.train.is_script),
        # A script's process never rejoins (docs/scripts.md): torchrun's 1 (the watchdog ends it) is right.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": config.cluster.env.get(
            "TORCH_NCCL_ASYNC_ERROR_HANDLING", "1" if config.train.is_script else NCCL_ERROR_HANDLING),
    }


def local_cpu_count() -> int:
    """CPUs this process may use (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0))
