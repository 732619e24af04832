"""Is a thread making progress? Where it is, and for how long it has been blocked.

A rank that reports no steps (a script, or any rank before its first step) shows progress only
through its main thread. Its call stack alone cannot tell a blocked thread from a busy one: a
loop on one line, or a long native call (tokenising a corpus, a big matrix product), keeps the
stack still while it works. So a thread counts as moving when its stack changed *or* it used
CPU; one that sits in a collective or on a lock does neither. A thread spin-waiting on a GPU
(CUDA's default wait when cores are free) uses CPU, and looks busy here: GPU hangs are left to
the step timeout and NCCL's own watchdog.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

# Modules whose frames mean "waiting in a collective": a rank there waits for its peers.
_COLLECTIVE_PATHS = (os.sep + os.path.join("torch", "distributed"), os.sep + os.path.join("deepspeed", "comm"))
# CPU time the thread must use, as a fraction of the time between two samples, to count as busy.
# A blocked thread uses none at all; a Python loop that sleeps most of the time uses about 5%.
BUSY_CPU_FRACTION = 0.01


@dataclass
class Sample:
    """One look at the watched thread: where it is (``file:line in function``), whether it waits in
    a collective, and for how long it has been still (stack unchanged, no CPU used)."""

    where: str
    in_collective: bool
    still_s: float


class ThreadWatch:
    """Samples one thread (by ``threading`` ident): call :meth:`sample` every few tens of milliseconds."""

    def __init__(self, ident: int, clock: Any = time.monotonic) -> None:
        self._ident = ident
        self._clock = clock
        try:
            self._cpu_clock: int | None = time.pthread_getcpuclockid(ident)
        except (AttributeError, OSError):
            self._cpu_clock = None  # no per-thread CPU clock here: the stack alone decides
        self._stack: tuple[tuple[str, int], ...] = ()
        self._cpu = self._cpu_time()
        self._at = self._moved = clock()

    def sample(self) -> Sample:
        frame = sys._current_frames().get(self._ident)
        now, cpu = self._clock(), self._cpu_time()
        stack = _stack_of(frame)
        busy = cpu is not None and self._cpu is not None and cpu - self._cpu >= BUSY_CPU_FRACTION * (now - self._at)
        if stack != self._stack or busy:
            self._moved = now
        self._stack, self._cpu, self._at = stack, cpu, now
        where, in_collective = _describe_stack(frame)
        return Sample(where=where, in_collective=in_collective, still_s=now - self._moved)

    def _cpu_time(self) -> float | None:
        if self._cpu_clock is None:
            return None
        try:
            return time.clock_gettime(self._cpu_clock)
        except OSError:
            return None  # the thread has exited


def raised_in_collective(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside a collective (a frame of torch.distributed or deepspeed.comm):
    usually a peer's failure seen from here, not this rank's own."""
    return any(any(part in entry.filename for part in _COLLECTIVE_PATHS)
               for entry in traceback.extract_tb(exc.__traceback__))


def _describe_stack(frame: Any) -> tuple[str, bool]:
    """The innermost frame as ``file:line in function``, and whether the stack is inside a collective."""
    if frame is None:
        return "", False
    where = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
    in_collective = False
    while frame is not None:
        if any(part in frame.f_code.co_filename for part in _COLLECTIVE_PATHS):
            in_collective = True
            break
        frame = frame.f_back
    return where, in_collective


def _stack_of(frame: Any) -> tuple[tuple[str, int], ...]:
    """Every frame's code and line: it stays the same only while the thread makes no progress."""
    stack = []
    while frame is not None:
        stack.append((frame.f_code.co_filename, frame.f_lineno))
        frame = frame.f_back
    return tuple(stack)
