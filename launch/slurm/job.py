"""One orchestrator job on a Slurm allocation: what ``launch/slurm.sbatch`` (batch) and
``launch/slurm/srun.sh`` (interactive, inside ``salloc``) run on the allocation's first node.

    python launch/slurm/job.py CONFIG [orchestrator launch options]

1. The Ray head here, at this node's Slurm address (``NodeAddr``); one ``srun`` task on every
   other node of the allocation starts a Ray worker there (``job.py --worker``) and marks itself
   joined in the run directory; the head waits until all have (bounded), naming the one missing.
2. ``orchestrator launch CONFIG`` against that cluster, with ``cluster.nodes`` and
   ``cluster.workers_per_node`` taken from the allocation where the config does not decide them
   (an explicit ``--set`` that contradicts the allocation is an error), and the run directory
   ``runs/slurm-$SLURM_JOB_ID`` unless ``--run-dir`` says otherwise: the same across requeues.
3. SIGUSR1 (``#SBATCH --signal=B:USR1@90``: the warning before a time limit or a preemption) is
   passed on to the controller, which saves a checkpoint, stops every rank and exits 3; so does a
   SIGTERM (scancel, ``scontrol requeue``, a preemption: Slurm sends it to every process of the job).
4. Everything started here stops on every node, whatever happened. After a SIGUSR1, where the job
   may be requeued (``sbatch --requeue``), ``scontrol requeue`` puts it back in the queue (after a
   SIGTERM Slurm itself requeues, or not: a cancelled job stays cancelled), and the requeued job
   resumes from the checkpoint in the same run directory.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from orchestrator.children import start_logged, stop  # noqa: E402
from orchestrator.cli import EXIT_PREEMPTED, EXIT_USAGE, RESUME_COMMAND_ENV  # noqa: E402
from orchestrator.controller.ray_session import NODE_ENV  # noqa: E402
from orchestrator.errors import ClusterError, ConfigError  # noqa: E402
from orchestrator.slurm import SlurmAllocation, cluster_settings, resume_command  # noqa: E402

_JOIN_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 20.0
# Ray's `ray start --block` drains for 30 s on SIGTERM before it stops its node (for Serve on Kubernetes):
# Slurm's SIGKILL comes KillWait (30 s) after its SIGTERM, and the job must be gone by then. A Ray worker
# that exits kills its children: a node agent dying of scancel's SIGTERM would take the ranks that are
# saving a checkpoint alone (orchestrator/worker/stop_signal.py) with it; they end by themselves.
_RAY_ENV = {**NODE_ENV, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_kill_child_processes_on_worker_exit": "0"}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        return _worker(argv[1], Path(argv[2]))
    parser = argparse.ArgumentParser(prog="slurm.sbatch", description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--port", type=int, default=int(os.environ.get("RAY_PORT", "6379")), help="Ray head port")
    args, launch_args = parser.parse_known_args(argv)
    try:
        allocation = SlurmAllocation.from_environment()
        settings, run_dir, rest = cluster_settings(allocation, args.config, launch_args)
    except ConfigError as exc:
        print(f"orchestrator (slurm): {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    # The closing line of a preempted run names this, not the launch command this script made up.
    os.environ[RESUME_COMMAND_ENV] = resume_command(allocation, args.config, launch_args, run_dir,
                                                    batch=os.environ.get("ENVIRONMENT") == "BATCH")  # sbatch sets it
    return Job(allocation, args.config, settings, run_dir, rest, args.port).run()


class Job:
    """The Ray cluster on the allocation and the controller on it; stopped together."""

    def __init__(self, allocation: SlurmAllocation, config: str, settings: list[str], run_dir: Path,
                 launch_args: list[str], port: int) -> None:
        self.allocation = allocation
        self.config, self.settings, self.run_dir, self.launch_args = config, settings, run_dir, launch_args
        self.port = port
        # One directory per start of the job: a requeued job must not take its last start's logs and marks.
        self.state = run_dir / "slurm" / f"{allocation.job_id}.{allocation.restarts}"
        self.children: list[subprocess.Popen] = []
        self.controller: subprocess.Popen | None = None
        self.preempted_by: str | None = None

    def run(self) -> int:
        self.state.mkdir(parents=True, exist_ok=True)
        token = self.state / "ray-token"
        token.write_text(secrets.token_hex(32) + "\n")
        token.chmod(0o600)
        env = {**os.environ, **_RAY_ENV, "RAY_AUTH_TOKEN_PATH": str(token)}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_stop)
        head = f"{self.allocation.address}:{self.port}"
        code = 1
        try:
            self._start_head(env)
            if self.allocation.nodes > 1:
                self._start_workers(head, env)
                self._wait_for_workers()
            print(f"orchestrator (slurm): job {self.allocation.job_id}, Ray at {head} on "
                  f"{self.allocation.nodes} node(s) ({', '.join(self.allocation.node_names)}), run dir "
                  f"{self.run_dir}", flush=True)
            command = [sys.executable, "-m", "orchestrator", "launch", self.config, "--run-dir", str(self.run_dir),
                       "--set", f"cluster.ray_address={head}", *self.settings, *self.launch_args]
            if self.preempted_by is None:
                self.controller = subprocess.Popen(command, env=env, cwd=os.getcwd())
                code = _wait_uninterrupted(self.controller)
            else:
                code = EXIT_PREEMPTED
        except ClusterError as exc:
            print(f"orchestrator (slurm): {exc}", file=sys.stderr, flush=True)
        finally:
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)  # the stop below must not be cut short
            for child in reversed(self.children):
                _stop(child)
        # After a SIGTERM Slurm requeues by itself where it should (a preemption, `scontrol requeue`) and must
        # not where it should not (scancel); the warning SIGUSR1 leaves it to the job.
        if code == EXIT_PREEMPTED and self.preempted_by == "SIGUSR1" and self.allocation.requeue_allowed():
            result = subprocess.run(["scontrol", "requeue", self.allocation.job_id], capture_output=True, text=True,
                                    timeout=60)
            said = (result.stdout + result.stderr).strip()
            print(f"orchestrator (slurm): preempted; requeued job {self.allocation.job_id}"
                  + (f" ({said})" if result.returncode else ""), flush=True)
        return code

    def _on_stop(self, signum: int, _frame: object) -> None:
        self.preempted_by = signal.Signals(signum).name
        if self.controller is not None and self.controller.poll() is None:
            # A SIGTERM from Slurm reached the controller too; a SIGUSR1 (B:) only this shell.
            self.controller.send_signal(signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM)

    def _start_head(self, env: dict[str, str]) -> None:
        self.children.append(_start_ray(self.allocation, self.state, env, "head", ["--head", f"--port={self.port}",
                                                                                   "--include-dashboard=false"]))

    def _start_workers(self, head: str, env: dict[str, str]) -> None:
        others = self.allocation.nodes - 1
        command = ["srun", "--overlap", f"--nodes={others}", f"--ntasks={others}", "--ntasks-per-node=1",
                   f"--exclude={self.allocation.node_name}", "--kill-on-bad-exit=1",
                   sys.executable, str(Path(__file__).resolve()), "--worker", head, str(self.state)]
        self.children.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL))

    def _wait_for_workers(self) -> None:
        others = [n for n in self.allocation.node_names if n != self.allocation.node_name]
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        while time.monotonic() < deadline:
            missing = [n for n in others if not (self.state / f"joined-{n}").exists()]
            if not missing:
                return
            if self.children[-1].poll() is not None:
                raise ClusterError(f"the Ray workers' srun step exited with code {self.children[-1].returncode}; "
                                  f"their logs: {self.state}/ray-*.log")
            if self.preempted_by is not None:
                return
            time.sleep(0.2)
        raise ClusterError(f"node(s) {', '.join(missing)} did not join Ray within {_JOIN_TIMEOUT_S:.0f}s; "
                          f"their logs: {self.state}/ray-*.log")


def _worker(head: str, state: Path) -> int:
    """One other node: a Ray worker at this node's Slurm address, joined to ``head``; runs until stopped."""
    allocation = SlurmAllocation.from_environment()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # its start stops it on the way out
    try:
        proc = _start_ray(allocation, state, {**os.environ, **_RAY_ENV}, "worker", [f"--address={head}"])
    except ClusterError as exc:
        print(f"orchestrator (slurm): {exc}", file=sys.stderr, flush=True)
        return 1
    signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    try:
        (state / f"joined-{allocation.node_name}").touch()
        return _wait_uninterrupted(proc)
    finally:
        _stop(proc)


def _start_ray(allocation: SlurmAllocation, state: Path, env: dict[str, str], role: str,
               args: list[str]) -> subprocess.Popen:
    """``ray start --block`` on this node (at its Slurm address, with its share of the allocation), its
    output in ``STATE/ray-NODE.log``; returned once it has joined."""
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    command = [ray, "start", "--block", f"--node-ip-address={allocation.address}", "--disable-usage-stats",
               *args, *allocation.ray_resources()]
    return start_logged(command, state / f"ray-{allocation.node_name}.log", lambda out: b"Ray runtime started" in out,
                        f"the Ray {role} on {allocation.node_name}", _JOIN_TIMEOUT_S, env=env)


def _wait_uninterrupted(proc: subprocess.Popen) -> int:
    """``proc``'s exit code; signals handled meanwhile do not end the wait."""
    while True:
        try:
            return proc.wait()
        except InterruptedError:
            continue


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM: ``ray start --block`` then stops the Ray it started; srun passes it to its tasks."""
    stop(proc, _STOP_TIMEOUT_S)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
