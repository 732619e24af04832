"""Launch to first step: this orchestrator against plain processes started by hand, and torchrun.

The same workload (the built-in GPT of ``cluster_configs/local.yaml``, its
ranks on this machine, ZeRO-2, gloo) is started three ways, alternating, each
``--repeats`` times:

    orchestrator   ``orchestrator launch cluster_configs/local.yaml`` (embedded Ray, node agent,
                   zygote, ranks forked from it)
    plain          one ``python bench/torchrun_train.py`` per rank, started by this script with
                   RANK, WORLD_SIZE and MASTER_ADDR/PORT set: the least any launcher can do
    torchrun       ``torchrun --nproc-per-node N bench/torchrun_train.py``

The time is from the command's start to the end of its first training step
(the orchestrator's ``step`` event; rank 0's line in the scripts' steps file).
Printed: each run, the medians, and the ratio of each launcher's to plain
processes' (target for the orchestrator <= 1.3).

    .venv/bin/python bench/launch.py [--repeats 3] [--set KEY=VALUE ...]
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
from collections.abc import Callable
from pathlib import Path

from recovery import CONFIG, REPO, _jsonl, torchrun_command

from orchestrator.config import load_config

TARGET = 1.3
_TIMEOUT_S = 300.0


def _first_step_s(procs: list[subprocess.Popen], first_step_ts: Callable[[], float | None], started: float) -> float:
    """Seconds from ``started`` (wall clock) to the first step; the processes run to their end (a few
    steps more), so that the next run finds the machine as it was."""
    deadline = time.monotonic() + _TIMEOUT_S
    try:
        while (ts := first_step_ts()) is None:
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError(f"{procs[0].args[:4]} failed before its first step")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no first step within {_TIMEOUT_S:g}s")
            time.sleep(0.01)
        for proc in procs:
            proc.wait(timeout=_TIMEOUT_S)
        return ts - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _popen(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def orchestrator(workdir: Path, overrides: list[str]) -> float:
    run_dir = workdir / "run"
    cmd = [sys.executable, "-m", "orchestrator", "launch", str(CONFIG), "--run-dir", str(run_dir),
           "--set", "metrics.port=0"]
    for item in overrides:
        cmd += ["--set", item]
    started = time.time()
    proc = _popen(cmd, dict(os.environ))
    first = lambda: next((e["ts"] for e in _jsonl(run_dir / "events.jsonl") if e["event"] == "step"), None)  # noqa: E731
    return _first_step_s([proc], first, started)


def torchrun(workdir: Path, overrides: list[str]) -> float:
    cmd, env = torchrun_command(workdir, overrides)
    started = time.time()
    proc = _popen(cmd, env)
    return _first_step_s([proc], lambda: _first_row(workdir), started)


def plain(workdir: Path, overrides: list[str]) -> float:
    """One process per rank, as a user would start them by hand on one machine."""
    cmd, env = torchrun_command(workdir, overrides)
    script = cmd[cmd.index(str(REPO / "bench" / "torchrun_train.py")):]
    ranks = load_config(CONFIG, overrides).cluster.workers_per_node
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.time()
    procs = [_popen([sys.executable, *script], dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks),
                                                    LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                                                    MASTER_PORT=str(port)))
             for r in range(ranks)]
    return _first_step_s(procs, lambda: _first_row(workdir), started)


def _first_row(workdir: Path) -> float | None:
    rows = _jsonl(workdir / "steps.jsonl")
    return rows[0]["ts"] if rows else None


WAYS = {"plain": plain, "orchestrator": orchestrator, "torchrun": torchrun}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a config item for every run (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    overrides = ["train.steps=20", *args.extra]
    seconds: dict[str, list[float]] = {name: [] for name in WAYS}
    for repeat in range(args.repeats):
        for name, way in WAYS.items():
            with tempfile.TemporaryDirectory() as workdir:
                seconds[name].append(way(Path(workdir), overrides))
            print(f"  {repeat + 1}/{args.repeats} {name}: {seconds[name][-1]:.2f} s to the first step", flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"\nlaunch to first step, {' '.join(args.extra) or 'cluster_configs/local.yaml'}, "
          f"median of {args.repeats}:\n")
    print("| launcher | seconds | / plain processes |\n|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.2f} | {value / medians['plain']:.2f} |")
    ratio = medians["orchestrator"] / medians["plain"]
    print(f"\norchestrator / plain processes: {ratio:.2f} (target <= {TARGET})")
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "medians": medians, "ratio": ratio}))
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
