"""Multi-node jobs on a dev-cluster: one network namespace (and address) per node, real Ray nodes,
gloo across a bridge, real SIGKILLs and cut links.

Expensive runs are shared: one clean 4-rank run on one node (the session's, test_recovery's too); one 2-node cluster for the
tensor-parallel run (with simulated GPUs, scraped by a real Prometheus for NVIDIA's stock
dashboard) and then a run that loses a node and shrinks (its first 25 steps are also
the two-node layout and losses check); one 4-node cluster (2 + two spares) for a run that loses
a node twice, once cut off and once killed.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import devcluster
from orchestrator.controller.reaper import marked_pids
from orchestrator.dev_clusters import state_root
from tests.helpers import (
    FOUR_RANKS,
    FOUR_RANKS_TRAINING,
    REPO,
    cli,
    events,
    failed_ranks,
    launch_args,
    losses_by_step,
    of_kind,
    pid_alive,
    running_cli,
    wait_for_event,
    wait_gone,
)
from tests.prometheus import PROMETHEUS, Prometheus, needs_prometheus, run_scrape_config

pytestmark = [pytest.mark.processes, pytest.mark.timeout(600)]

STEPS = 60
STOCK_DASHBOARD = REPO / "tests" / "dcgm_exporter" / "dcgm-exporter-dashboard.json"
BASE = FOUR_RANKS_TRAINING

if not devcluster.namespaces_available():
    pytest.skip("network namespaces need root and iproute2", allow_module_level=True)


def _up(nodes: int) -> dict[str, Any]:
    result = cli("dev-cluster", "up", "--nodes", str(nodes), "--json", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _down(cluster: dict[str, Any]) -> None:
    result = cli("dev-cluster", "down", cluster["name"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"dev cluster {cluster['name']} removed: "), "down says what it did"
    assert not (state_root() / cluster["name"]).exists()
    assert not any(marked_pids(f"{cluster['name']}:{n['index']}", set(), env=devcluster.NODE_MARK_ENV)
                   for n in cluster["nodes"]), "dev-cluster down left a process behind"


@pytest.fixture(scope="module")
def clean(reference_run) -> dict[int, float]:
    """The same job on one node with 4 ranks."""
    run_dir, result = reference_run(*FOUR_RANKS)
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
    return (*BASE, f"cluster.ray_address={cluster['address']}", "cluster.nodes=2",
            "fault_tolerance.node_timeout_s=6", *overrides)


def _ips_by_rank(evs: list[dict[str, Any]]) -> dict[int, str]:
    return {w["rank"]: w["node_ip"] for w in of_kind(evs, "worker_started") if w["attempt"] == 0}


def _stock_dashboard_answers(prom: Prometheus) -> dict[str, Any]:
    """What NVIDIA's stock dashboard shows: its node and GPU pickers' values, and each panel's query
    with every node picked ("All") and with each node alone."""
    dashboard = json.loads(STOCK_DASHBOARD.read_text())
    panels = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    pickers = {name: prom.get(f"/api/v1/label/{name}/values", **{"match[]": "DCGM_FI_DEV_GPU_TEMP"})["data"]
               for name in ("instance", "gpu")}

    def shown(instances: list[str]) -> dict[str, list[dict[str, Any]]]:
        picked = {"$instance": "|".join(instances), "$gpu": "|".join(pickers["gpu"])}
        answers = {}
        for title, expr in panels:
            for variable, value in picked.items():
                expr = expr.replace(variable, value)
            answer = prom.query(expr)
            assert answer["status"] == "success", (title, expr, answer)
            answers[title] = answer["data"]["result"]
        return answers

    return {**pickers, "all": shown(pickers["instance"]),
            "per_node": {instance: shown([instance]) for instance in pickers["instance"]}}


@pytest.fixture(scope="module")
def tp2_run(two_nodes: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tensor-parallel run on the 2-node cluster with simulated GPUs, scraped by a real Prometheus
    while it trains: its event log, and what the stock dcgm-exporter dashboard showed (None without
    Prometheus)."""
    tmp = tmp_path_factory.mktemp("tp2")
    run_dir = tmp / "run"
    # Half the data-parallel ranks: the same global batch (32) takes two micro-batches a step.
    # metrics.host 0.0.0.0: each node's GPU endpoint listens on its address, where Prometheus (here) reaches it.
    args = _on_cluster(two_nodes, "parallel.tensor_parallel=2", "train.global_batch_size=32",
                       "metrics.simulated_gpus=true", "metrics.host=0.0.0.0")
    dashboard = None
    with running_cli(*launch_args(run_dir, *args)) as proc:
        wait_for_event(run_dir, lambda e: e["event"] == "metrics_started", 120, proc)
        if PROMETHEUS:
            with Prometheus(tmp, run_scrape_config(run_dir)) as prom:
                # The tensor ratio needs two GPM samples of each GPU: every field has come by then.
                prom.wait_until("the tensor ratio of the four GPUs", lambda: len(
                    prom.query("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE")["data"]["result"]) == 4, 180, proc)
                dashboard = _stock_dashboard_answers(prom)
        out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    return {"events": events(run_dir), "dashboard": dashboard}


def test_tensor_parallel_groups_stay_inside_a_node(tp2_run: dict[str, Any], clean: dict[int, float]) -> None:
    evs = tp2_run["events"]
    ips = _ips_by_rank(evs)
    # AutoTP groups are consecutive ranks: {0, 1} and {2, 3}.
    assert ips[0] == ips[1] and ips[2] == ips[3] and ips[0] != ips[2], ips
    tp2 = losses_by_step(evs)
    assert sorted(tp2) == sorted(clean) and max(abs(tp2[s] - clean[s]) for s in clean) <= 1e-5


@needs_prometheus
def test_the_stock_dcgm_dashboard_picks_each_node_and_shows_its_gpus(
    tp2_run: dict[str, Any], two_nodes: dict[str, Any]
) -> None:
    shown = tp2_run["dashboard"]
    nodes = sorted(n["address"] for n in two_nodes["nodes"])
    # One instance per node: its agent's GPU endpoint (address:port), as one dcgm-exporter per node.
    instances = sorted(shown["instance"])
    assert [i.rsplit(":", 1)[0] for i in instances] == nodes and sorted(shown["gpu"]) == ["0", "1"], shown
    expected = {"all": [(i, gpu) for i in instances for gpu in ("0", "1")],
                **{i: [(i, "0"), (i, "1")] for i in instances}}
    for picked, panels in [("all", shown["all"]), *shown["per_node"].items()]:
        assert len(panels) == 8
        for title, series in panels.items():
            assert series, f"panel {title!r} shows nothing for {picked}"
            if "gpu" in series[0]["metric"]:  # one line per GPU
                assert sorted((s["metric"]["instance"], s["metric"]["gpu"]) for s in series) == expected[picked], title
                assert all(s["metric"]["node"] == s["metric"]["instance"].rsplit(":", 1)[0] for s in series), title
            else:  # a gauge over the picked GPUs (avg, sum)
                assert len(series) == 1, title
    total = float(shown["all"]["GPU Power Total"][0]["value"][1])
    assert total == pytest.approx(4 * 512, rel=0.01), "four simulated GPUs at 512 W, each counted once"
    tensor = shown["all"]["Tensor Core Utilization"]
    assert all(float(s["value"][1]) == 0.42 for s in tensor)


def _watch_deaths(pids: list[int], stop: threading.Event) -> dict[int, float]:
    """When each process exited (polled from a thread until ``stop``): gone, or a zombie (it holds
    nothing any more; whoever adopted it reaps it when it gets to it)."""
    died: dict[int, float] = {}

    def watch() -> None:
        while not stop.is_set() and len(died) < len(pids):
            for pid in pids:
                if pid not in died and not pid_alive(pid):
                    died[pid] = time.time()
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return died


def _lose_rank2s_node(cluster: dict[str, Any], run_dir: Path, proc: Any, fault: str, step: int,
                      stop: threading.Event) -> dict[str, Any]:
    """Once the run reaches ``step``, lose (``fault``) the node rank 2 runs on now. Returns that node's
    address, its ranks and their processes, and when each process died (watched until ``stop``)."""
    wait_for_event(run_dir, lambda e: e["event"] == "step" and e["step"] >= step, 300, proc)
    current = {w["rank"]: w for w in of_kind(events(run_dir), "worker_started")}  # the latest per rank
    ip = current[2]["node_ip"]
    lost = sorted(rank for rank, w in current.items() if w["node_ip"] == ip)
    pids = [current[rank]["pid"] for rank in lost]
    died = _watch_deaths(pids, stop)
    index = next(n["index"] for n in cluster["nodes"] if n["address"] == ip)
    result = cli("dev-cluster", fault, cluster["name"], str(index), timeout=60)
    assert result.returncode == 0, result.stderr
    return {"ip": ip, "ranks": lost, "pids": pids, "died": died}


def _run_processes(cluster: dict[str, Any], timeout: float = 0.0) -> list[tuple[int, str]]:
    """The run's processes (node agents, training processes, zygotes) on any of the cluster's nodes
    still alive after ``timeout``; the cluster's own Ray daemons are not the run's."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for node in cluster["nodes"]:
            for pid in marked_pids(f"{cluster['name']}:{node['index']}", set(), env=devcluster.NODE_MARK_ENV):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if "NodeAgent" in cmdline or "orchestrator.worker" in cmdline:
                    found.append((pid, cmdline))
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_signalled_controller_leaves_nothing_of_the_run_on_any_node(
    two_nodes: dict[str, Any], tmp_path: Path, sig: signal.Signals
) -> None:
    """A scheduler's SIGTERM stops every rank on every node after the checkpoint it asks for (exit 3,
    ``run_finished`` preempted, no dump from Ray's handler); after a SIGKILL, Ray ends the job's agents
    and their ranks die with them. Either way, 15 s later nothing of the run is left on any node."""
    run_dir = tmp_path / "run"
    with running_cli(*launch_args(run_dir, *_on_cluster(two_nodes, "train.steps=2000"))) as proc:
        wait_for_event(run_dir, lambda e: e["event"] == "step" and e["step"] >= 3, 300, proc)
        pids = [w["pid"] for w in of_kind(events(run_dir), "worker_started")]
        assert len({w["node_ip"] for w in of_kind(events(run_dir), "worker_started")}) == 2
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 3, out
        assert "SIGTERM: preempted" in out and "SIGTERM received" not in out, out
        last = events(run_dir)[-1]
        assert (last["event"], last["status"], last["reason"]) == ("run_finished", "preempted", "SIGTERM")
    assert wait_gone(pids) == [], "training processes outlived their controller"
    assert _run_processes(two_nodes, timeout=15) == [], "the run's agents or processes outlived the controller"


@pytest.fixture(scope="module")
def shrunk_run(two_nodes: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """A run on the shared 2-node cluster that loses rank 2's node at step 25 and, with no spare,
    goes on with the node left. It kills a node: the module's last user of the cluster."""
    run_dir = tmp_path_factory.mktemp("shrunk") / "run"
    with running_cli(*launch_args(run_dir, *_on_cluster(two_nodes, "fault_tolerance.allow_shrink=true"))) as proc:
        _lose_rank2s_node(two_nodes, run_dir, proc, "kill-node", 25, threading.Event())
        out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    return events(run_dir)


def test_two_nodes_hold_two_ranks_each_and_train_like_one_node(
    two_nodes: dict[str, Any], shrunk_run: list[dict[str, Any]], clean: dict[int, float]
) -> None:
    ips = _ips_by_rank(shrunk_run)
    node_addresses = {n["address"] for n in two_nodes["nodes"]}
    assert ips[0] == ips[1] and ips[2] == ips[3] and ips[0] != ips[2], ips
    assert {ips[0], ips[2]} <= node_addresses, "ranks run on the namespaces' addresses, not loopback"
    configured = of_kind(shrunk_run, "network_configured")
    assert {e["address"] for e in configured} >= {ips[0], ips[2]}
    assert all(e["interface"] == "eth0" and e["env"]["GLOO_SOCKET_IFNAME"] == "eth0" for e in configured)
    # Up to the lost node, four ranks on two nodes; after it, two ranks on one node with the same global batch.
    losses = losses_by_step(shrunk_run)
    assert sorted(losses) == sorted(clean) == list(range(1, STEPS + 1))
    assert max(abs(losses[s] - clean[s]) for s in clean) <= 1e-5


def test_lost_node_without_a_spare_shrinks_to_the_nodes_left(shrunk_run: list[dict[str, Any]]) -> None:
    evs = shrunk_run
    first = [w for w in of_kind(evs, "worker_started") if w["attempt"] == 0]
    assert sorted(e["rank"] for e in failed_ranks(evs) if e["reason"] == "node_lost") == [2, 3]
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


def test_lost_nodes_move_to_spare_nodes_bit_exact(clean: dict[int, float], tmp_path: Path) -> None:
    """One of three spare nodes is cut off at step 10: reported at once. Rank 2's node is cut off at
    step 25, and the spare that took its place is killed at step 45: each time its ranks move to the
    next spare node, the terminal says so in one line, and the run ends exactly like the clean one."""
    cluster = _up(5)
    try:
        run_dir = tmp_path / "run"
        stop = threading.Event()
        with running_cli(*launch_args(run_dir, *_on_cluster(cluster, "cluster.spare_nodes=3"))) as proc:
            wait_for_event(run_dir, lambda e: e["event"] == "step" and e["step"] >= 10, 300, proc)
            rank_nodes = sorted({w["node_ip"] for w in of_kind(events(run_dir), "worker_started")})
            spare = max((n for n in cluster["nodes"] if n["address"] not in rank_nodes), key=lambda n: n["index"])
            result = cli("dev-cluster", "partition", cluster["name"], str(spare["index"]), timeout=60)
            assert result.returncode == 0, result.stderr
            spare_lost = wait_for_event(run_dir, lambda e: e["event"] == "spare_node_lost", 60, proc)
            lost_nodes = [_lose_rank2s_node(cluster, run_dir, proc, fault, step, stop)
                          for fault, step in (("partition", 25), ("kill-node", 45))]
            out, _ = proc.communicate(timeout=400)
        stop.set()
        assert proc.returncode == 0, out

        evs = events(run_dir)
        assert (spare_lost["node_ip"], spare_lost["spare_nodes"], spare_lost["spare_nodes_configured"]) == \
            (spare["address"], 2, 3)
        assert f"spare node {spare['address']} lost (" in out and "2 of 3 spare node(s) left" in out, out
        ips = _ips_by_rank(evs)
        assert f"nodes: {ips[0]} (ranks 0-1), {ips[2]} (ranks 2-3); spare nodes: " in out, out
        for lost in lost_nodes:  # a lost node is one line, whatever Ray said about it
            assert len([line for line in out.splitlines() if line.startswith(f"node {lost['ip']} lost with ranks 2-3: ")]) == 1, out
        assert "\x1b[" not in out and "raylet" not in out, "Ray's own dumps stay in the run's logs"
        # Behind a cut link the survivors wait in their collective for peers that never answer:
        # interrupted, they abort their connections and rejoin in place (worker/abort.py), as after the kill.
        started = of_kind(evs, "recovery_started")
        assert [(e["mode"], e["replaced"], e["rejoined"]) for e in started] == [("in_place", [2, 3], [0, 1])] * 2, started
        # The lost node's ranks had mirrored their state to their buddies on rank 0's node (over TCP):
        # every rank went back to the step the ranks held in memory, not to the last disk checkpoint.
        finished = of_kind(evs, "recovery_finished")
        assert [e["source"] for e in finished] == ["memory", "memory"], finished
        assert all(e["steps_lost"] <= 1 for e in finished), finished
        for attempt, lost in enumerate(lost_nodes):
            assert lost["ranks"] == [2, 3]
            detected = [e for e in failed_ranks(evs) if e["attempt"] == attempt]
            assert sorted(e["rank"] for e in detected if e["reason"] == "node_lost") == [2, 3], detected
            assert sum(e["root_cause"] for e in detected) == 1
            restarted = [w for w in of_kind(evs, "worker_started") if w["attempt"] == attempt + 1]
            assert {2, 3} <= {w["rank"] for w in restarted}
            assert lost["ip"] not in {w["node_ip"] for w in restarted}
            # Never two copies of a rank: the lost node's processes were gone before any replacement started.
            replaced_at = min(w["ts"] for w in restarted)
            assert sorted(lost["died"]) == sorted(lost["pids"]), lost
            assert max(lost["died"].values()) < replaced_at, (lost, replaced_at)
        assert lost_nodes[0]["ip"] != lost_nodes[1]["ip"]
        final = of_kind(evs, "run_finished")[-1]
        assert final["status"] == "succeeded" and final["final_loss"] == clean[STEPS]
        assert _run_processes(cluster) == [], "nothing of the run is left on any node"
    finally:
        _down(cluster)
