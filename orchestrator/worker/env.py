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
from pathlib import Path

from orchestrator.config.schema import Config
from orchestrator.errors import ConfigError


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
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": config.cluster.env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
    }


def with_interpreter_tools(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's ``bin/`` first on PATH and this installation's
    ``TORCH_EXTENSIONS_DIR`` (unless ``env`` names one).

    Torch builds DeepSpeed's ops with whichever ``ninja`` PATH finds first; two
    different ninjas (the system's, the virtualenv's) disagree on the build log
    and rebuild the op (~30 s) on every switch. Set-up builds with the
    virtualenv's, into the virtualenv's own directory (not the per-user cache
    other installations share), so the training processes must use both too.
    """
    bin_dir = os.path.dirname(sys.executable)
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    return {**env, "PATH": os.pathsep.join([bin_dir, *parts]), EXTENSIONS_ENV: str(extensions_dir(env))}


def extensions_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where DeepSpeed's compiled ops live: ``TORCH_EXTENSIONS_DIR``, else this installation's
    ``torch_extensions/`` (what ``.ci/setup`` builds into)."""
    return Path(env.get(EXTENSIONS_ENV) or Path(sys.prefix) / "torch_extensions")


def cpu_op_problem(env: Mapping[str, str] = os.environ) -> str | None:
    """Why a CPU job cannot start here without compiling one of DeepSpeed's CPU ops (30 to 50 s each,
    and a hang forever behind a build lock a killed build left), or None when they are all ready."""
    root = extensions_dir(env)
    fix = "build them once with `bash .ci/setup` (or, with the same TORCH_EXTENSIONS_DIR, `python -c \"from " \
          "deepspeed.accelerator import get_accelerator as a; a().create_op_builder('BUILDER').load()\"` for " \
          f"each of {', '.join(CPU_OPS.values())})"
    for name in CPU_OPS:
        if (root / name / "lock").exists():
            return (f"a build of DeepSpeed's CPU op {name} left its lock behind: {root / name / 'lock'} (a build that "
                    f"was killed; torch would wait on it forever). If no build is running, remove it and {fix}")
    missing = [name for name in CPU_OPS if not (root / name / f"{name}.so").exists()]
    if missing:
        return (f"DeepSpeed's CPU ops {', '.join(missing)} are not built in {root} (a launch never compiles "
                f"them); {fix}")
    return None


EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
# The ops a CPU job loads (op name -> DeepSpeed's builder): the shared-memory communication op
# every CPU job uses, and the CPU Adam/AdamW kernels a DeepSpeed config's "AdamW" optimizer
# (FusedAdam on CPU) or ZeRO-Offload (DeepSpeedCPUAdam) load. Set-up builds them all.
CPU_OPS = {"deepspeed_shm_comm": "ShareMemCommBuilder", "fused_adam": "FusedAdamBuilder", "cpu_adam": "CPUAdamBuilder"}


def use_prebuilt_cpu_op() -> None:
    """Hand DeepSpeed its CPU ops, built by set-up, so that it never enters torch's JIT build: that
    takes a lock file on every load, even with nothing to build, and a process killed holding it
    (any SIGKILLed rank could be) left every later launch waiting on it forever.
    Raises ``ConfigError`` (naming the fix) when an op is not built here."""
    problem = cpu_op_problem()
    if problem is not None:
        raise ConfigError(problem)
    import importlib.util

    import torch  # noqa: F401  - the ops link against libtorch, which must be loaded first
    from deepspeed.ops.op_builder.builder import OpBuilder

    for name in CPU_OPS:
        if name in OpBuilder._loaded_ops:
            continue
        spec = importlib.util.spec_from_file_location(name, extensions_dir() / name / f"{name}.so")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        OpBuilder._loaded_ops[name] = module  # what OpBuilder.load() returns from now on


def local_cpu_count() -> int:
    """CPUs this process may use (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0))
