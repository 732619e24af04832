"""Run a plan's sweep through the normal launcher (``orchestrator scaling run``).

Each run is ``orchestrator launch`` with its own run directory under the sweep directory and its
own event log and terminal log there. Re-running skips finished runs and resumes interrupted ones
from their checkpoints (the launcher resumes a run directory it is given again).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.children import stop
from orchestrator.events import RunFinished, Step, read_typed
from orchestrator.scaling.plan import Plan, PlannedRun, as_set

# How often the progress view reads the runs' event logs.
_POLL_S = 1.0
# A run that has not ended this long after its start is stopped (its checkpoints let the next
# `scaling run` resume it).
RUN_TIMEOUT_S = 6 * 3600.0


def sweep_dir(plan_path: Path) -> Path:
    """Where a plan's runs live: next to the plan, ``PLAN-runs/``."""
    return plan_path.with_name(plan_path.stem + "-runs")


@dataclass
class RunStatus:
    """A run's state on disk: ``done`` (trained to its last step), its last step, its final held-out loss."""

    run: PlannedRun
    run_dir: Path
    done: bool
    step: int
    heldout_loss: float | None


def status(plan: Plan, plan_path: Path, run: PlannedRun) -> RunStatus:
    """What ``run``'s run directory says about it."""
    run_dir = sweep_dir(plan_path) / run.name
    steps = plan.run_config(run).train.steps
    evs = read_typed(run_dir / "events.jsonl") if (run_dir / "events.jsonl").exists() else []
    last = max((e.step for e in evs if isinstance(e, Step)), default=0)
    finished = [e for e in evs if isinstance(e, RunFinished)]
    done = bool(finished) and finished[-1].status == "succeeded" and finished[-1].step == steps
    heldout = finished[-1].heldout_loss if done else None
    return RunStatus(run=run, run_dir=run_dir, done=done, step=last, heldout_loss=heldout)


def launch_command(plan: Plan, run: PlannedRun, run_dir: Path, prediction: Path | None = None) -> list[str]:
    """The ``orchestrator launch`` command line of ``run`` (an argument list: no shell), watching
    ``prediction`` when given."""
    sets = [*plan.set, *as_set(run.overrides), "metrics.port=0"]
    watch = ["--prediction", str(prediction)] if prediction is not None else []
    return [sys.executable, "-m", "orchestrator", "launch", plan.config, "--run-dir", str(run_dir), *watch,
            *(arg for item in sets for arg in ("--set", item))]


def prediction_path(plan_path: Path) -> Path:
    """Where ``orchestrator scaling fit`` writes the prediction by default."""
    return plan_path.with_name(plan_path.stem + "-prediction.json")


def run_sweep(plan: Plan, plan_path: Path, *, parallel: int, include_target: bool = False) -> int:
    """Run every unfinished run of ``plan`` (and the target with ``include_target``, watching the
    plan's prediction when there is one), ``parallel`` at a time, with a progress view; returns the
    number of runs that failed."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    runs = [*plan.runs, *([plan.target] if include_target else [])]
    statuses = [status(plan, plan_path, r) for r in runs]
    for s in statuses:
        if s.done:
            console.print(f"{s.run.name}: finished (held-out loss {s.heldout_loss:.4f}); skipped")
    waiting = [s for s in statuses if not s.done]
    active: dict[str, tuple[subprocess.Popen[bytes], RunStatus, float, int]] = {}
    failed = 0
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} steps"),
               TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            while waiting or active:
                while waiting and len(active) < parallel:
                    s = waiting.pop(0)
                    s.run_dir.parent.mkdir(parents=True, exist_ok=True)
                    steps = plan.run_config(s.run).train.steps
                    verb = "resuming" if s.step else "starting"
                    console.print(f"{s.run.name}: {verb} (N={s.run.params:,}, D={s.run.tokens:,}, "
                                  f"C={s.run.compute_flops:.3g} FLOPs, {steps} steps)")
                    with open(s.run_dir.parent / f"{s.run.name}.log", "ab") as log:
                        watched = prediction_path(plan_path) if s.run is plan.target else None
                        command = launch_command(plan, s.run, s.run_dir,
                                                 watched if watched is not None and watched.exists() else None)
                        proc = subprocess.Popen(command, stdout=log,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                    task = progress.add_task(s.run.name, total=steps, completed=s.step)
                    active[s.run.name] = (proc, s, time.monotonic(), task)
                time.sleep(_POLL_S)
                for name, (proc, s, started, task) in list(active.items()):
                    now = status(plan, plan_path, s.run)
                    progress.update(task, completed=now.step)
                    if proc.poll() is None and time.monotonic() - started > RUN_TIMEOUT_S:
                        _stop(proc)
                    if proc.poll() is None:
                        continue
                    del active[name]
                    if now.done:
                        console.print(f"{name}: finished, held-out loss {now.heldout_loss:.4f}")
                    else:
                        failed += 1
                        console.print(f"[red]{name}: launch exited {proc.returncode} at step {now.step}; "
                                      f"its log: {s.run_dir.parent / (name + '.log')}[/red]")
    finally:
        # Stopping is bounded by _stop's timeouts; a second Ctrl-C must not leave launches running.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for proc, *_ in active.values():
                _stop(proc)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return failed


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a launch as Ctrl-C would (it stops its ranks and keeps its checkpoints); kill it if it hangs."""
    stop(proc, 60.0, signal.SIGINT)
