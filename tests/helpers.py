"""Running the real CLI from tests, and reading what it leaves behind."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.checkpoint import store
from orchestrator.checkpoint.manifest import FileEntry, Manifest
from orchestrator.events import read_events
from orchestrator.run_dir import RunDir

REPO = Path(__file__).resolve().parent.parent
LOCAL_CONFIG = REPO / "cluster_configs" / "local.yaml"
# A cluster.env value of the reference run: it must not be written anywhere in the run directory.
SECRET = "s3cr3t-4f9a"
# The session's reference run of the local config (conftest ``reference_run``): ZeRO-2, 100 steps,
# a checkpoint every 10.
REFERENCE_TRAINING = ("train.steps=100", "checkpoint.interval_steps=10")
REFERENCE = (*REFERENCE_TRAINING, f"cluster.env.WANDB_API_KEY={SECRET}")
# The session's 4-rank reference (one node): what the multi-node runs train like, and the baseline of
# recoveries where a survivor can be blocked on another survivor.
FOUR_RANKS_TRAINING = ("train.steps=60", "checkpoint.interval_steps=10")
FOUR_RANKS = (*FOUR_RANKS_TRAINING, "cluster.workers_per_node=4")


def zero_reference(stage: int, precision: str = "fp32") -> tuple[str, ...]:
    """The reference run of ZeRO stage ``stage`` in ``precision`` (30 steps, a checkpoint every 10)."""
    return (f"parallel.zero_stage={stage}", "train.steps=30", "checkpoint.interval_steps=10",
            f"train.precision={precision}")


def cli(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``orchestrator ARGS`` to completion from the repository root (``env``: added to ours)."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def start_cli(*args: str) -> subprocess.Popen[str]:
    """Start ``orchestrator ARGS`` in its own process group, as a shell would."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


@contextmanager
def running_cli(*args: str) -> Iterator[subprocess.Popen[str]]:
    """``start_cli`` for a ``with`` block: still running at its end (a failed assertion), the
    command is killed and reaped."""
    proc = start_cli(*args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def launch_args(run_dir: Path, *overrides: str, config: Path = LOCAL_CONFIG) -> list[str]:
    args = ["launch", str(config), "--run-dir", str(run_dir)]
    # A free port per run: tests (and a developer's own runs) must not contend for 9464.
    for item in ("metrics.port=0", *overrides):
        args += ["--set", item]
    return args


def events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    return read_events(path) if path.exists() else []


def of_kind(evs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in evs if e["event"] == kind]


def failed_ranks(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every failed rank of the log, as ``{"rank", "reason", "root_cause", "attempt"}``: the root cause
    from ``failure_detected``, the others from the ``failure_consequences`` that follows it."""
    found = []
    for e in evs:
        if e["event"] == "failure_detected":
            found.append({"rank": e["rank"], "reason": e["reason"], "root_cause": True, "attempt": e["attempt"]})
        elif e["event"] == "failure_consequences":
            for reason, ranks in e["by_reason"].items():
                found += [{"rank": r, "reason": reason, "root_cause": False, "attempt": e["attempt"]}
                          for r in expand_ranks(ranks)]
    return found


def expand_ranks(ranks: str) -> list[int]:
    """``0-3,8`` -> [0, 1, 2, 3, 8] (the compact form of the event log)."""
    out: list[int] = []
    for part in filter(None, ranks.split(",")):
        first, _, last = part.partition("-")
        out += range(int(first), int(last or first) + 1)
    return out


def losses_by_step(evs: list[dict[str, Any]]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in of_kind(evs, "step")}


def wait_for_event(
    run_dir: Path, predicate: Callable[[dict[str, Any]], bool], timeout: float, proc: subprocess.Popen | None = None
) -> dict[str, Any]:
    """Block until an event matching ``predicate`` is in the log; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in events(run_dir):
            if predicate(event):
                return event
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before the event: {proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"no matching event within {timeout}s in {run_dir}")


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live (non-zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], timeout: float = 15) -> list[int]:
    """Pids still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    os.killpg(proc.pid, sig)


def interrupt(proc: subprocess.Popen) -> None:
    """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group."""
    kill_group(proc, signal.SIGINT)


def commit_for_test(run: RunDir, step: int, payload: bytes = b"x") -> Path:
    """A committed checkpoint of ``step`` holding one file, with a valid manifest (no training needed)."""
    directory = run.checkpoints / store.tag_for(step)
    directory.mkdir()
    (directory / "shard.pt").write_bytes(payload)
    Manifest(tag=directory.name, step=step, world_size=2, data_parallel_size=2, tensor_parallel=1, zero_stage=2,
             global_batch=16, files={"shard.pt": FileEntry(size=len(payload), sha256=hashlib.sha256(payload).hexdigest())}
             ).write(directory)
    return directory


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def run_token(controller: int) -> str:
    """The run token (``ORCH_RUN_TOKEN``) a running controller marked its processes with, read from
    the environment of a process it started (Ray's, its reaper's)."""
    from orchestrator.controller.reaper import RUN_TOKEN_ENV

    for pid in descendants(controller)[1:]:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(f"{RUN_TOKEN_ENV}=".encode()):
                return item.split(b"=", 1)[1].decode()
    raise AssertionError(f"no process of controller {controller} carries {RUN_TOKEN_ENV}")


def run_leftovers(token: str, timeout: float = 15) -> list[str]:
    """Command lines of the run's processes still alive after ``timeout``: any marked with its token,
    or running from its embedded Ray's directory (Ray's daemons and agents)."""
    from orchestrator.controller.reaper import marked_pids, pids_running_from, ray_temp_dir

    def left() -> list[int]:
        found = set(marked_pids(token, {os.getpid()})) | set(pids_running_from(ray_temp_dir(token), {os.getpid()}))
        return [pid for pid in found if pid_alive(pid)]

    deadline = time.monotonic() + timeout
    while (pids := left()) and time.monotonic() < deadline:
        time.sleep(0.2)
    commands = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        commands.append(f"{pid}: {command[:200]}")
    return commands


def listening_sockets(pids: list[int]) -> list[tuple[int, str]]:
    """(pid, address) of every TCP socket the processes ``pids`` listen on (addresses as in /proc/net:
    hex, IPv4 little-endian), from /proc/net/tcp{,6} and the processes' descriptors."""
    listeners: dict[str, str] = {}  # socket inode -> local address
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listeners[fields[9]] = fields[1]
    found = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listeners:
                found.append((pid, listeners[target[8:-1]]))
    return found


def is_loopback(address: str) -> bool:
    """Whether a /proc/net address (``HEXIP:HEXPORT``) is 127.0.0.0/8, ::1 or ::ffff:127.x."""
    ip = address.split(":")[0]
    if len(ip) == 8:
        return ip.endswith("7F")  # little-endian: the first octet is the last byte
    return ip == "00000000000000000000000001000000" or (ip.startswith("0000000000000000FFFF0000") and ip.endswith("7F"))
