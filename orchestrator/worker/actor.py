"""The per-rank Ray actor: hosts training processes on its node.

Normally an actor hosts its own rank's process. One actor per node also
hosts the node's warm spare: a training process that has already imported
torch and DeepSpeed and waits. When a rank on that node fails, the spare is
promoted to it, so after a recovery an actor may host two ranks.

The actor is deliberately light (it never imports torch): it starts
processes with the environment the controller built, relays their reports,
signals, stops and reaps them. The controller polls it; the actor never
calls back, so a slow controller cannot stall training.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.worker.channel import CONTROL_FD_ENV, Channel
from orchestrator.worker.env import local_cpu_count, with_interpreter_tools
from orchestrator.worker.process import PARENT_PID_ENV

SPARE = "spare"
_LOG_TAIL_BYTES = 8192
# How long after a process exits we wait for its last reports to be read.
_DRAIN_TIMEOUT_S = 2.0


class HostedProcess:
    """One training process, its control channel and what it reported."""

    def __init__(self, env: dict[str, str], log_path: Path, header: str) -> None:
        parent_end, child_end = socket.socketpair()
        full_env = with_interpreter_tools(
            {**os.environ, **env, CONTROL_FD_ENV: str(child_end.fileno()), PARENT_PID_ENV: str(os.getpid())}
        )
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        with open(log_path, "ab") as log:
            log.write(f"=== {header} ===\n".encode())
            log.flush()
            self.log_offset = log.tell()
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.worker.process"],
                env=full_env,
                pass_fds=(child_end.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C in the user's terminal reaches the controller,
                # which stops ranks in order, instead of interrupting them mid-collective.
                start_new_session=True,
            )
        child_end.close()
        self.channel = Channel(parent_end)
        self.inbox: collections.deque[dict[str, Any]] = collections.deque()
        self.alive_at = time.time()
        self.where = ""
        self.in_collective = False
        self.eof_at: float | None = None
        self.exited_at: float | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def send(self, message: dict[str, Any]) -> bool:
        try:
            self.channel.send(message)
            return True
        except OSError:
            return False  # it died; its exit will be polled

    def status(self) -> dict[str, Any]:
        """New reports, liveness, and the exit status once the process has ended."""
        messages = [self.inbox.popleft() for _ in range(len(self.inbox))]
        code = self._returncode()
        result: dict[str, Any] = {
            "pid": self.pid,
            "messages": messages,
            "returncode": code,
            "alive_at": self.alive_at,
            "where": self.where,
            "in_collective": self.in_collective,
        }
        if code is not None:
            # The socket closes the moment the process dies: the best clock for "when".
            result["exited_at"] = self.eof_at or time.time()
            if code != 0:
                result["log_tail"] = self._log_tail()
        return result

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            _signal_group(self.pid, sig)

    def stop(self, timeout_s: float) -> int | None:
        """SIGTERM the process (and anything it started), SIGKILL after ``timeout_s``; reap it."""
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=timeout_s)
        # Children the process left behind in its session die with it.
        _signal_group(self.pid, signal.SIGKILL)
        self.channel.close()
        return self.popen.returncode

    def _returncode(self) -> int | None:
        code = self.popen.poll()
        if code is None:
            return None
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        # Report the exit only after its last messages were read, so "finished" precedes it.
        if self.reader.is_alive() and time.monotonic() - self.exited_at < _DRAIN_TIMEOUT_S:
            return None
        return code

    def _read(self) -> None:
        try:
            for message in self.channel.messages():
                now = time.time()
                self.alive_at = now
                if message["type"] == "alive":
                    self.where, self.in_collective = message["where"], message["in_collective"]
                    continue
                message["at"] = now
                self.inbox.append(message)
        except (OSError, ValueError):
            pass  # channel closed under us by stop()
        self.eof_at = time.time()

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                start = max(self.log_offset, fh.tell() - _LOG_TAIL_BYTES)
                fh.seek(start)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""


class RankActor:
    """Hosts rank processes (and maybe the node's spare). Wrapped with ``ray.remote`` by the worker group."""

    def __init__(self, index: int, log_dir: str) -> None:
        self.index = index
        self._log_dir = Path(log_dir)
        self._procs: dict[int | str, HostedProcess] = {}
        self._spares_started = 0

    def node_info(self) -> dict[str, Any]:
        """Where this actor landed: host name, IP, Ray node id, GPUs Ray gave it, usable CPUs."""
        import ray

        return {
            "hostname": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cpus": local_cpu_count(),
        }

    def free_port(self, host: str) -> int:
        """A port free on this node right now, for the rank-0 rendezvous of a new attempt."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return sock.getsockname()[1]

    def start(self, rank: int, spec: dict[str, Any], env: dict[str, str]) -> int:
        """Start a fresh process for ``rank``; returns its pid."""
        self._forget(rank)
        proc = HostedProcess(env, self._rank_log(rank), f"rank {rank} attempt {spec['attempt']}: fresh process")
        self._procs[rank] = proc
        proc.send({"type": "start", **spec})
        return proc.pid

    def start_spare(self, config: dict[str, Any], env: dict[str, str]) -> int:
        """Start (or keep) this node's warm spare; returns its pid."""
        spare = self._procs.get(SPARE)
        if spare is not None and spare.popen.poll() is None:
            return spare.pid
        self._spares_started += 1
        log = self._log_dir / f"spare-{self.index}-{self._spares_started}.log"
        spare = HostedProcess(env, log, "warm spare")
        self._procs[SPARE] = spare
        spare.send({"type": "prepare", "config": config})
        return spare.pid

    def promote_spare(self, rank: int, spec: dict[str, Any]) -> int | None:
        """Make the spare ``rank``; returns its pid, or None when there is no live spare."""
        spare = self._procs.pop(SPARE, None)
        if spare is None or spare.popen.poll() is not None:
            return None
        self._forget(rank)
        log = self._rank_log(rank)
        with open(log, "ab") as fh:
            fh.write(f"=== rank {rank} attempt {spec['attempt']}: warm spare pid {spare.pid} ===\n".encode())
            spare.log_path, spare.log_offset = log, fh.tell()
        if not spare.send({"type": "start", "log_path": str(log), **spec}):
            return None
        self._procs[rank] = spare
        return spare.pid

    def send(self, rank: int, message: dict[str, Any]) -> bool:
        """Send a control message to ``rank``'s process; False if it is gone."""
        proc = self._procs.get(rank)
        return proc is not None and proc.send(message)

    def kill(self, rank: int) -> None:
        """SIGKILL ``rank``'s process (a hung or failed rank about to be replaced)."""
        proc = self._procs.get(rank)
        if proc is not None:
            proc.signal(signal.SIGKILL)

    def poll(self) -> dict[str, Any]:
        """Status of every hosted rank process, and whether the spare is alive."""
        ranks = {rank: p.status() for rank, p in self._procs.items() if rank != SPARE}
        spare = self._procs.get(SPARE)
        if spare is not None and spare.popen.poll() is not None:
            spare.stop(0)
            del self._procs[SPARE]
            spare = None
        return {"ranks": ranks, "spare_pid": None if spare is None else spare.pid}

    def stop(self, timeout_s: float = 5.0, spare: bool = True) -> None:
        """Stop and reap every hosted rank process (and the spare, unless ``spare`` is False)."""
        for key in list(self._procs):
            if key == SPARE and not spare:
                continue
            self._procs.pop(key).stop(timeout_s)

    def forget(self, rank: int) -> None:
        """Stop hosting ``rank`` (its process moved to another actor)."""
        self._forget(rank)

    def _forget(self, rank: int) -> None:
        old = self._procs.pop(rank, None)
        if old is not None:
            old.stop(0.5)

    def _rank_log(self, rank: int) -> Path:
        return self._log_dir / f"rank{rank}.log"


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
