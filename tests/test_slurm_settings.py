"""How a Slurm allocation fills a launch's cluster settings (orchestrator/slurm.py), without Slurm."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.slurm import SlurmAllocation, cluster_settings, gpus_per_node, resume_command
from tests.helpers import REPO

LOCAL = str(REPO / "cluster_configs" / "local.yaml")
GPU = str(REPO / "cluster_configs" / "gpu_2x8.yaml")


def allocation(nodes: int = 2, gpus: int | None = None) -> SlurmAllocation:
    return SlurmAllocation(job_id="77", restarts=0, nodes=nodes, node_names=[f"n{i}" for i in range(nodes)], node_name="n0",
                           address="10.0.0.10", cpus_on_node=2, gpus_per_node=gpus)


def test_the_allocation_decides_the_node_count_and_the_run_directory_follows_the_job_id() -> None:
    settings, run_dir, rest = cluster_settings(allocation(2), LOCAL, ["--set", "train.steps=9", "--inject-fault=x"])
    assert settings == ["--set", "cluster.nodes=2", "--set", "train.steps=9"]
    assert run_dir == Path("runs/slurm-77").absolute() and rest == ["--inject-fault=x"]
    _, run_dir, _ = cluster_settings(allocation(2), LOCAL, ["--run-dir", "/shared/exp1"])
    assert run_dir == Path("/shared/exp1")


def test_spare_nodes_come_out_of_the_allocation_and_a_contradicting_set_is_refused() -> None:
    settings, _, _ = cluster_settings(allocation(3), LOCAL, ["--set", "cluster.spare_nodes=1"])
    assert settings[:2] == ["--set", "cluster.nodes=2"]
    with pytest.raises(ConfigError, match=r"--set cluster.nodes=4 but the allocation has 2 node\(s\).*"
                                          r"sbatch --nodes=4"):
        cluster_settings(allocation(2), LOCAL, ["--set", "cluster.nodes=4"])
    with pytest.raises(ConfigError, match=r"cluster.spare_nodes is 2: ask sbatch for --nodes=3"):
        cluster_settings(allocation(2), LOCAL, ["--set", "cluster.spare_nodes=2"])


def test_more_ranks_per_node_than_gpus_slurm_gave_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"workers_per_node is 8 but Slurm gave each node 4 GPU\(s\)"):
        cluster_settings(allocation(2, gpus=4), GPU, [])
    settings, _, _ = cluster_settings(allocation(2, gpus=8), GPU, [])
    assert settings == ["--set", "cluster.nodes=2"]


@pytest.mark.parametrize(("env", "gpus"), [
    ({"SLURM_GPUS_ON_NODE": "8"}, 8), ({"SLURM_GPUS_PER_NODE": "h100:4"}, 4), ({"SLURM_GPUS_PER_NODE": "2"}, 2),
    ({}, None),
])
def test_gpus_per_node_from_either_variable(env: dict[str, str], gpus: int | None) -> None:
    assert gpus_per_node(env) == gpus


def test_outside_an_allocation_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="not inside a Slurm allocation"):
        SlurmAllocation.from_environment({})


def test_a_preempted_job_names_the_slurm_command_that_resumes_it() -> None:
    """Not the `orchestrator launch` the script made up (with this allocation's Ray address): the same
    sbatch (or salloc) with the run directory, the user's launch options kept."""
    args = ["--set", "train.steps=400", "--run-dir", "/shared/old"]
    assert resume_command(allocation(2), "cluster_configs/local.yaml", args, Path("/shared/exp1"), batch=True) == (
        "sbatch --nodes=2 launch/slurm.sbatch cluster_configs/local.yaml --set train.steps=400 --run-dir /shared/exp1")
    assert resume_command(allocation(3), "c.yaml", [], Path("/r"), batch=False) == (
        "salloc --nodes=3 --exclusive srun --nodes=1 --ntasks=1 --overlap launch/slurm/srun.sh c.yaml --run-dir /r")
