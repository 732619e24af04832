"""The rank environment, built in one place from the config."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import load_config
from orchestrator.installation import with_interpreter_tools
from orchestrator.worker.env import RankPlacement, rank_env
from tests.helpers import LOCAL_CONFIG, cli, launch_args


def _placement(**kw) -> RankPlacement:
    base = dict(rank=1, local_rank=1, local_world_size=2, master_addr="127.0.0.1", master_port=29555, node_cpus=8)
    return RankPlacement(**{**base, **kw})


def test_cpu_rank_env() -> None:
    env = rank_env(load_config(LOCAL_CONFIG), _placement())
    assert env["RANK"] == "1" and env["LOCAL_RANK"] == "1" and env["WORLD_SIZE"] == "2"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "29555"
    assert env["OMP_NUM_THREADS"] == "4", "ranks on a node split its cores"
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["DS_ACCELERATOR"] == "cpu"


def test_gpu_rank_env_and_user_env() -> None:
    config = load_config(LOCAL_CONFIG, ["cluster.device=gpu", "cluster.env.NCCL_IB_HCA=mlx5", "cluster.env.OMP_NUM_THREADS=2"])
    network = {"NCCL_IB_HCA": "mlx5_0:1", "NCCL_SOCKET_IFNAME": "ib0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
    env = rank_env(config, _placement(cuda_visible_devices="0,1", network_env=network))
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["DS_ACCELERATOR"] == "cuda"
    assert env["NCCL_IB_HCA"] == "mlx5" and env["OMP_NUM_THREADS"] == "2", "cluster.env wins over detection"
    assert env["NCCL_SOCKET_IFNAME"] == "ib0" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"


def test_training_processes_use_this_interpreters_tools() -> None:
    import os
    import sys

    env = with_interpreter_tools({"PATH": "/usr/bin:/bin"})
    assert env["PATH"].split(os.pathsep) == [os.path.dirname(sys.executable), "/usr/bin", "/bin"]


def test_a_launch_never_compiles_deepspeeds_cpu_ops_and_names_a_stale_lock(tmp_path: Path) -> None:
    from orchestrator.installation import CPU_OPS, cpu_op_problem

    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    assert "deepspeed_shm_comm, fused_adam, cpu_adam are not built in" in cpu_op_problem(env)
    result = cli(*launch_args(tmp_path / "run"), env=env, timeout=60)
    assert result.returncode == 2 and f"are not built in {tmp_path}" in result.stderr
    assert "bash .ci/setup" in result.stderr
    assert not (tmp_path / "run").exists(), "nothing started"
    for name in CPU_OPS:
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.so").write_bytes(b"")
    assert cpu_op_problem(env) is None
    (tmp_path / "cpu_adam" / "cpu_adam.so").unlink()
    assert "CPU ops cpu_adam are not built" in cpu_op_problem(env), "names exactly what is missing"
    (tmp_path / "cpu_adam" / "cpu_adam.so").write_bytes(b"")
    lock = tmp_path / "fused_adam" / "lock"
    lock.touch()  # what a build killed mid-way leaves; torch would wait on it forever
    result = cli(*launch_args(tmp_path / "run"), env=env, timeout=60)
    assert result.returncode == 2 and f"left its lock behind: {lock}" in result.stderr
