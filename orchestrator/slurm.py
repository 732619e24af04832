"""What a Slurm allocation offers, read from the job's environment, and the cluster settings it
gives a launch (``launch/slurm/job.py``).

Slurm names the allocation's nodes (``SLURM_JOB_NODELIST``, ``SLURM_JOB_NUM_NODES``), the node a
task runs on (``SLURMD_NODENAME``), its CPUs (``SLURM_CPUS_ON_NODE``) and GPUs
(``SLURM_GPUS_ON_NODE``, or ``SLURM_GPUS_PER_NODE`` as ``[type:]count``). A node's address is the
one Slurm itself uses to reach it (``NodeAddr`` in ``scontrol show node``): on a cluster whose host
names resolve to a management network, that is the address the job's traffic should use.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import load_config
from orchestrator.errors import ConfigError

_SCONTROL_TIMEOUT_S = 30.0


@dataclass(frozen=True, kw_only=True)
class SlurmAllocation:
    """The allocation this process runs in, and the node it runs on."""

    job_id: str
    restarts: int  # how often the job was requeued (SLURM_RESTART_COUNT)
    nodes: int
    node_names: list[str]
    node_name: str
    address: str
    cpus_on_node: int | None
    gpus_per_node: int | None

    @classmethod
    def from_environment(cls, env: dict[str, str] | None = None) -> SlurmAllocation:
        """Read it from Slurm's variables; :class:`ConfigError` outside an allocation."""
        env = dict(os.environ if env is None else env)
        job_id = env.get("SLURM_JOB_ID")
        if not job_id:
            raise ConfigError("not inside a Slurm allocation (SLURM_JOB_ID is not set): submit with "
                              "`sbatch --nodes=N launch/slurm.sbatch CONFIG`, or run inside `salloc`")
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "1")
        names = _hostnames(env.get("SLURM_JOB_NODELIST", ""), env) or [env.get("SLURMD_NODENAME", "")]
        name = env.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
        cpus = env.get("SLURM_CPUS_ON_NODE")
        return cls(job_id=job_id, restarts=int(env.get("SLURM_RESTART_COUNT") or 0), nodes=nodes, node_names=names,
                   node_name=name, address=_node_address(name, env),
                   cpus_on_node=int(cpus) if cpus and cpus.isdigit() else None, gpus_per_node=gpus_per_node(env))

    def ray_resources(self) -> list[str]:
        """``ray start`` options that give Ray this node's share of the allocation, not the whole machine."""
        options = [f"--num-cpus={self.cpus_on_node}"] if self.cpus_on_node else []
        if self.gpus_per_node is not None:
            options.append(f"--num-gpus={self.gpus_per_node}")
        return options

    def requeue_allowed(self) -> bool:
        """Whether the job was submitted to be requeued (``sbatch --requeue``, or the cluster's default)."""
        shown = _scontrol("show", "job", self.job_id, "-o")
        return re.search(r"\bRequeue=1\b", shown) is not None


def gpus_per_node(env: dict[str, str]) -> int | None:
    """GPUs Slurm gave this node: ``SLURM_GPUS_ON_NODE``, else ``SLURM_GPUS_PER_NODE`` (``[type:]count``)."""
    on_node = env.get("SLURM_GPUS_ON_NODE", "")
    if on_node.isdigit():
        return int(on_node)
    per_node = env.get("SLURM_GPUS_PER_NODE", "")
    count = per_node.rsplit(":", 1)[-1].split("(")[0]
    return int(count) if count.isdigit() else None


def cluster_settings(allocation: SlurmAllocation, config_path: str,
                     launch_args: list[str]) -> tuple[list[str], Path, list[str]]:
    """The ``--set`` options that fit ``CONFIG`` (with the user's ``--set``) to the allocation, the run
    directory, and the launch options left. ``cluster.nodes`` is the allocation's nodes less
    ``cluster.spare_nodes`` (the config's own value gives way, with a note; a ``--set`` that
    contradicts it is an error); on GPU nodes ``cluster.workers_per_node`` may not exceed the GPUs
    Slurm gave a node. The run directory is ``--run-dir``, or ``runs/slurm-JOBID``: a requeued job
    keeps its ID, so it finds its checkpoints there."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--run-dir")
    known, rest = parser.parse_known_args(launch_args)
    explicit = dict(item.split("=", 1) for item in known.set if "=" in item)
    # Validated as the launch will be: against a Ray cluster (the one on the allocation), not an embedded one.
    config = load_config(config_path, [*known.set, f"cluster.ray_address={allocation.address}:6379"])
    nodes = allocation.nodes - config.cluster.spare_nodes
    if nodes < 1:
        raise ConfigError(f"the allocation has {allocation.nodes} node(s) and cluster.spare_nodes is "
                          f"{config.cluster.spare_nodes}: ask sbatch for --nodes={config.cluster.spare_nodes + 1} "
                          "or more")
    if "cluster.nodes" in explicit and int(explicit["cluster.nodes"]) != nodes:
        raise ConfigError(f"--set cluster.nodes={explicit['cluster.nodes']} but the allocation has "
                          f"{allocation.nodes} node(s) (SLURM_JOB_NUM_NODES) with cluster.spare_nodes="
                          f"{config.cluster.spare_nodes}: submit with sbatch --nodes="
                          f"{int(explicit['cluster.nodes']) + config.cluster.spare_nodes}, or drop the --set")
    settings = ["--set", f"cluster.nodes={nodes}"]
    if config.cluster.nodes != nodes and "cluster.nodes" not in explicit:
        print(f"orchestrator (slurm): cluster.nodes {config.cluster.nodes} in {config_path} gives way to the "
              f"allocation's {nodes}", flush=True)
    gpus = allocation.gpus_per_node
    if config.cluster.device == "gpu" and gpus is not None and config.cluster.workers_per_node > gpus:
        raise ConfigError(f"cluster.workers_per_node is {config.cluster.workers_per_node} but Slurm gave each node "
                          f"{gpus} GPU(s) (SLURM_GPUS_ON_NODE): ask for --gpus-per-node="
                          f"{config.cluster.workers_per_node}, or set cluster.workers_per_node to {gpus}")
    run_dir = Path(known.run_dir or f"runs/slurm-{allocation.job_id}").absolute()
    return settings + [a for item in known.set for a in ("--set", item)], run_dir, rest


def resume_command(allocation: SlurmAllocation, config_path: str, launch_args: list[str], run_dir: Path,
                   batch: bool) -> str:
    """What resumes this job from its run directory: the same ``sbatch`` (``batch``), or the same
    ``salloc``/``srun.sh``, with ``--run-dir``; the user's own Slurm options aside."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--run-dir")
    _, rest = parser.parse_known_args(launch_args)
    nodes = f"--nodes={allocation.nodes}"
    start = (["sbatch", nodes, "launch/slurm.sbatch"] if batch else
             ["salloc", nodes, "--exclusive", "srun", "--nodes=1", "--ntasks=1", "--overlap", "launch/slurm/srun.sh"])
    return shlex.join([*start, config_path, *rest, "--run-dir", str(run_dir)])


def _hostnames(nodelist: str, env: dict[str, str]) -> list[str]:
    """``n[0-3],gpu7`` as host names, the way Slurm expands it."""
    if not nodelist:
        return []
    return _scontrol("show", "hostnames", nodelist, env=env).split()


def _node_address(name: str, env: dict[str, str]) -> str:
    """The address Slurm reaches node ``name`` at (its ``NodeAddr``), else what its name resolves to."""
    shown = _scontrol("show", "node", name, "-o", env=env)
    found = re.search(r"\bNodeAddr=(\S+)", shown)
    if found:
        return found.group(1)
    return socket.gethostbyname(name)


def _scontrol(*args: str, env: dict[str, str] | None = None) -> str:
    try:
        result = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=_SCONTROL_TIMEOUT_S,
                                env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"`scontrol {' '.join(args)}` failed: {exc}") from None
    return result.stdout
