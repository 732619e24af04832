"""Stopping a child process this program started: a polite signal first, SIGKILL if it does not
exit in time, and reaped either way (the bottom layer: the launchers and the CLI use it)."""

from __future__ import annotations

import signal
import subprocess


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
