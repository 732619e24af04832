"""Child processes this program starts and stops (the bottom layer: the CLI, the dev clusters and the
launchers use it): one started with its output in a log and awaited until it says it is ready, with
the log's last lines when it is not; one stopped with a polite signal, SIGKILL if it does not exit
in time, and reaped either way."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.errors import ClusterError

_POLL_S = 0.2
_GIVE_UP_STOP_S = 5.0


def start_logged(command: list[str], log: Path, ready: Callable[[bytes], bool], what: str, timeout_s: float,
                 *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 new_session: bool = False) -> subprocess.Popen:
    """Start ``command`` with its output appended to ``log``; return it once ``ready`` says yes to what it
    has written there (this start's output only: a log kept across starts says nothing of this one).
    Where it exits first, or is not ready within ``timeout_s``, raise :class:`ClusterError` naming
    ``what``, with the log's last lines; however the wait ends without it ready, it is stopped."""
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=new_session)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise ClusterError(f"{what} exited with code {proc.returncode}; see {log}:\n{tail(log)}")
            with open(log, "rb") as written:
                written.seek(start)
                if ready(written.read()):
                    return proc
            if time.monotonic() >= deadline:
                raise ClusterError(f"{what} did not start within {timeout_s:.0f}s; see {log}:\n{tail(log)}")
            time.sleep(_POLL_S)
    except BaseException:
        stop(proc, _GIVE_UP_STOP_S)  # not started after all (or the wait was interrupted): nothing stays behind
        raise


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of the file at ``path`` ("" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(proc: subprocess.Popen | None, timeout_s: float, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``proc`` unless it has exited; SIGKILL it after ``timeout_s``; reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
