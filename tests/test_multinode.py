"""Multi-node jobs on a dev-cluster: one network namespace (and address) per node, real Ray nodes,
gloo across a bridge, real SIGKILLs and cut links.

Expensive runs are shared: one clean 4-rank run on one node, one 2-node cluster for the layout
and tensor-parallel runs, a fresh 3-node cluster (2 + a spare) per lost-node scenario.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import devcluster
from orchestrator.controller.reaper import marked_pids
from tests.helpers import cli, events, launch_args, losses_by_step, of_kind, start_cli, wait_for_event

pytestmark = [pytest.mark.processes, pytest.mark.timeout(600)]

STEPS = 60
BASE = (f"train.steps={STEPS}", "checkpoint.interval_steps=10")

if not devcluster.namespaces_available():
    pytest.skip("network namespaces need root and iproute2", allow_module_level=True)


def _up(nodes: int) -> dict[str, Any]:
    result = cli("dev-cluster", "up", "--nodes", str(nodes), "--json", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _down(cluster: dict[str, Any]) -> None:
    result = cli("dev-cluster", "down", cluster["name"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert not (devcluster.state_root() / cluster["name"]).exists()
    assert not any(marked_pids(f"{cluster['name']}:{n['index']}", set(), env=devcluster.NODE_MARK_ENV)
                   for n in cluster["nodes"]), "dev-cluster down left a process behind"


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The same job on one node with 4 ranks."""
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    result = cli(*launch_args(run_dir, *BASE, "cluster.workers_per_node=4"), timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    return losses_by_step(events(run_dir))


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[dict[str, Any]]:
    cluster = _up(2)
    try:
        yield cluster
    finally:
        _down(cluster)


def _on_cluster(cluster: dict[str, Any], *overrides: str) -> tuple[str, ...]:
    return (*BASE, f"cluster.ray_address={cluster['address']}", "cluster.nodes=2", *overrides)


def _ips_by_rank(evs: list[dict[str, Any]]) -> dict[int, str]:
    return {w["rank"]: w["node_ip"] for w in of_kind(evs, "worker_started") if w["attempt"] == 0}


@pytest.fixture(scope="module")
def tp1_run(two_nodes: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("tp1") / "run"
    result = cli(*launch_args(run_dir, *_on_cluster(two_nodes)), timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    return events(run_dir)


def test_two_nodes_hold_two_ranks_each_and_train_like_one_node(
    two_nodes: dict[str, Any], tp1_run: list[dict[str, Any]], clean: dict[int, float]
) -> None:
    ips = _ips_by_rank(tp1_run)
    node_addresses = {n["address"] for n in two_nodes["nodes"]}
    assert ips[0] == ips[1] and ips[2] == ips[3] and ips[0] != ips[2], ips
    assert {ips[0], ips[2]} <= node_addresses, "ranks run on the namespaces' addresses, not loopback"
    configured = of_kind(tp1_run, "network_configured")
    assert {e["address"] for e in configured} >= {ips[0], ips[2]}
    assert all(e["interface"] == "eth0" and e["env"]["GLOO_SOCKET_IFNAME"] == "eth0" for e in configured)
    losses = losses_by_step(tp1_run)
    assert sorted(losses) == sorted(clean) == list(range(1, STEPS + 1))
    assert max(abs(losses[s] - clean[s]) for s in clean) <= 1e-5


def test_tensor_parallel_groups_stay_inside_a_node(
    two_nodes: dict[str, Any], tp1_run: list[dict[str, Any]], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    # Half the data-parallel ranks: the same global batch (32) takes two micro-batches a step.
    tp2_args = _on_cluster(two_nodes, "parallel.tensor_parallel=2", "train.global_batch_size=32")
    result = cli(*launch_args(run_dir, *tp2_args), timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    evs = events(run_dir)
    ips = _ips_by_rank(evs)
    # AutoTP groups are consecutive ranks: {0, 1} and {2, 3}.
    assert ips[0] == ips[1] and ips[2] == ips[3] and ips[0] != ips[2], ips
    tp2, tp1 = losses_by_step(evs), losses_by_step(tp1_run)
    assert len(tp2) == STEPS and max(abs(tp2[s] - tp1[s]) for s in tp1) <= 1e-5


def _watch_deaths(pids: list[int], stop: threading.Event) -> dict[int, float]:
    """When each pid stopped existing (polled from a thread until ``stop``)."""
    died: dict[int, float] = {}

    def watch() -> None:
        while not stop.is_set() and len(died) < len(pids):
            for pid in pids:
                if pid not in died and not Path(f"/proc/{pid}").exists():
                    died[pid] = time.time()
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return died


def _lose_rank2s_node(
    cluster: dict[str, Any], run_dir: Path, fault: str, stop: threading.Event, *overrides: str
) -> tuple[list[dict[str, Any]], str, dict[int, float]]:
    """Launch on ``cluster``, lose (``fault``) the node of rank 2 at step 25, wait for a clean exit.
    Returns the first attempt's ``worker_started`` events, the lost node's address and when each
    of its ranks' processes died (watched until ``stop``)."""
    proc = start_cli(*launch_args(run_dir, *_on_cluster(cluster, "fault_tolerance.node_timeout_s=6", *overrides)))
    wait_for_event(run_dir, lambda e: e["event"] == "step" and e["step"] >= 25, 300, proc)
    first = [w for w in of_kind(events(run_dir), "worker_started") if w["attempt"] == 0]
    lost_ip = next(w["node_ip"] for w in first if w["rank"] == 2)
    index = next(n["index"] for n in cluster["nodes"] if n["address"] == lost_ip)
    died = _watch_deaths([w["pid"] for w in first if w["node_ip"] == lost_ip], stop)
    result = cli("dev-cluster", fault, cluster["name"], str(index), timeout=60)
    assert result.returncode == 0, result.stderr
    out, _ = proc.communicate(timeout=400)
    stop.set()
    assert proc.returncode == 0, out
    return first, lost_ip, died


@pytest.mark.parametrize("fault", ["kill-node", "partition"])
def test_lost_node_moves_to_the_spare_node_bit_exact(fault: str, clean: dict[int, float], tmp_path: Path) -> None:
    cluster = _up(3)
    try:
        run_dir = tmp_path / "run"
        stop = threading.Event()
        first, lost_ip, died = _lose_rank2s_node(cluster, run_dir, fault, stop, "cluster.spare_nodes=1")
        lost_ranks = sorted(w["rank"] for w in first if w["node_ip"] == lost_ip)
        lost_pids = [w["pid"] for w in first if w["node_ip"] == lost_ip]

        evs = events(run_dir)
        detected = [e for e in of_kind(evs, "failure_detected") if e["reason"] == "node_lost"]
        assert sorted(e["rank"] for e in detected) == lost_ranks == [2, 3]
        assert sum(e["root_cause"] for e in of_kind(evs, "failure_detected")) == 1
        assert len(of_kind(evs, "recovery_finished")) == 1
        restarted = [w for w in of_kind(evs, "worker_started") if w["attempt"] == 1]
        assert {w["node_ip"] for w in restarted if w["rank"] in lost_ranks}.isdisjoint({lost_ip})
        # Never two copies of a rank: the lost node's processes were gone before any replacement started.
        replaced_at = min(w["ts"] for w in restarted)
        assert sorted(died) == sorted(lost_pids) and max(died.values()) < replaced_at, (died, replaced_at)
        final = of_kind(evs, "run_finished")[-1]
        assert final["status"] == "succeeded" and final["final_loss"] == clean[STEPS]
        # Nothing of the run is left on any node: no actor, training process or zygote.
        leftovers = []
        for node in cluster["nodes"]:
            for pid in marked_pids(f"{cluster['name']}:{node['index']}", set(), env=devcluster.NODE_MARK_ENV):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if "RankActor" in cmdline or "orchestrator.worker" in cmdline:
                    leftovers.append((pid, cmdline))
        assert not leftovers, leftovers
    finally:
        _down(cluster)


def test_lost_node_without_a_spare_shrinks_to_the_nodes_left(
    two_nodes: dict[str, Any], tp1_run: list[dict[str, Any]], clean: dict[int, float], tmp_path: Path
) -> None:
    """Last in the module: it kills a node of the shared 2-node cluster."""
    run_dir = tmp_path / "run"
    first, _, _ = _lose_rank2s_node(two_nodes, run_dir, "kill-node", threading.Event(), "fault_tolerance.allow_shrink=true")

    evs = events(run_dir)
    assert sorted(e["rank"] for e in of_kind(evs, "failure_detected") if e["reason"] == "node_lost") == [2, 3]
    shrunk = of_kind(evs, "world_shrunk")
    assert len(shrunk) == 1 and (shrunk[0]["world_size"], shrunk[0]["world_size_before"]) == (2, 4)
    before = of_kind(evs, "run_started")[0]["config"]
    global_batch = before["train"]["micro_batch_size"] * 4
    assert (shrunk[0]["global_batch"], shrunk[0]["accumulation_steps"]) == (global_batch, 2)
    restarted = [w for w in of_kind(evs, "worker_started") if w["attempt"] == 1]
    assert sorted(w["rank"] for w in restarted) == [0, 1] and {w["node_ip"] for w in restarted} == {first[0]["node_ip"]}
    assert len(of_kind(evs, "recovery_finished")) == 1
    final = of_kind(evs, "run_finished")[-1]
    assert final["status"] == "succeeded" and final["step"] == STEPS
    # The same global batch on half the ranks: the optimisation goes on as on four.
    resumed = of_kind(evs, "recovery_finished")[0]["resumed_from_step"]
    losses = losses_by_step(evs)
    assert max(abs(losses[s] - clean[s]) for s in range(resumed + 1, STEPS + 1)) <= 1e-5
