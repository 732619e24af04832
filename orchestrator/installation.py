"""This installation: its interpreter's tools and the DeepSpeed CPU ops that set-up builds into it.

Everything an installation builds stays in directories it owns (``.venv/torch_extensions``), so
that other virtualenvs, stale caches and a killed build's lock on the same machine never reach it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from orchestrator.errors import ConfigError


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
