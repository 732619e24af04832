"""Rehearsed failures (``orchestrator launch --inject-fault KIND@RANK:STEP``): a rank fails on purpose
right after it reports step STEP, so that recovery can be tried before a real failure needs it."""

from __future__ import annotations

import os
import signal
import threading

FAULT_KINDS = ("kill", "hang", "raise", "exit")


def due(faults: list[dict[str, int | str]], rank: int, step: int) -> list[dict[str, int | str]]:
    """The faults ``rank`` must fire after reporting ``step``."""
    return [f for f in faults if f["rank"] == rank and f["step"] == step]


def inject(kind: str, step: int) -> None:
    """Make this process fail the way ``kind`` says."""
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "exit":
        os._exit(3)
    elif kind == "raise":
        raise RuntimeError(f"injected fault at step {step}")
    elif kind == "hang":
        threading.Event().wait()  # alive, but never reports another step
    else:
        raise AssertionError(f"unknown fault kind {kind!r}")
