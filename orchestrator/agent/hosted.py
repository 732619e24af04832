"""The processes a node agent owns: training processes and the node's zygote.

:class:`HostedProcess` is one child (started with ``subprocess``, or forked by the
:class:`Zygote`), its control channel and what it reported; the zygote forks warm
spares and ranks whose imports are already done. A zygote the controller started
ahead (``controller/zygote_ahead.py``) is adopted instead: reached on its abstract
socket, its exit seen through a pidfd.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator import node_memory
from orchestrator.agent.channels import ChannelReader
from orchestrator.installation import with_interpreter_tools
from orchestrator.messages import (
    Alive,
    Exited,
    Fork,
    Forked,
    MalformedMessage,
    Message,
    Prepare,
    Prepared,
    RankStatus,
    Ready,
    Report,
    Start,
    Step,
    Stop,
)
from orchestrator.run_dir import append_fd
from orchestrator.worker.channel import CONTROL_FD_ENV, Channel, peer_credentials
from orchestrator.worker.process import PARENT_PID_ENV
from orchestrator.worker.zygote import zygote_env

_LOG_TAIL_BYTES = 8192
# How long after a process exits we wait for its last reports to be read.
_DRAIN_TIMEOUT_S = 2.0
# An adopted process is not our child: its exit status is its parent's to know. This stands for it.
ADOPTED_EXIT = 255
# A prepared zygote forks in milliseconds. A rank forked inside an agent call waits at most this:
# the controller's start of an attempt waits for that call.
_FORK_TIMEOUT_S = 2.0
_AHEAD_CONNECT_S = 10.0  # a zygote started ahead listens within a Python start-up of being started


class HostedProcess:
    """One process this actor owns (a training process, or the node's zygote), its control
    channel and what it reported.

    Started with ``subprocess`` (``module`` run with ``env``), or forked by ``zygote``
    (a forked process's exit status comes from the zygote, :meth:`exited`), or ``adopted``: a
    process of this user's already running, given as its connected control socket and pid.
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        header: str,
        *,
        module: str = "orchestrator.worker.process",
        zygote: Zygote | None = None,
        on_message: Callable[[Message], None] | None = None,
        on_report: Callable[[HostedProcess, Report | None], None] | None = None,
        adopted: tuple[socket.socket, int] | None = None,
    ) -> None:
        """``on_message`` takes every message instead of the inbox (the zygote's); ``on_report`` is
        told of each report as it arrives, and (with None) of the channel closing."""
        parent_end, child_end = (adopted[0], None) if adopted else socket.socketpair()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None  # an adopted process's: readable once it has exited
        self._zygote = zygote
        self.reported_returncode: int | None = None
        self._oom_kills_at_start = node_memory.oom_kills()
        self.warm = False  # a spare that finished its warm-up
        with open(append_fd(log_path), "ab") as log:
            log.write(f"=== {header} ===\n".encode())
            log.flush()
            self.log_offset = log.tell()
            if adopted is not None:
                self.pid = adopted[1]
                self._pidfd = os.pidfd_open(self.pid)
            elif zygote is not None:
                self.pid = zygote.fork(env, log_path, child_end.fileno())
            else:
                full_env = with_interpreter_tools(
                    {**os.environ, **env, CONTROL_FD_ENV: str(child_end.fileno()), PARENT_PID_ENV: str(os.getpid())}
                )
                self.popen = subprocess.Popen(
                    [sys.executable, "-m", module],
                    env=full_env,
                    pass_fds=(child_end.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Its own session: a Ctrl-C in the user's terminal reaches the controller,
                    # which stops ranks in order, instead of interrupting them mid-collective.
                    start_new_session=True,
                )
                self.pid = self.popen.pid
        if child_end is not None:
            child_end.close()
        self._on_message = on_message
        self._on_report = on_report
        self.exit_reported = False  # a status has carried its exit status
        self.channel = Channel(parent_end)
        self.inbox: collections.deque[Report] = collections.deque()
        self.latest_step: Step | None = None  # what the node's beat says of its progress
        self.stepping_in: int | None = None  # the attempt of the last step it sent
        self.alive_at = time.time()
        self.where = ""
        self.in_collective = False
        self.moved_at = self.alive_at
        self.eof_at: float | None = None
        self.exited_at: float | None = None
        # The attempt it was last told to train in (a start or a rejoin sent), and the last attempt whose
        # training function it said it left (its report names it). By attempt, not by time: a survivor
        # is sent its rejoin before it has left the attempt it was interrupted in.
        self.training_in: int | None = None
        self.left_attempt: int | None = None
        self._reader = ChannelReader.shared()
        self._reader.add(self.channel, self._on_line, self._on_close)

    def exited(self, returncode: int) -> None:
        """The zygote reaped this (forked) process."""
        self.reported_returncode = returncode

    def poll_exit(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        if self._pidfd is not None:
            if self.reported_returncode is None and select.select([self._pidfd], [], [], 0)[0]:
                self.reported_returncode = ADOPTED_EXIT
            return self.reported_returncode
        if self.reported_returncode is None and self.eof_at is not None and not self._zygote.alive():
            # Its zygote (which would report the exit) is gone, and it died with it (PDEATHSIG).
            self.reported_returncode = -signal.SIGKILL
        return self.reported_returncode

    def send(self, message: Message) -> bool:
        try:
            self.channel.send(message)
        except OSError:
            return False  # it died; its exit will be polled
        if isinstance(message, Start):  # a rejoin too
            self.training_in = message.attempt
        return True

    def has_left(self, attempt: int | None) -> bool:
        """Whether it said it left its training function in ``attempt`` or later (None: in any attempt)."""
        return self.left_attempt is not None and (attempt is None or self.left_attempt >= attempt)

    @property
    def exit_unreported(self) -> bool:
        """It closed its channel, and no status has carried its exit status yet."""
        return self.eof_at is not None and not self.exit_reported

    def status(self) -> RankStatus:
        """New reports, liveness, and the exit status once the process has ended."""
        reports = [self.inbox.popleft() for _ in range(len(self.inbox))]
        code = self._returncode()
        self.exit_reported = code is not None
        return RankStatus(
            pid=self.pid, reports=reports, returncode=code, alive_at=self.alive_at, where=self.where,
            in_collective=self.in_collective, moved_at=self.moved_at,
            # The socket closes the moment the process dies: the best clock for "when".
            exited_at=(self.eof_at or time.time()) if code is not None else None,
            log_tail=self._log_tail() if code else "",
            oom=self._oom(code),
        )

    def _oom(self, code: int | None) -> str:
        """Its node's memory, where it was SIGKILLed while the kernel's OOM killer was at work ("" otherwise)."""
        if code != -signal.SIGKILL or self._oom_kills_at_start is None:
            return ""
        now = node_memory.oom_kills()
        if now is None or now <= self._oom_kills_at_start:
            return ""
        return f"its node has {node_memory.memory().describe()}"

    def signal(self, sig: int) -> None:
        if self.poll_exit() is None:
            _signal_group(self.pid, sig)

    def terminate(self) -> None:
        """SIGTERM the process and anything it started; a training process is told first that the
        signal is ours (it takes a scheduler's SIGTERM for a preemption: ``worker/stop_signal.py``)."""
        if self.poll_exit() is None:
            if self._on_message is None:  # not the zygote
                self.send(Stop())
            _signal_group(self.pid, signal.SIGTERM)

    def stop(self, timeout_s: float) -> int | None:
        """SIGTERM the process (and anything it started), SIGKILL after ``timeout_s``; reap it."""
        if self.poll_exit() is None:
            self.terminate()
            if not self._wait(timeout_s):
                _signal_group(self.pid, signal.SIGKILL)
                self._wait(timeout_s)
        # Children the process left behind in its session die with it.
        _signal_group(self.pid, signal.SIGKILL)
        self._reader.remove(self.channel)
        self.channel.close()
        code = self.poll_exit()
        if self._pidfd is not None and code is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return code

    def _wait(self, timeout_s: float) -> bool:
        if self.popen is not None:
            try:
                self.popen.wait(timeout=timeout_s)
                return True
            except subprocess.TimeoutExpired:
                return False
        if self._pidfd is not None:
            select.select([self._pidfd], [], [], timeout_s)
            return self.poll_exit() is not None
        deadline = time.monotonic() + timeout_s
        while self.reported_returncode is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the zygote reaps its children every 0.2 s
        return self.reported_returncode is not None

    def _returncode(self) -> int | None:
        code = self.poll_exit()
        if code is None:
            return None
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        # Report the exit only after its last messages were read, so "finished" precedes it.
        if self.eof_at is None and time.monotonic() - self.exited_at < _DRAIN_TIMEOUT_S:
            return None
        return code

    def _on_line(self, message: Message) -> None:
        """A message from the process (on the agent's reader thread)."""
        if self._on_message is not None:
            self._on_message(message)
            return
        now = time.time()
        self.alive_at = now
        if isinstance(message, Alive):
            self.where, self.in_collective = message.where, message.in_collective
            self.moved_at = now - message.still_s
        elif isinstance(message, Report):
            if isinstance(message, Ready):
                self.left_attempt = message.attempt
            self.inbox.append(dataclasses.replace(message, at=now))
            if self._on_report is not None:
                self._on_report(self, message)
        else:
            raise MalformedMessage(f"{message.type!r} is not a report")

    def _on_close(self, error: MalformedMessage | None) -> None:
        """The process closed its channel (it exited), or broke the protocol (``error``)."""
        if error is not None:
            # A bug in the orchestrator itself: the rank fails, and its log (shown with the failure) says why.
            with open(append_fd(self.log_path), "a") as log:
                log.write(f"orchestrator: protocol error from pid {self.pid}: {error}; stopping it\n")
            self.signal(signal.SIGKILL)
        self.eof_at = time.time()
        if self._on_report is not None:
            self._on_report(self, None)

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                start = max(self.log_offset, fh.tell() - _LOG_TAIL_BYTES)
                fh.seek(start)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""


class ZygoteUnavailable(Exception):
    """The zygote cannot fork now: its imports are not done, they failed, or it exited."""


class Zygote:
    """The node's zygote process (``orchestrator.worker.zygote``): forks warm spares."""

    def __init__(self, config: dict[str, Any], env: dict[str, str], log_path: Path,
                 ahead: tuple[str, int] | None = None) -> None:
        """Start the zygote for ``config`` with the node's ``env``; or adopt the one the controller
        started ``ahead`` (its socket name and pid) when it answers there as that process."""
        self._forked: dict[int, HostedProcess] = {}
        self._replies: queue.Queue[Forked] = queue.Queue()
        self._lock = threading.Lock()
        self._forks = 0
        self._exits_lock = threading.Lock()
        self._exited_early: dict[int, int] = {}
        self._prepared = threading.Event()
        self.error = ""  # why it cannot fork, once it has said so
        sock = _connect_ahead(*ahead) if ahead is not None else None
        if sock is not None:
            self.proc = HostedProcess({}, log_path, f"zygote pid {ahead[1]}, adopted from the controller",
                                      on_message=self._on_message, adopted=(sock, ahead[1]))
        else:
            self.proc = HostedProcess(zygote_env(env), log_path, "zygote", module="orchestrator.worker.zygote",
                                      on_message=self._on_message)
        self.proc.send(Prepare(config=config))

    def alive(self) -> bool:
        return self.proc.poll_exit() is None

    def ready(self) -> bool:
        """Prepared, fit to fork, and running."""
        return self._prepared.is_set() and not self.error and self.alive()

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) for the imports; False if it cannot fork (``error`` says why)."""
        deadline = time.monotonic() + timeout_s
        while not self._prepared.wait(0.2):
            if not self.alive():
                self.error = self.error or f"it exited ({self.proc.poll_exit()}) before its imports were done"
                return False
            if time.monotonic() > deadline:
                self.error = f"its imports took over {timeout_s:g}s"
                return False
        return self.ready()

    def fork(self, env: dict[str, str], log_path: Path, control_fd: int) -> int:
        """Fork a spare with ``env`` whose control socket is ``control_fd``; returns its pid.
        Never waits for the imports (:class:`ZygoteUnavailable` instead).

        Replies carry the request's id: a late reply to an earlier fork that timed out is skipped,
        never taken for this one's."""
        if not self.ready():
            raise ZygoteUnavailable(self.error or "its imports are not done yet")
        with self._lock:
            self._forks += 1
            request = self._forks
            self.proc.channel.send_fd(Fork(id=request, env=env, log_path=str(log_path)), control_fd)
            deadline = time.monotonic() + _FORK_TIMEOUT_S
            while True:
                reply = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
                if reply.id == request:
                    return reply.pid

    def adopt(self, proc: HostedProcess) -> None:
        """Report ``proc``'s exit to it from now on (or at once, if it has already exited)."""
        with self._exits_lock:
            code = self._exited_early.pop(proc.pid, None)
            if code is None:
                self._forked[proc.pid] = proc
        if code is not None:
            proc.exited(code)

    def stop(self) -> None:
        self.proc.stop(1.0)
        # Its children die with it (PDEATHSIG); nobody is left to report their exits.
        for proc in self._forked.values():
            if proc.reported_returncode is None:
                proc.exited(-signal.SIGKILL)

    def _on_message(self, message: Message) -> None:
        if isinstance(message, Prepared):
            self.error = message.error
            self._prepared.set()
        elif isinstance(message, Forked):
            self._replies.put(message)
        elif isinstance(message, Exited):
            with self._exits_lock:
                proc = self._forked.pop(message.pid, None)
                if proc is None:  # it died before it was adopted: adopt() reports it
                    self._exited_early[message.pid] = message.returncode
            if proc is not None:
                proc.exited(message.returncode)


def _connect_ahead(name: str, pid: int) -> socket.socket | None:
    """A connection to the zygote started ahead on abstract socket ``name``, if process ``pid`` (ours)
    is what answers there; None otherwise (gone, or never started: this agent starts its own). A
    zygote just started may not listen yet: it is waited for while it lives, ``_AHEAD_CONNECT_S`` at most."""
    deadline = time.monotonic() + _AHEAD_CONNECT_S
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect("\0" + name)
        except OSError:
            sock.close()
            if time.monotonic() > deadline or not _alive(pid):
                return None
            time.sleep(0.05)
            continue
        if peer_credentials(sock) != (pid, os.getuid()):
            sock.close()
            return None
        return sock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
