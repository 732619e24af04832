"""What memory snapshots cost a step: the same job with a snapshot every step and with none, same run.

The built-in workload (``cluster_configs/local.yaml``, 2 CPU ranks, ZeRO-2) runs
``--repeats`` times each way, alternating (so that a slow spell of the machine
falls on both), with ``checkpoint.memory_interval_steps`` 1 and 0 and nothing
else changed. The step time is the wall time from the first to the last
completed step divided by the steps between: it includes the snapshot's copy,
which comes after the step is reported, and the background mirror's share of the
CPUs. Printed: each run, the medians, and their ratio (target <= 1.03).

    .venv/bin/python bench/snapshot_overhead.py [--steps 200] [--repeats 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from recovery import orchestrator_run

TARGET = 1.03


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a config item for every run (repeatable)")
    args = parser.parse_args()
    base = [f"train.steps={args.steps}", *args.extra]
    ways = {"snapshot every step": "checkpoint.memory_interval_steps=1",
            "no snapshots": "checkpoint.memory_interval_steps=0"}
    step_s: dict[str, list[float]] = {name: [] for name in ways}
    for repeat in range(args.repeats):
        for name, item in ways.items():
            with tempfile.TemporaryDirectory() as workdir:
                run = orchestrator_run(Path(workdir), [*base, item], None)
            step_s[name].append(run.step_s)
            print(f"  {repeat + 1}/{args.repeats} {name}: {run.step_s * 1000:.1f} ms a step, "
                  f"final loss {run.final_loss!r}", flush=True)
    with_snap, without = (statistics.median(step_s[name]) for name in ways)
    ratio = with_snap / without
    print(f"\n{args.steps} steps, {' '.join(args.extra) or 'cluster_configs/local.yaml'}, median of {args.repeats}:\n")
    print("| | step time (ms) |\n|---|---|")
    for name in ways:
        print(f"| {name} | {statistics.median(step_s[name]) * 1000:.1f} |")
    print(f"\nstep time, snapshot every step / none: {ratio:.3f} (target <= {TARGET})")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
