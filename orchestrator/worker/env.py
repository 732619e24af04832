"""The environment of a rank's training process, built in one place from the config.

torch.distributed, DeepSpeed and NCCL read their settings from the
environment; building it here (and nowhere else) keeps that configuration
visible and testable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator.config.schema import Config


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
    """The rank's settings; the actor lays them over its own environment.

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


def with_interpreter_tools(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's ``bin/`` first on PATH.

    Torch builds DeepSpeed's ops with whichever ``ninja`` PATH finds first; two
    different ninjas (the system's, the virtualenv's) disagree on the build log
    and rebuild the op (~30 s) on every switch. Set-up builds with the
    virtualenv's, so the training processes must use it too.
    """
    bin_dir = os.path.dirname(sys.executable)
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    return {**env, "PATH": os.pathsep.join([bin_dir, *parts])}


def local_cpu_count() -> int:
    """CPUs this process may use (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0))
