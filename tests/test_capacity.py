"""A node asked for more ranks than it holds: refused with the numbers before anything starts, or warned."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.controller import capacity
from orchestrator.errors import ConfigError
from orchestrator.node_memory import Memory, memory, oom_kills
from tests.helpers import LOCAL_CONFIG, cli

GIB = 1 << 30
THIS_KIND_OF_MACHINE = capacity.NodeCapacity(cpus=2, memory=Memory(total=23 * GIB, available=20 * GIB))


def test_more_ranks_than_memory_holds_are_refused_with_the_node_s_numbers() -> None:
    config = load_config(LOCAL_CONFIG, ["cluster.workers_per_node=64"])
    with pytest.raises(ConfigError) as refused:
        capacity.check(config, THIS_KIND_OF_MACHINE)
    message = str(refused.value)
    assert message.startswith("cluster.workers_per_node=64: this node (2 CPU(s), 23.0 GiB of memory (20.0 GiB "
                              "available)) cannot hold 64 ranks"), message
    fit = int(message.split("at most ")[1].split()[0])
    assert 16 <= fit < 64, message


def test_ranks_that_fit_but_crowd_the_cpus_are_warned_about_and_a_fitting_job_is_not() -> None:
    crowded = capacity.check(load_config(LOCAL_CONFIG, ["cluster.workers_per_node=16"]), THIS_KIND_OF_MACHINE)
    assert crowded is not None and "8 ranks per CPU" in crowded and "2 CPU(s)" in crowded
    assert capacity.check(load_config(LOCAL_CONFIG, []), THIS_KIND_OF_MACHINE) is None


def test_a_bigger_model_needs_more_memory_per_rank() -> None:
    small = capacity.rank_footprint(load_config(LOCAL_CONFIG, []))
    big = capacity.rank_footprint(load_config(LOCAL_CONFIG, ["model.layers=24", "model.dim=1024", "model.heads=16"]))
    assert big - small > 24 * 12 * 1024 * 1024 * 16, "parameters, gradients, Adam's moments, snapshot copies"


def test_the_node_s_memory_and_oom_kills_are_read_from_proc(tmp_path: Path) -> None:
    meminfo, vmstat = tmp_path / "meminfo", tmp_path / "vmstat"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"
                       "HugePages_Total:       0\n")
    assert memory(meminfo) == Memory(total=24000000 * 1024, available=20000000 * 1024)
    vmstat.write_text("nr_free_pages 12\noom_kill 3\n")
    assert oom_kills(vmstat) == 3 and oom_kills(tmp_path / "missing") is None
    assert oom_kills() is not None, "this kernel counts them"


def test_launch_refuses_an_overloaded_node_in_seconds_with_exit_2(tmp_path: Path) -> None:
    result = cli("launch", str(LOCAL_CONFIG), "--set", "cluster.workers_per_node=4096", "--run-dir", str(tmp_path / "r"),
                 timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cluster.workers_per_node=4096: this node (" in result.stderr and "CPU(s)" in result.stderr, result.stderr
    assert not (tmp_path / "r" / "events.jsonl").exists()
