"""Chaos soak: a long local run under random faults must end exactly like a clean run, with no
damaged checkpoint and nothing left behind.

A clean run of the local config, then the same run with a fault every ``--min-gap``..``--max-gap``
seconds from a seeded schedule over every kind this script can produce from outside:

    sigkill           SIGKILL a rank's training process
    sigstop           SIGSTOP a rank (a hang: caught after fault_tolerance.hang_timeout_s)
    raise             an exception in the training code (``--inject-fault raise@RANK:STEP``)
    kill_during_save  SIGKILL a rank while a checkpoint is being written
    kill_spare        SIGKILL a node's warm spare
    kill_zygote       SIGKILL the node's zygote
    kill_actor        SIGKILL a node's agent, the Ray actor hosting its ranks (they die with it)
    kill_controller   SIGKILL the controller, then run the same command again (it resumes)

A fault lands only on a job that is training, and after one that stops training the next waits
until the controller has reacted to it, so that each is seen (and checked) for what it was.

It prints the faults injected, recoveries, whether the final loss equals the clean run's bit for
bit, checkpoints that fail ``orchestrator checkpoints verify``, processes left behind, goodput and
the badput per fault by kind (from the fault until training resumed, plus the steps trained
again; 0 where training never stopped). Exit status 0 only when the loss matches, no checkpoint is damaged and
nothing is left.

    .venv/bin/python bench/chaos.py [--seed 1] [--minutes 10] [--min-gap 20] [--max-gap 60]
    .venv/bin/python bench/chaos.py --only sigkill --min-gap 60 --max-gap 60   # the headline row

The test suite runs a short variant (``tests/test_chaos.py``: ``--steps``, ``--faults``). The last
line of the output is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.controller.reaper import marked_pids, pids_running_from, ray_temp_dir  # noqa: E402
from orchestrator.events import read_events  # noqa: E402

CONFIG = REPO / "cluster_configs" / "local.yaml"
KINDS = ("sigkill", "sigstop", "raise", "kill_during_save", "kill_spare", "kill_zygote", "kill_actor",
         "kill_controller")
# Memory snapshots at the interval the run's failure rate calls for (docs/checkpoints.md): a failure a
# minute on 60 ms steps is what `auto` is for.
OVERRIDES = ("checkpoint.interval_steps=50", "checkpoint.memory_interval_steps=auto",
             "fault_tolerance.max_restarts=1000", "metrics.port=0")
_WAIT_S = 600.0
_INTERRUPTIONS = ("run_started", "failure_detected", "recovery_started")  # training stopped here
# Faults that stop training: the next fault waits until the controller has seen this one, so that
# each is seen for what it was (a SIGSTOP is seen only after the hang timeout; a fault landing
# before then would be blamed for it).
_STOPS_TRAINING = ("sigkill", "sigstop", "raise", "kill_during_save", "kill_actor", "kill_controller")


@dataclass
class Fault:
    kind: str
    at: float  # wall time it was injected
    step: int  # the last step logged before it
    target: str
    cost_s: float = 0.0  # what it cost training (see cost())


class Job:
    """``orchestrator launch`` on one run directory, as a user runs it (again after a controller kill)."""

    def __init__(self, run_dir: Path, steps: int, hang_timeout_s: float) -> None:
        self.run_dir = run_dir
        self.args = ["launch", str(CONFIG), "--run-dir", str(run_dir), "--set", f"train.steps={steps}"]
        # Detecting a SIGSTOP takes hang_timeout_s: keep it short.
        for item in (*OVERRIDES, f"fault_tolerance.hang_timeout_s={hang_timeout_s:g}"):
            self.args += ["--set", item]
        self.proc: subprocess.Popen | None = None
        self.fault_at = 0.0  # when the last fault was delivered
        self.tokens: list[str] = []

    def start(self, faults: list[str] = ()) -> None:
        extra = [arg for fault in faults for arg in ("--inject-fault", fault)]
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *self.args, *extra], cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.tokens.append(self._token())

    def _token(self) -> str:
        """The run's token, from its reaper's command line (``reaper TOKEN CONTROLLER_PID``)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for entry in Path("/proc").iterdir():
                try:
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"orchestrator.controller.reaper" in argv and argv[-2:-1] == [str(self.proc.pid).encode()]:
                    return argv[-3].decode()
            time.sleep(0.1)
        raise RuntimeError("the controller started no reaper within 60 s")

    def events(self) -> list[dict]:
        path = self.run_dir / "events.jsonl"
        return read_events(path) if path.exists() else []

    def last_step(self) -> int:
        steps = [e["step"] for e in self.events() if e["event"] == "step"]
        return steps[-1] if steps else 0

    def rank_pids(self) -> dict[int, int]:
        """The current launch's training processes, by rank."""
        evs = self.events()
        start = max((i for i, e in enumerate(evs) if e["event"] == "run_started"), default=0)
        return {e["rank"]: e["pid"] for e in evs[start:] if e["event"] == "worker_started"}

    def wait_seen(self, since: float, timeout: float) -> bool:
        """Wait until the controller reacts to a fault made at ``since`` (an interruption event after
        it); False if it did not within ``timeout`` or the job ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(e["event"] in _INTERRUPTIONS and e["ts"] > since for e in self.events()):
                return True
            time.sleep(0.05)
        return False

    def wait_training(self, timeout: float = 120.0) -> bool:
        """Wait until the job trains: a step after its (re)start and after any failure seen since;
        False if it ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            evs = self.events()
            since = max((i for i, e in enumerate(evs) if e["event"] in _INTERRUPTIONS), default=None)
            if since is not None and any(e["event"] == "step" for e in evs[since:]):
                return True
            time.sleep(0.05)
        return False

    def processes(self, fragment: str) -> list[int]:
        """The current launch's processes whose command line holds ``fragment``."""
        found = []
        for pid in marked_pids(self.tokens[-1], exclude=set()):
            try:
                if fragment.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                continue
        return found

    def left_behind(self) -> list[int]:
        pids = set()
        for token in self.tokens:
            pids |= set(marked_pids(token, exclude=set())) | set(pids_running_from(ray_temp_dir(token), exclude=set()))
        return sorted(pids)


def plan(seed: int, seconds: float, min_gap: float, max_gap: float, kinds: tuple[str, ...],
         most: int | None = None) -> list[tuple[float, str]]:
    """(offset in seconds, kind): gaps drawn uniformly, kinds in shuffled rounds so each appears;
    at most ``most`` faults."""
    rng = random.Random(seed)
    schedule, at, bag = [], 0.0, []
    while True:
        at += rng.uniform(min_gap, max_gap)
        if at > seconds or (most is not None and len(schedule) == most):
            return schedule
        if not bag:
            bag = list(kinds)
            rng.shuffle(bag)
        schedule.append((at, bag.pop()))


def inject(job: Job, kind: str, rng: random.Random, step_s: float) -> str:
    """Inject one fault of ``kind``; returns what it hit (``job.fault_at``: when)."""
    job.fault_at = time.time()
    if kind == "kill_controller":
        job.proc.kill()
        job.proc.wait()
        deadline = time.monotonic() + 60  # its reaper cleans up; then the user runs the same command again
        while job.left_behind() and time.monotonic() < deadline:
            time.sleep(0.1)
        fired = {(e["kind"], e["rank"], e["step"]) for e in job.events() if e["event"] == "fault_injected"}
        job.start([f for f in job.pending_raises if tuple(_parse(f)) not in fired])
        return f"controller {job.proc.pid} (relaunched)"
    if kind == "kill_during_save":
        staging = job.run_dir / "checkpoints" / ".staging"
        deadline = time.monotonic() + 120
        while not any(staging.glob("attempt-*/global_step*")) and time.monotonic() < deadline:
            time.sleep(0.005)
    if kind in ("sigkill", "sigstop", "kill_during_save"):
        rank, pid = rng.choice(sorted(job.rank_pids().items()))
        job.fault_at = time.time()
        try:
            os.kill(pid, signal.SIGSTOP if kind == "sigstop" else signal.SIGKILL)
        except ProcessLookupError:
            return f"rank {rank} pid {pid}: already gone (skipped)"
        return f"rank {rank} pid {pid}"
    fragment = {"kill_spare": "orchestrator.worker.zygote", "kill_zygote": "orchestrator.worker.zygote",
                "kill_actor": "ray::NodeAgent"}[kind]
    candidates = job.processes(fragment)
    if kind == "kill_spare":  # forked by the zygote: same command line, the zygote is its parent
        zygotes, ranks = set(candidates), set(job.rank_pids().values())  # a promoted spare is a rank now
        candidates = [p for p in candidates if _ppid(p) in zygotes and p not in ranks]
    elif kind == "kill_zygote":
        candidates = [p for p in candidates if _ppid(p) not in set(candidates)]
    elif kind == "kill_actor":  # the agent: parent of a fresh rank process, grandparent of a forked one;
        # a zygote the controller started ahead is the controller's child, and its agent (adopting it) the
        # local node's only one.
        hosts = {_ppid(r) for r in job.rank_pids().values()} | {_ppid(_ppid(r)) for r in job.rank_pids().values()}
        candidates = [p for p in candidates if p in hosts] or (candidates if len(candidates) == 1 else [])
    if not candidates:
        return "nothing to hit (skipped)"
    pid = rng.choice(sorted(candidates))
    job.fault_at = time.time()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return f"pid {pid}: already gone (skipped)"
    return f"pid {pid}"


def _ppid(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _parse(fault: str) -> tuple[str, int, int]:
    kind, _, where = fault.partition("@")
    rank, _, step = where.partition(":")
    return kind, int(rank), int(step)


def clean_run(workdir: Path, steps: int, hang_timeout_s: float) -> tuple[float, float]:
    """Final loss and median step time of the same job without faults."""
    job = Job(workdir / "clean", steps, hang_timeout_s)
    job.start()
    job.proc.wait(timeout=_WAIT_S * 6)
    evs = job.events()
    finished = [e for e in evs if e["event"] == "run_finished"][-1]
    assert finished["status"] == "succeeded", finished
    step_times = [e["step_time_s"] for e in evs if e["event"] == "step"]
    return finished["final_loss"], statistics.median(step_times)


def soak(workdir: Path, steps: int, schedule: list[tuple[float, str]], seed: int, step_s: float,
         hang_timeout_s: float) -> tuple[Job, list[Fault]]:
    job = Job(workdir / "chaos", steps, hang_timeout_s)
    rng = random.Random(seed + 1)
    # An exception in the training code enters with the launch (--inject-fault), at about the step
    # its planned time reaches; the report takes its time from the fault_injected event.
    job.pending_raises = [f"raise@{rng.randrange(2)}:{max(1, int(offset / step_s * 0.8))}"
                          for offset, kind in schedule if kind == "raise"]
    job.start(job.pending_raises)
    started = time.time()
    faults: list[Fault] = []
    for offset, kind in schedule:
        if kind == "raise":
            continue
        while time.time() - started < offset:
            if job.proc.poll() is not None:
                return job, faults  # finished before the rest of the schedule
            time.sleep(0.05)
        if not job.wait_training():  # a fault lands on a running job, not on one still starting
            break
        step = job.last_step()
        target = inject(job, kind, rng, step_s)
        if not target.endswith("(skipped)"):
            faults.append(Fault(kind=kind, at=job.fault_at, step=step, target=target))
            if kind in _STOPS_TRAINING:
                job.wait_seen(job.fault_at, timeout=hang_timeout_s + 60)
        print(f"  {time.time() - started:6.1f}s  step {step:5d}  {kind:17s} {target}", flush=True)
    while True:
        try:
            job.proc.wait(timeout=_WAIT_S)
            break
        except subprocess.TimeoutExpired:
            raise RuntimeError("the chaos run did not finish") from None
    return job, faults


def cost(fault: Fault, after: list[dict], steps: list[dict], step_s: float) -> float:
    """What ``fault`` cost training: from the fault until training resumed (``recovery_finished``, or
    the first step of the relaunch after a controller kill), plus the steps trained again (from the
    checkpoint resumed to the highest step reached before the fault). 0 when training never stopped."""
    high = max((e["step"] for e in steps if e["ts"] <= fault.at), default=0)
    for e in after:
        if e["event"] == "recovery_finished":
            return e["ts"] - fault.at + max(0, high - e["resumed_from_step"]) * step_s
        if e["event"] == "run_started":
            first = next((s for s in steps if s["ts"] > e["ts"]), None)
            if first is not None:
                return first["ts"] - fault.at + max(0, high - e["resumed_from_step"]) * step_s
    return 0.0


def report(job: Job, faults: list[Fault], clean_loss: float, step_s: float) -> dict:
    """Print the soak's results; returns them as a summary (``passed``: loss equal, nothing damaged or left)."""
    evs = job.events()
    steps = [e for e in evs if e["event"] == "step"]
    faults = sorted(faults + [Fault(kind="raise", at=e["ts"], step=e["step"] - 1, target=f"rank {e['rank']}")
                              for e in evs if e["event"] == "fault_injected"], key=lambda f: f.at)
    for i, fault in enumerate(faults):
        until = faults[i + 1].at if i + 1 < len(faults) else float("inf")
        fault.cost_s = cost(fault, [e for e in evs if fault.at < e["ts"] < until], steps, step_s)
    finished = [e for e in evs if e["event"] == "run_finished"][-1]
    verify = subprocess.run([sys.executable, "-m", "orchestrator", "checkpoints", "verify", str(job.run_dir)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    damaged = sum(1 for line in verify.stdout.splitlines() if ": " not in line and " damaged " in f" {line} ")
    left = job.left_behind()
    wall = finished["ts"] - min(e["ts"] for e in evs if e["event"] == "run_started")
    high, productive = 0, 0.0
    for e in steps:
        if e["step"] > high:
            productive, high = productive + e["step_time_s"], e["step"]
    recoveries = sum(1 for e in evs if e["event"] == "recovery_finished")
    by_kind: dict[str, list[float]] = {}
    for fault in faults:
        by_kind.setdefault(fault.kind, []).append(fault.cost_s)
    match = finished.get("final_loss") == clean_loss
    print(f"\nfaults injected: {len(faults)} ({', '.join(sorted({f.kind for f in faults}))})")
    print(f"recoveries: {recoveries}; controller launches: {len(job.tokens)}")
    print(f"final loss: {finished.get('final_loss')!r} vs clean {clean_loss!r}: "
          f"{'equal, bit for bit' if match else 'DIFFERENT'} ({finished['status']})")
    print(f"checkpoints failing `orchestrator checkpoints verify`: {damaged} (exit {verify.returncode})")
    print(f"processes left behind: {len(left)} {left if left else ''}")
    print(f"goodput: {productive / wall:.1%} ({productive:.0f}s of steps trained once, over {wall:.0f}s)")
    print("\n| fault | count | badput per fault, median (s) | max (s) |\n|---|---|---|---|")
    for kind in KINDS:
        costs = by_kind.get(kind)
        if costs:
            print(f"| {kind} | {len(costs)} | {statistics.median(costs):.1f} | {max(costs):.1f} |")
    return {"passed": match and damaged == 0 and verify.returncode == 0 and not left,
            "faults": [f.kind for f in faults], "recoveries": recoveries, "launches": len(job.tokens),
            "loss_equal": match, "damaged": damaged, "left_behind": left, "goodput": productive / wall,
            "run_dir": str(job.run_dir),
            "injected": [{"kind": f.kind, "at": f.at, "target": f.target, "cost_s": f.cost_s} for f in faults]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long faults are injected")
    parser.add_argument("--min-gap", type=float, default=20.0)
    parser.add_argument("--max-gap", type=float, default=60.0)
    parser.add_argument("--only", choices=KINDS, action="append", help="only these kinds (repeatable)")
    parser.add_argument("--faults", type=int, help="at most this many faults")
    parser.add_argument("--steps", type=int, help="train this many steps (default: enough for --minutes, "
                        "measured by a 200-step probe run)")
    parser.add_argument("--hang-timeout", type=float, default=10.0, help="fault_tolerance.hang_timeout_s")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    kinds = tuple(args.only or KINDS)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        workdir = args.out or Path(tmp)
        steps = args.steps
        if steps is None:
            _, probe_s = clean_run(workdir / "probe", 200, args.hang_timeout)
            # Enough steps that the faulted run lasts the whole schedule, with room for recoveries.
            steps = int(args.minutes * 60 / probe_s * 1.1)
        print(f"{steps} steps; clean run first", flush=True)
        clean_loss, step_s = clean_run(workdir, steps, args.hang_timeout)
        schedule = plan(args.seed, args.minutes * 60, args.min_gap, args.max_gap, kinds, args.faults)
        print(f"step time {step_s * 1000:.0f} ms; chaos run: {len(schedule)} faults over {args.minutes:g} min "
              f"(seed {args.seed})", flush=True)
        job, faults = soak(workdir, steps, schedule, args.seed, step_s, args.hang_timeout)
        summary = report(job, faults, clean_loss, step_s)
        print(json.dumps({"seed": args.seed, "steps": steps, **summary}))
        return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
