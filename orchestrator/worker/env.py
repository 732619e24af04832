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
    """Why a CPU job cannot start here without compiling DeepSpeed's shared-memory op (about 30 s,
    and a hang forever behind a build lock a killed build left), or None when it is ready."""
    directory = extensions_dir(env) / CPU_OP
    fix = "build it once with `bash .ci/setup` (or the same TORCH_EXTENSIONS_DIR and `python -c \"from " \
          "deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()\"`)"
    if (directory / "lock").exists():
        return (f"a build of DeepSpeed's CPU op left its lock behind: {directory / 'lock'} (a build that was "
                f"killed; torch would wait on it forever). If no build is running, remove it and {fix}")
    if not (directory / f"{CPU_OP}.so").exists():
        return f"DeepSpeed's CPU communication op is not built in {directory} (a launch never compiles it); {fix}"
    return None


EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
CPU_OP = "deepspeed_shm_comm"


def use_prebuilt_cpu_op() -> None:
    """Hand DeepSpeed its CPU communication op, built by set-up, so that it never enters torch's JIT
    build: that takes a lock file on every load, even with nothing to build, and a process killed
    holding it (any SIGKILLed rank could be) left every later launch waiting on it forever.
    Raises ``ConfigError`` (naming the fix) when the op is not built here."""
    problem = cpu_op_problem()
    if problem is not None:
        raise ConfigError(problem)
    import importlib.util

    import torch  # noqa: F401  - the op links against libtorch, which must be loaded first
    from deepspeed.ops.op_builder.builder import OpBuilder

    if CPU_OP in OpBuilder._loaded_ops:
        return
    spec = importlib.util.spec_from_file_location(CPU_OP, extensions_dir() / CPU_OP / f"{CPU_OP}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    OpBuilder._loaded_ops[CPU_OP] = module  # what OpBuilder.load() returns from now on


def local_cpu_count() -> int:
    """CPUs this process may use (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0))
