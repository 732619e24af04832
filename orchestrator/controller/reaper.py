"""Leaves nothing behind when a controller ends, even by SIGKILL.

Ray's agent processes outlive a raylet that was killed (they notice, but
hang on exit), so a SIGKILLed controller would leave them running. Before
starting Ray the controller marks its environment with a run token and
starts this reaper in its own session, holding the read end of a pipe. When
the controller ends in any way the pipe closes; the reaper then SIGKILLs
every process whose environment carries the token (Ray's services and
workers and the training processes all inherited it) or whose command line
names the embedded Ray's temporary directory or that holds a file under it
open (Ray's agents, which retitle themselves over their command line and
environment), again until none is left, and removes that directory. A training process leads its own session and
hides the token from what it starts; the sweep takes whole sessions led by
marked processes.

Run as ``python -m orchestrator.controller.reaper TOKEN CONTROLLER_PID``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

RUN_TOKEN_ENV = "ORCH_RUN_TOKEN"
_SWEEP_DEADLINE_S = 10.0
_RELEASE_TIMEOUT_S = 15.0


class Reaper:
    """Handle on the reaper process; :meth:`release` at a clean exit."""

    def __init__(self) -> None:
        token = uuid.uuid4().hex
        # Every process started from here on inherits the mark.
        os.environ[RUN_TOKEN_ENV] = token
        read_end, self._write_end = os.pipe()  # not inheritable: only we hold the write end
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.controller.reaper", token, str(os.getpid())],
            stdin=read_end,
            start_new_session=True,  # a Ctrl-C in the terminal must not reach it
        )
        os.close(read_end)

    def release(self) -> None:
        """Close the pipe and wait for the final sweep."""
        if self._write_end >= 0:
            os.close(self._write_end)
            self._write_end = -1
        try:
            self._proc.wait(timeout=_RELEASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _pids_where(exclude: set[int], test: Callable[[Path], bool]) -> list[int]:
    """Pids not in ``exclude`` whose ``/proc/PID`` passes ``test`` (those it cannot read are skipped:
    gone, or not ours to read)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            if test(entry):
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def marked_pids(token: str, exclude: set[int], env: str = RUN_TOKEN_ENV) -> list[int]:
    """Pids whose initial environment holds ``env=token``."""
    marker = f"{env}={token}".encode()
    return _pids_where(exclude, lambda proc: marker in (proc / "environ").read_bytes().split(b"\0"))


def ray_temp_dir(token: str) -> Path:
    """The embedded Ray's temporary directory for the run marked ``token``: short (Ray's socket paths
    under it must fit AF_UNIX's 107 bytes, whatever TMPDIR is) and known to the reaper."""
    return Path("/tmp") / f"orch-ray-{token[:16]}"


def pids_running_from(directory: Path, exclude: set[int]) -> list[int]:
    """Pids whose command line names ``directory`` (Ray's services get their session directory as an
    argument) or that hold a file under it open: Ray's agents retitle themselves (``ray::DashboardAgent``,
    over their command line and environment) but keep their logs there open."""
    needle, prefix = str(directory).encode(), str(directory).rstrip("/") + "/"

    def runs_from(proc: Path) -> bool:
        return needle in (proc / "cmdline").read_bytes() or any(
            os.readlink(fd).startswith(prefix) for fd in (proc / "fd").iterdir())

    return _pids_where(exclude, runs_from)


def session_members(leaders: set[int], exclude: set[int]) -> list[int]:
    """Pids in the sessions led by ``leaders`` (the leaders included when alive)."""
    # /proc/PID/stat after the command's closing parenthesis: state, ppid, pgrp, session, ...
    return _pids_where(exclude, lambda proc: int((proc / "stat").read_bytes().rsplit(b")", 1)[1].split()[3]) in leaders)


def sweep(tokens: list[str], exclude: set[int], env: str = RUN_TOKEN_ENV,
          running_from: Path | None = None) -> tuple[set[int], list[int]]:
    """SIGKILL processes marked ``env=TOKEN`` (any of ``tokens``), and those whose command line names
    ``running_from``, until none is left or the deadline passes; returns the pids killed and those
    still alive."""
    killed: set[int] = set()
    deadline = time.monotonic() + _SWEEP_DEADLINE_S
    while True:
        marked = {pid for token in tokens for pid in marked_pids(token, exclude, env)}
        # A training process leads its own session and drops the mark from the environment it hands
        # on: what the training code started is found through that session.
        found = marked | set(session_members(marked, exclude))
        if running_from is not None:
            found |= set(pids_running_from(running_from, exclude))
        pids = sorted(found)
        if not pids or time.monotonic() >= deadline:
            return killed, pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    token, controller_pid = argv[0], int(argv[1])
    sys.stdin.buffer.read()  # returns at EOF: the controller is gone or done
    exclude = {os.getpid(), controller_pid}
    # Ray's agents can outlive their raylet with an environment of their own (no token), and a dying
    # raylet may still start one while the sweep runs: they name the run's Ray directory on their
    # command line or keep their logs there open, and are swept with the marked processes until none is left.
    temp_dir = ray_temp_dir(token)
    sweep([token], exclude, running_from=temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
