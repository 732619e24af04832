"""What a killed rank costs: this orchestrator against ``torchrun --max-restarts``, side by side.

For each system the same workload (the built-in GPT, ``--ranks`` CPU ranks
(default 2), ZeRO-2, the same checkpoints) runs once clean and once with rank 1
SIGKILLed right after step ``--kill-step``. Reported per system: the time from
the kill to the next completed step (and, for the orchestrator, to its
decision: ``recovery_started``), the extra wall time the failure cost, and
whether the faulted run's final loss equals the clean run's.

The extra wall time is the faulted run's time from its first to its last
completed step minus the clean run's. Everything a failure costs happens
between those steps (detection, restarts, start-up of new processes, steps
recomputed from the checkpoint); the start-up before the first step is the
same with or without a failure and only adds noise, so it is left out. The
steady-state step time of the clean runs is shown too.

    .venv/bin/python bench/recovery.py [--steps 120] [--interval 20] [--kill-step 70] [--ranks 2] [--repeats 1]
                                       [--kill-rank 1] [--ray-address ADDR --nodes N] [--warm-spare]
                                       [--orchestrator-only] [--set KEY=VALUE ...] [--json PATH]

With ``--ray-address`` (a dev-cluster's, ``orchestrator dev-cluster up --nodes N``) the orchestrator
runs on that Ray cluster, ``--ranks`` on each of ``--nodes`` nodes, and torchrun is not run.
``--warm-spare`` kills only once the node's warm spare is ready (``spare_ready``) as well;
``--set`` adds config items to both runs (``--set cluster.device=gpu --set train.precision=bf16``:
the GPU spare's recovery, with ``--orchestrator-only``, as ``bench/gpu_suite.sh`` runs it).

torchrun runs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: without it, its
restarts hang or fail on this stack (see ../shared/STACK-NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import load_config
from orchestrator.events import read_events
from orchestrator.installation import with_interpreter_tools
from orchestrator.worker.env import local_cpu_count

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "cluster_configs" / "local.yaml"
_RUN_TIMEOUT_S = 600.0


@dataclass
class Run:
    training_s: float  # first to last completed step
    step_s: float  # mean step interval, first to last step
    final_loss: float | None
    kill_to_next_step_s: float | None = None
    kill_to_decision_s: float | None = None
    restored: str = "-"  # the orchestrator's recovery_finished: "memory, 0 lost", "disk, 5 lost"


def _wait(predicate, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode} before the kill step")
        time.sleep(0.02)
    raise TimeoutError("kill step not reached")


def _jsonl(path: Path) -> list[dict]:
    return read_events(path) if path.exists() else []


def _run(cmd: list[str], env: dict[str, str], steps_of, pid_of_victim, kill_step: int | None,
         decided_at=lambda: None, ready=lambda: True, resumed_at=lambda: None, restored=lambda: "-") -> Run:
    """Run ``cmd``; optionally SIGKILL the victim rank once ``kill_step`` is reached (and ``ready()``).

    ``steps_of()`` lists (ts, step, loss) in the order steps were logged. The next completed step
    after the kill is ``resumed_at()`` where the system says when it recovered (the orchestrator: the
    first step logged after ``recovery_started``); otherwise the first logged step whose number is not
    above the last one logged before the kill: training resumed from a checkpoint, so it went back.
    (Steps done before the kill may be logged just after it.)
    """
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    killed_at = None
    try:
        if kill_step is not None:
            _wait(lambda: any(s >= kill_step for _, s, _ in steps_of()) and ready(), proc, _RUN_TIMEOUT_S)
            os.kill(pid_of_victim(), signal.SIGKILL)
            killed_at = time.time()
        proc.wait(timeout=_RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}")
    rows = steps_of()
    after = []
    if killed_at is not None:
        before = [s for ts, s, _ in rows if ts <= killed_at]
        later = [(ts, s) for ts, s, _ in rows if ts > killed_at]
        seen = before[-1] if before else 0
        for ts, s in later:
            if s <= seen:
                after.append(ts)
                break
            seen = s
    if killed_at is not None and (known := resumed_at()) is not None:
        after = [known]
    if killed_at is not None and not after:
        raise RuntimeError(f"{cmd[:4]}: no step after the kill (it came after the last step?); give more --steps")
    times = [ts for ts, _, _ in rows]
    decided = decided_at() if killed_at is not None else None
    return Run(
        training_s=times[-1] - times[0],
        step_s=(times[-1] - times[0]) / (len(times) - 1),
        final_loss=rows[-1][2],
        kill_to_next_step_s=(after[0] - killed_at) if after else None,
        kill_to_decision_s=(decided - killed_at) if decided is not None else None,
        restored=restored() if killed_at is not None else "-",
    )


def orchestrator_run(workdir: Path, overrides: list[str], kill_step: int | None, victim: int = 1,
                     warm_spare: bool = False) -> Run:
    run_dir = workdir / "run"
    cmd = [sys.executable, "-m", "orchestrator", "launch", str(CONFIG), "--run-dir", str(run_dir), "--set", "metrics.port=0"]
    for item in overrides:
        cmd += ["--set", item]
    events = run_dir / "events.jsonl"

    def steps_of():
        return [(e["ts"], e["step"], e["loss"]) for e in _jsonl(events) if e["event"] == "step"]

    def pid_of_victim():
        return [e["pid"] for e in _jsonl(events) if e["event"] == "worker_started" and e["rank"] == victim][-1]

    def decided_at():
        return next((e["ts"] for e in _jsonl(events) if e["event"] == "recovery_started"), None)

    def spare_ready():
        return not warm_spare or any(e["event"] == "spare_ready" for e in _jsonl(events))

    def resumed_at():
        logged = _jsonl(events)
        started = next((i for i, e in enumerate(logged) if e["event"] == "recovery_started"), None)
        return None if started is None else next((e["ts"] for e in logged[started:] if e["event"] == "step"), None)

    def restored():
        finished = next((e for e in _jsonl(events) if e["event"] == "recovery_finished"), None)
        return "-" if finished is None else f"{finished['source']}, {finished['steps_lost']} lost"

    return _run(cmd, dict(os.environ), steps_of, pid_of_victim, kill_step, decided_at, spare_ready, resumed_at,
                restored)


def torchrun_run(workdir: Path, overrides: list[str], kill_step: int | None, victim: int = 1,
                 warm_spare: bool = False) -> Run:
    del warm_spare  # torchrun has no spares
    cmd, env = torchrun_command(workdir, overrides)

    def steps_of():
        return [(r["ts"], r["step"], r["loss"]) for r in _jsonl(workdir / "steps.jsonl")]

    def pid_of_victim():
        return [r["pid"] for r in _jsonl(workdir / "pids.jsonl") if r["rank"] == victim][-1]

    return _run(cmd, env, steps_of, pid_of_victim, kill_step)


def torchrun_command(workdir: Path, overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """The torchrun baseline's command line and environment (also run by tests/test_bench.py): as many
    processes as the config's ``cluster.workers_per_node``, as the orchestrator starts."""
    ranks = load_config(CONFIG, overrides).cluster.workers_per_node
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--max-restarts", "3",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           str(REPO / "bench" / "torchrun_train.py"), "--config", str(CONFIG), "--out", str(workdir)]
    for item in overrides:
        cmd += ["--set", item]
    # The same environment the orchestrator gives its ranks (threads, accelerator, the virtualenv's
    # ninja: another one would rebuild DeepSpeed's op inside the timed run).
    env = with_interpreter_tools(dict(
        os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS=str(max(1, local_cpu_count() // ranks)), PYTHONPATH=str(REPO),
    ))
    return cmd, env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--interval", type=int, default=20)
    parser.add_argument("--kill-step", type=int, default=70)
    parser.add_argument("--ranks", type=int, default=2, help="ranks on each node (cluster.workers_per_node)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--ray-address", help="run the orchestrator alone on this Ray cluster (a dev-cluster's)")
    parser.add_argument("--nodes", type=int, default=1, help="cluster.nodes, with --ray-address")
    parser.add_argument("--warm-spare", action="store_true", help="kill only once the node's spare is warm too")
    parser.add_argument("--orchestrator-only", action="store_true", help="no torchrun baseline")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a config item for both runs (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()
    overrides = [f"train.steps={args.steps}", f"checkpoint.interval_steps={args.interval}",
                 f"cluster.workers_per_node={args.ranks}", *args.extra]
    device = load_config(CONFIG, overrides).cluster.device.upper()
    systems = {"orchestrator (in place)": orchestrator_run, "torchrun --max-restarts": torchrun_run}
    if args.ray_address:
        overrides += [f"cluster.ray_address={args.ray_address}", f"cluster.nodes={args.nodes}"]
    if args.ray_address or args.orchestrator_only:
        del systems["torchrun --max-restarts"]
    rows = {}
    for name, runner in systems.items():
        extras, recoveries, decisions, matches, step_times, restores = [], [], [], [], [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as clean_dir, tempfile.TemporaryDirectory() as fault_dir:
                clean = runner(Path(clean_dir), overrides, None)
                faulted = runner(Path(fault_dir), overrides, args.kill_step, args.kill_rank, args.warm_spare)
            extras.append(faulted.training_s - clean.training_s)
            recoveries.append(faulted.kill_to_next_step_s)
            decisions.append(faulted.kill_to_decision_s)
            matches.append(faulted.final_loss == clean.final_loss)
            step_times.append(clean.step_s)
            restores.append(faulted.restored)
            decided = "" if faulted.kill_to_decision_s is None else f"kill->decision {faulted.kill_to_decision_s:.2f}s, "
            print(f"  {name}: first->last step clean {clean.training_s:.2f}s, faulted {faulted.training_s:.2f}s, "
                  f"{decided}kill->next step {faulted.kill_to_next_step_s:.2f}s, restored {faulted.restored}, "
                  f"final loss {faulted.final_loss!r} "
                  f"vs clean {clean.final_loss!r}", flush=True)
        decision = statistics.median(decisions) if None not in decisions else None
        rows[name] = (decision, statistics.median(recoveries), statistics.median(extras), all(matches),
                      statistics.median(step_times), "; ".join(sorted(set(restores))))

    layout = f"{args.nodes} nodes x {args.ranks}" if args.ray_address else f"{args.ranks}"
    spare = ", with the spare warm" if args.warm_spare else ""
    print(f"\nkill rank {args.kill_rank} after step {args.kill_step} of {args.steps}{spare} (checkpoint every "
          f"{args.interval}), {layout} {device} ranks, {' '.join(args.extra) or 'ZeRO-2'}, median of {args.repeats}:\n")
    print("| system | kill -> decision (s) | kill -> next step (s) | extra wall time (s) | restored from "
          "| final loss = clean run | clean step time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, (decision, recovery, extra, match, step_s, restored) in rows.items():
        decided = "-" if decision is None else f"{decision:.2f}"
        print(f"| {name} | {decided} | {recovery:.2f} | {extra:.2f} | {restored} "
              f"| {'yes, bit for bit' if match else 'NO'} | {step_s:.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({name: dict(zip(
            ("kill_to_decision_s", "kill_to_next_step_s", "extra_wall_s", "bit_exact", "clean_step_s", "restored"),
            row))
            for name, row in rows.items()}, indent=2) + "\n")
    if len(systems) == 1:  # no baseline
        return 0 if all(r[3] for r in rows.values()) else 1
    ours, theirs = (rows[name][2] for name in systems)
    ratio = ours / theirs if theirs > 0 else float("inf")
    print(f"\nextra wall time, orchestrator / torchrun: {ratio:.2f} (target <= 0.33)")
    return 0 if ratio <= 1 / 3 and all(r[3] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
