"""The per-rank Ray actor: owns its rank's training process on the rank's node.

The actor is deliberately light (it never imports torch): it starts the
training process with the environment the controller built, relays the
process's reports, and stops and reaps it. The controller polls it; the
actor never calls back, so a slow controller cannot stall training.
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

_LOG_TAIL_BYTES = 8192
# How long after the process exits we wait for its last reports to be read.
_DRAIN_TIMEOUT_S = 2.0


class RankActor:
    """One rank's process owner. Wrapped with ``ray.remote`` by the worker group."""

    def __init__(self, rank: int, log_dir: str) -> None:
        self.rank = rank
        self._log_path = Path(log_dir) / f"rank{rank}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: Channel | None = None
        self._reader: threading.Thread | None = None
        self._inbox: collections.deque[dict[str, Any]] = collections.deque()
        self._log_offset = 0
        self._exited_at: float | None = None
        self._eof_at: float | None = None

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

    def start(self, spec: dict[str, Any], env: dict[str, str]) -> int:
        """Start the training process with ``env`` over the actor's own environment; returns its pid."""
        assert self._proc is None or self._proc.poll() is not None, "previous process still running"
        self._close_channel()
        parent_end, child_end = socket.socketpair()
        full_env = with_interpreter_tools(
            {**os.environ, **env, CONTROL_FD_ENV: str(child_end.fileno()), PARENT_PID_ENV: str(os.getpid())}
        )
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "ab") as log:
            log.write(f"=== rank {self.rank} attempt {spec['attempt']} ===\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(
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
        self._exited_at = self._eof_at = None
        self._inbox.clear()
        self._channel = Channel(parent_end)
        self._reader = threading.Thread(target=self._read, args=(self._channel,), daemon=True)
        self._reader.start()
        self._channel.send({"type": "start", **spec})
        return self._proc.pid

    def poll(self) -> dict[str, Any]:
        """New reports since the last poll, and the exit status once the process has ended."""
        messages = [self._inbox.popleft() for _ in range(len(self._inbox))]
        returncode = self._returncode()
        result: dict[str, Any] = {"messages": messages, "returncode": returncode}
        if returncode is not None:
            # The socket closes the moment the process dies: the best clock for "when".
            result["exited_at"] = self._eof_at or time.time()
            if returncode != 0:
                result["log_tail"] = self._log_tail()
        return result

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM the process (and anything it started), SIGKILL after ``timeout_s``; reap it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout_s)
        if proc is not None:
            # Children the process left behind in its session die with it.
            _signal_group(proc.pid, signal.SIGKILL)
        self._close_channel()
        return None if proc is None else proc.returncode

    def _returncode(self) -> int | None:
        if self._proc is None:
            return None
        code = self._proc.poll()
        if code is None:
            return None
        if self._exited_at is None:
            self._exited_at = time.monotonic()
        # Report the exit only after its last messages were read, so "finished" precedes it.
        reader_done = self._reader is None or not self._reader.is_alive()
        if not reader_done and time.monotonic() - self._exited_at < _DRAIN_TIMEOUT_S:
            return None
        return code

    def _read(self, channel: Channel) -> None:
        try:
            for message in channel.messages():
                message["at"] = time.time()
                self._inbox.append(message)
        except (OSError, ValueError):
            pass  # channel closed under us by stop()
        self._eof_at = time.time()

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _log_tail(self) -> str:
        try:
            with open(self._log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                start = max(self._log_offset, fh.tell() - _LOG_TAIL_BYTES)
                fh.seek(start)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
