"""The control plane on a real Ray cluster: the real controller (``orchestrator launch``), real node
agents and real Ray calls over a dev-cluster (``orchestrator dev-cluster up``: one network namespace
and address per node), training ``--nodes`` x ``--per-node`` light simulated ranks
(``orchestrator/training/simulated.py``: real rank processes without torch), plus one spare node.

It brings the dev-cluster up, launches, and measures what ``bench/scale.py`` measures at the same N:
- ``controller_cpu_fraction``: the launch process's CPU (the controller with its inbox, and Ray's
  driver in it), of one core, over one checkpoint interval of steady training;
- ``failure_to_decision_s``: a simulated rank SIGKILLed, to ``recovery_started`` (``--repeats`` times,
  each rank on another node);
- a node lost (every process of a node holding ranks SIGKILLed, as ``dev-cluster kill-node`` does):
  ``node_loss_episodes`` (recoveries it caused), ``node_loss_root_causes`` and
  ``node_loss_to_decision_s``;
- ``unplanned_incidents``: root causes before the node loss that the bench did not cause (a
  healthy node that fenced itself, say: there should be none);
then stops the run (SIGINT) and takes the dev-cluster down. Needs root (network namespaces).

    .venv/bin/python bench/cluster_scale.py [--nodes 8] [--per-node 64] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.dev_clusters import state_root
from orchestrator.devcluster import kill_node
from orchestrator.events import read_events

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "cluster_configs" / "local.yaml"
_STEP_S = 1.0
_CHECKPOINT_EVERY = 20  # steps: a checkpoint every 20 s; both as in bench/scale.py
_NODE_TIMEOUT_S = 10.0
_TIMEOUT_S = 300.0


def _cli(*args: str, timeout: float = 300) -> str:
    result = subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"orchestrator {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def _events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    return read_events(path) if path.exists() else []


def _wait(run_dir: Path, proc: subprocess.Popen, done: Any, what: str, timeout: float = _TIMEOUT_S) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        evs = _events(run_dir)
        if done(evs):
            return evs
        if proc.poll() is not None:
            log = (run_dir.parent / "launch.log").read_text(errors="replace").splitlines()
            raise RuntimeError(f"the launch exited ({proc.returncode}) waiting for {what}; its last words:\n"
                               + "\n".join(log[-25:]))
        time.sleep(0.1)
    raise RuntimeError(f"no {what} within {timeout:.0f}s")


def _cpu_s(pid: int) -> float:
    """User and system CPU seconds of process ``pid``, all its threads."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _after(evs: list[dict], mark: int, kind: str) -> dict | None:
    return next((e for e in evs[mark:] if e["event"] == kind), None)


def measure(args: argparse.Namespace, cluster: dict[str, Any], workdir: Path) -> dict[str, Any]:
    ranks = args.nodes * args.per_node
    run_dir = workdir / "run"
    overrides = [
        f"cluster.ray_address={cluster['address']}", f"cluster.nodes={args.nodes}",
        f"cluster.workers_per_node={args.per_node}", "cluster.spare_nodes=1",
        "train.entrypoint=orchestrator.training.simulated:train", f"cluster.env.SIMULATED_STEP_S={_STEP_S}",
        "train.steps=1000000", f"checkpoint.interval_steps={_CHECKPOINT_EVERY}", "checkpoint.keep_last=2",
        f"fault_tolerance.node_timeout_s={_NODE_TIMEOUT_S}", f"fault_tolerance.max_restarts={args.repeats + 5}",
        "metrics.port=0",
    ]
    command = [sys.executable, "-m", "orchestrator", "launch", str(CONFIG), "--run-dir", str(run_dir)]
    for item in overrides:
        command += ["--set", item]
    # The launch's terminal output (with the inbox's word on late reads) is kept beside the run.
    with open(workdir / "launch.log", "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def stepped_past(step: int, mark: int = 0) -> Any:
            return lambda evs: any(e["event"] == "step" and e["step"] >= step for e in evs[mark:])

        evs = _wait(run_dir, proc, lambda evs: any(e["event"] == "checkpoint_committed" for e in evs),
                    "a first checkpoint")
        # Steady state: one checkpoint interval, from a step on.
        cpu0, wall0 = _cpu_s(proc.pid), time.monotonic()
        time.sleep(_CHECKPOINT_EVERY * _STEP_S)
        cpu = (_cpu_s(proc.pid) - cpu0) / (time.monotonic() - wall0)

        decisions = []
        workers, killed = {}, set()
        for repeat in range(args.repeats):
            evs = _events(run_dir)
            workers.update({w["rank"]: w for w in evs if w["event"] == "worker_started"})
            victim = workers[(repeat % args.nodes) * args.per_node + 1 + repeat]
            mark, killed_at = len(evs), time.time()
            os.kill(victim["pid"], signal.SIGKILL)
            killed.add(victim["rank"])
            evs = _wait(run_dir, proc, lambda evs, m=mark: _after(evs, m, "recovery_finished") is not None,
                        f"the recovery of rank {victim['rank']}")
            decisions.append(_after(evs, mark, "recovery_started")["ts"] - killed_at)
            last = max(e["step"] for e in evs if e["event"] == "step")
            _wait(run_dir, proc, stepped_past(last + 2), "steps after the recovery")

        evs = _events(run_dir)
        workers.update({w["rank"]: w for w in evs if w["event"] == "worker_started"})
        lost_ip = workers[args.per_node]["node_ip"]  # node slot 1
        index = next(n["index"] for n in cluster["nodes"] if n["address"] == lost_ip)
        # Killed from here, not through the CLI: a process started at a load average of 30-80 takes
        # up to 10 s before it kills anything, which the decision's clock would count.
        mark, killed_at = len(evs), time.time()
        kill_node(cluster["name"], index)
        kill_s = time.time() - killed_at
        evs = _wait(run_dir, proc, lambda evs: _after(evs, mark, "recovery_finished") is not None,
                    "the recovery from the lost node")
        node_loss_s = _after(evs, mark, "recovery_started")["ts"] - killed_at
        time.sleep(2.0)  # late consequences of the loss, if any
        episode = _events(run_dir)[mark:]
        # Root causes the bench did not cause (a healthy node fenced for want of acknowledgements, say).
        unplanned = [e for e in _events(run_dir)[:mark] if e["event"] == "failure_detected" and e["root_cause"]
                     and e["rank"] not in killed]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return {
        "ranks": ranks,
        "nodes": args.nodes,
        "controller_cpu_fraction": cpu,
        "failure_to_decision_s": {"exit": {"p50": statistics.median(decisions), "max": max(decisions),
                                           "all": decisions}},
        "node_loss_episodes": sum(1 for e in episode if e["event"] == "recovery_started"),
        "node_loss_root_causes": sum(1 for e in episode if e["event"] == "failure_detected" and e["root_cause"]),
        "node_loss_to_decision_s": node_loss_s,
        "kill_node_s": kill_s,
        "unplanned_incidents": [{k: e.get(k) for k in ("rank", "reason", "message")} for e in unplanned],
        "node_loss_events": [{k: e.get(k) for k in ("ts", "event", "rank", "reason", "message", "mode", "replaced")
                              if e.get(k) is not None} for e in episode
                             if e["event"] in ("failure_detected", "recovery_started", "recovery_finished")],
    }


def _keep_agent_logs(name: str, keep: Path) -> None:
    """The agents' own words (Ray keeps an actor's stderr in its worker log, which ``down`` removes)."""
    with open(keep / "agents.log", "w") as out:
        for log in sorted((state_root() / name).glob("ray/session_*/logs/worker-*.err")):
            lines = [line for line in log.read_text(errors="replace").splitlines() if not line.startswith(":")]
            if lines:
                out.write(f"== {log.name}\n" + "\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8, help="nodes holding ranks (one spare node more is started)")
    parser.add_argument("--per-node", type=int, default=64, help="simulated ranks per node")
    parser.add_argument("--repeats", type=int, default=3, help="ranks killed, one after another")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--keep", type=Path, help="keep the run directory here (default: removed)")
    args = parser.parse_args()
    cluster = json.loads(_cli("dev-cluster", "up", "--nodes", str(args.nodes + 1), "--cpus-per-node",
                              str(args.per_node), "--json"))
    started = time.monotonic()
    try:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            result = measure(args, cluster, args.keep)
        else:
            with tempfile.TemporaryDirectory(prefix="cluster-scale-") as workdir:
                result = measure(args, cluster, Path(workdir))
    finally:
        if args.keep:
            _keep_agent_logs(cluster["name"], args.keep)
        _cli("dev-cluster", "down", cluster["name"], timeout=180)
    decided = result["failure_to_decision_s"]["exit"]
    print(f"{result['ranks']:>6} simulated ranks on {args.nodes} nodes (+1 spare) of a real Ray cluster: controller "
          f"{100 * result['controller_cpu_fraction']:5.1f}% of a core; a killed rank decided p50/max "
          f"{decided['p50']:.2f}/{decided['max']:.2f}s; node loss {result['node_loss_episodes']} episode(s), "
          f"{result['node_loss_root_causes']} root cause(s), decided {result['node_loss_to_decision_s']:.2f}s "
          f"(the kill took {result['kill_node_s']:.2f}s); "
          f"{len(result['unplanned_incidents'])} incident(s) the bench did not cause "
          f"[{time.monotonic() - started:.0f}s]")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
