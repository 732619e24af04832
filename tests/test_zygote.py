"""The node's zygote on a GPU node, with a stand-in for the GPU (tests/gpu_standin/): a forked child can
use CUDA only if the zygote never initialised it, and forking is safe only from a process with one thread.

The stand-in's NVML runs a thread while initialised, as NVIDIA's does, and records which process called
``nvmlInit``; torch's CUDA calls are recorded the same way. The zygote is prepared exactly as an agent
prepares it on a GPU node (the node's rank environment, ``cluster.device: gpu``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from orchestrator.agent.hosted import HostedProcess, Zygote
from orchestrator.config import load_config
from orchestrator.config.schema import RESERVED_ENV
from orchestrator.controller.zygote_ahead import ZygoteAhead
from orchestrator.worker.env import RankPlacement, rank_env
from tests.helpers import LOCAL_CONFIG, wait_gone

pytestmark = [pytest.mark.processes, pytest.mark.timeout(180)]

STANDIN = Path(__file__).parent / "gpu_standin"


def _records(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text().split() if path.exists() else []
    return [(int(pid), what) for pid, what in zip(lines[::2], lines[1::2])]


def test_a_gpu_nodes_zygote_touches_neither_cuda_nor_nvml_and_forks_children_that_read_nvml(tmp_path: Path) -> None:
    config = load_config(LOCAL_CONFIG, ["cluster.device=gpu", "cluster.workers_per_node=1"])
    placement = RankPlacement(rank=0, local_rank=0, local_world_size=1, master_addr="127.0.0.1", master_port=0,
                              node_cpus=os.cpu_count() or 1, cuda_visible_devices="0")
    node_env = {k: v for k, v in rank_env(config, placement).items() if k not in RESERVED_ENV}
    assert node_env["DS_ACCELERATOR"] == "cuda"
    record = tmp_path / "record"
    env = {**node_env, "GPU_STANDIN_RECORD": str(record),
           "PYTHONPATH": os.pathsep.join([str(STANDIN), *sys.path])}
    zygote = Zygote(config.model_dump(mode="json"), env, tmp_path / "zygote.log")
    child = None
    try:
        ready = zygote.wait_ready(150)
        log = (tmp_path / "zygote.log").read_text()
        assert ready, f"{zygote.error}\n{log}"
        in_zygote = [what for pid, what in _records(record) if pid == zygote.proc.pid]
        assert in_zygote == [], f"the zygote itself touched the GPU before forking: {in_zygote}"
        child = HostedProcess(env, tmp_path / "child.log", "child", zygote=zygote)
        zygote.adopt(child)
        deadline = time.monotonic() + 30
        while not [what for pid, what in _records(record) if pid == child.pid] and time.monotonic() < deadline:
            time.sleep(0.05)
        # DeepSpeed's accelerator believes NVML ready (its import called nvmlInit): the child makes it so.
        assert [what for pid, what in _records(record) if pid == child.pid] == ["nvmlInit"]
        assert child.poll_exit() is None, (tmp_path / "child.log").read_text()
    finally:
        if child is not None:
            child.stop(2.0)
        zygote.stop()


def test_a_zygote_started_ahead_is_adopted_only_as_itself_and_for_its_node_settings(tmp_path: Path) -> None:
    """The controller's zygote started before Ray (controller/zygote_ahead.py): offered once, only to
    an agent whose node settings it was started with; adopted only when its own pid answers on the
    socket; an adopted zygote forks, and its exit is seen though it is not the agent's child."""
    config = load_config(LOCAL_CONFIG).model_dump(mode="json")
    node = {"ORCH_TEST_NODE": "a"}
    other = ZygoteAhead(config, node, tmp_path / "other.log")
    assert other.offer({"ORCH_TEST_NODE": "b"}) is None, "offered for another node's settings"
    assert wait_gone([other.pid]) == [], "a zygote no agent may take must be stopped"
    ahead = ZygoteAhead(config, node, tmp_path / "zygote.log")
    zygote = child = impostor = None
    try:
        where = ahead.offer(dict(node))
        assert where == (ahead.name, ahead.pid)
        assert ahead.offer(dict(node)) is None, "offered twice"
        impostor = Zygote(config, node, tmp_path / "impostor.log", ahead=(ahead.name, os.getpid()))
        assert impostor.proc.popen is not None, "adopted a process other than the one named"
        impostor.stop()
        zygote = Zygote(config, node, tmp_path / "zygote.log", ahead=where)
        assert zygote.proc.popen is None and zygote.proc.pid == ahead.pid
        assert zygote.wait_ready(150), f"{zygote.error}\n{(tmp_path / 'zygote.log').read_text()}"
        child = HostedProcess(node, tmp_path / "child.log", "child", zygote=zygote)
        zygote.adopt(child)
        assert child.poll_exit() is None, (tmp_path / "child.log").read_text()
        os.kill(ahead.pid, 9)
        deadline = time.monotonic() + 10
        while zygote.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not zygote.alive(), "the adopted zygote's exit went unseen"
        assert wait_gone([child.pid]) == [], "a forked rank outlived its zygote"
        log = (tmp_path / "zygote.log").read_text()
        assert log.startswith("=== zygote, started by the controller before Ray ===") and "adopted" in log
    finally:
        for proc in (child, zygote):
            if proc is not None:
                proc.stop(2.0) if proc is child else proc.stop()
        ahead.close()
