"""A user's own script and a killed rank: this orchestrator against ``torchrun --max-restarts``.

The same unmodified script runs under each launcher (2 CPU ranks, a checkpoint every 10 steps,
resuming from its own last checkpoint); rank 1 is SIGKILLed as soon as the first checkpoint is on
disk. ``--script hf`` (the default): the Hugging Face Trainer + DeepSpeed ZeRO-2 script of the
tests (tests/scripts/hf_clm.py, a tiny GPT-2; its ``trainer_state.json`` is written last);
``--script lightning``: the PyTorch Lightning DDP script (tests/scripts/lightning_ddp.py,
``ModelCheckpoint(save_last=True)``; its ``last.ckpt``). Reported per launcher: the wall time
from launch to exit, the time from the kill to the exit, and the losses the run logged after its
resume, which must be the same under both (the script restores its own state; the launcher only
restarts it).

    .venv/bin/python bench/script_restart.py [--script hf|lightning] [--steps 30] [--repeats 1] [--kill-after S]

``--kill-after S``: rank 1 is SIGKILLed S seconds after the launch instead (or once it has a
process, if later): a kill in the first seconds of a run, before any checkpoint, after which both
launchers restart the script from its start.

torchrun runs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: without it, its restarts hang or fail on
this stack (../shared/STACK-NOTES.md). Printed last: the ratios orchestrator / torchrun of the wall
time (target <= 1) and of the time from the kill to the end (target <= 0.6).
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.events import read_events  # noqa: E402
from orchestrator.installation import with_interpreter_tools  # noqa: E402
from orchestrator.worker.env import local_cpu_count  # noqa: E402
from tests.helpers import descendants  # noqa: E402

SCRIPTS = REPO / "tests" / "scripts"
DS_CONFIG = SCRIPTS / "ds_zero2.json"
_TIMEOUT_S = 900.0
_TARGET_KILL_TO_END = 0.6


@dataclass(frozen=True)
class Script:
    """How to run one of the scripts, know its first checkpoint is on disk, and read its losses."""

    name: str
    args: Callable[[Path, int], list[str]]
    first_checkpoint: Callable[[Path], Path]
    losses: Callable[[Path, Path], dict[int, float]]  # (output dir, rank 0's stdout) -> loss by step


def _hf_losses(out: Path, _stdout: Path) -> dict[int, float]:
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e and e["step"] > 10}


def _printed_losses(_out: Path, stdout: Path) -> dict[int, float]:
    """``step N loss X`` lines (the last of each step: a resumed run prints some again)."""
    losses = {}
    for line in stdout.read_text(errors="replace").splitlines():
        line = line.removeprefix("[rank 0] ")
        if line.startswith("step ") and " loss " in line:
            _, step, _, loss = line.split()[:4]
            losses[int(step)] = float(loss)
    return {step: loss for step, loss in losses.items() if step > 10}


SCRIPT_KINDS = {
    "hf": Script(
        name="Hugging Face Trainer + ZeRO-2 script",
        args=lambda out, steps: [str(SCRIPTS / "hf_clm.py"), "--output_dir", str(out), "--deepspeed", str(DS_CONFIG),
                                 "--max_steps", str(steps), "--save_steps", "10"],
        first_checkpoint=lambda out: out / "checkpoint-10" / "trainer_state.json",
        losses=_hf_losses,
    ),
    "lightning": Script(
        name="PyTorch Lightning DDP script",
        args=lambda out, steps: [str(SCRIPTS / "lightning_ddp.py"), "--output_dir", str(out),
                                 "--max_steps", str(steps)],
        first_checkpoint=lambda out: out / "last.ckpt",
        losses=_printed_losses,
    ),
}


def orchestrator_command(script: Script, work: Path, steps: int) -> tuple[list[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "orchestrator", "launch", str(REPO / "cluster_configs" / "local.yaml"),
           "--run-dir", str(work / "run"), "--set", "metrics.port=0", "--", *script.args(work / "out", steps)]
    return cmd, dict(os.environ)


def torchrun_command(script: Script, work: Path, steps: int) -> tuple[list[str], dict[str, str]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "3",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", *script.args(work / "out", steps)]
    # What the orchestrator gives its ranks: threads, accelerator, this installation's prebuilt ops.
    env = with_interpreter_tools(dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", DS_ACCELERATOR="cpu",
                                      CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(max(1, local_cpu_count() // 2))))
    return cmd, env


def rank1_pid(system: str, work: Path, root: int) -> int | None:
    """The pid of the live rank-1 training process of the run."""
    if system == "orchestrator":
        events = work / "run" / "events.jsonl"
        started = [e for e in read_events(events) if e["event"] == "worker_started" and e["rank"] == 1] \
            if events.exists() else []
        return started[-1]["pid"] if started else None
    for pid in descendants(root)[1:]:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"RANK=1" in environ and b"LOCAL_RANK=1" in environ:
            return pid
    return None


def run(script: Script, system: str, steps: int, kill_after_s: float | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"script-restart-{system}-") as tmp:
        work = Path(tmp)
        cmd, env = (orchestrator_command if system == "orchestrator" else torchrun_command)(script, work, steps)
        started = time.monotonic()
        with open(work / "stdout", "wb") as stdout:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
        try:
            marker = script.first_checkpoint(work / "out")
            due = (marker.exists if kill_after_s is None else
                   lambda: time.monotonic() - started >= kill_after_s and rank1_pid(system, work, proc.pid) is not None)
            while not due():
                if proc.poll() is not None or time.monotonic() - started > _TIMEOUT_S:
                    raise RuntimeError(f"{system} ended ({proc.returncode}) before the kill")
                time.sleep(0.02)
            pid = None
            while pid is None:
                pid = rank1_pid(system, work, proc.pid)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            proc.wait(timeout=_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        ended = time.monotonic()
        if proc.returncode != 0:
            raise RuntimeError(f"{system} exited with {proc.returncode}")
        rank0 = work / "run" / "logs" / "rank0.log" if system == "orchestrator" else work / "stdout"
        losses = script.losses(work / "out", rank0)
        return {"wall_s": ended - started, "kill_to_end_s": ended - killed, "losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", choices=sorted(SCRIPT_KINDS), default="hf")
    parser.add_argument("--steps", type=int, default=30, help="the script's --max_steps (a checkpoint every 10)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--kill-after", type=float, metavar="S",
                        help="kill rank 1 S seconds after the launch, not after the first checkpoint")
    args = parser.parse_args()
    script = SCRIPT_KINDS[args.script]
    results: dict[str, list[dict]] = {"orchestrator": [], "torchrun": []}
    for _ in range(args.repeats):
        for system in results:  # interleaved: a slow phase of the machine hits both
            result = run(script, system, args.steps, args.kill_after)
            results[system].append(result)
            print(f"  {system}: wall {result['wall_s']:.1f}s, kill -> end {result['kill_to_end_s']:.1f}s", flush=True)
    reference = results["torchrun"][0]["losses"]
    same = bool(reference) and all(r["losses"] == reference for rs in results.values() for r in rs)
    for system, rs in results.items():
        for i, r in enumerate(rs):
            steps = sorted(set(r["losses"]) | set(reference))
            differ = [step for step in steps if r["losses"].get(step) != reference.get(step)]
            if differ:
                print(f"  {system} run {i + 1}: losses differ from torchrun run 1's at steps {differ[:10]}")
    when = ("after the first checkpoint (step 10)" if args.kill_after is None
            else f"{args.kill_after:g} s after the launch")
    print(f"\n{script.name}, 2 CPU ranks, {args.steps} steps, rank 1 SIGKILLed {when}, median of {args.repeats}:\n")
    print("| launcher | wall time (s) | kill -> end (s) |")
    print("|---|---|---|")
    walls, ends = {}, {}
    for system, rs in results.items():
        walls[system] = statistics.median(r["wall_s"] for r in rs)
        ends[system] = statistics.median(r["kill_to_end_s"] for r in rs)
        name = "orchestrator (script mode)" if system == "orchestrator" else "torchrun --max-restarts 3"
        print(f"| {name} | {walls[system]:.1f} | {ends[system]:.1f} |")
    ratio, end_ratio = walls["orchestrator"] / walls["torchrun"], ends["orchestrator"] / ends["torchrun"]
    print(f"\nlosses after the resume the same under both launchers: {'yes, bit for bit' if same else 'NO'}")
    print(f"wall time, orchestrator / torchrun: {ratio:.2f} (target <= 1)")
    print(f"kill -> end, orchestrator / torchrun: {end_ratio:.2f} (target <= {_TARGET_KILL_TO_END})")
    return 0 if ratio <= 1 and end_ratio <= _TARGET_KILL_TO_END and same else 1


if __name__ == "__main__":
    sys.exit(main())
