"""Progress reports from training code to the controller, with or without a context object.

A training process has one :class:`Reporter` on its control channel. ``TrainContext.report`` uses
it, and so do the plain functions here (``orchestrator.report``), which scripts call without a
context: outside the orchestrator (under torchrun, or plain ``python``) they do nothing, so the
same script runs anywhere. Kept free of torch: importing ``orchestrator`` must stay cheap.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from orchestrator.messages import FaultInjected, Resumed, Saving, ScriptCheckpoint, Step
from orchestrator.worker import faults as fault_injection
from orchestrator.worker.channel import Channel

_STEP_METRICS = ("tokens", "lr", "grad_norm", "flops")


class Reporter:
    """Sends one rank's reports; also fires the rank's rehearsed faults (``--inject-fault``)."""

    def __init__(self, channel: Channel, rank: int, faults: list[dict[str, Any]] | None = None) -> None:
        self._channel = channel
        self.rank = rank
        self.faults = list(faults or [])
        self.last_step: int | None = None
        self._last_at = time.perf_counter()
        self._lock = threading.Lock()  # a callback thread and the main thread may both report

    def step(self, step: int, loss: float | None = None, *, step_time_s: float | None = None,
             total_steps: int | None = None, **metrics: float | None) -> None:
        """A finished step; ``step_time_s`` defaults to the time since the previous report."""
        with self._lock:
            now = time.perf_counter()
            if step_time_s is None:
                step_time_s = now - self._last_at
            self._last_at = now
            known = {k: float(metrics.pop(k)) for k in _STEP_METRICS if metrics.get(k) is not None}
            extra = {k: float(v) for k, v in metrics.items() if v is not None}
            self._channel.send(Step(step=int(step), loss=None if loss is None else float(loss),
                                    step_time_s=float(step_time_s), total=total_steps, **known, extra=extra))
            self.last_step = int(step)
        for fault in fault_injection.due(self.faults, self.rank, step):
            self._channel.send(FaultInjected(**fault))
            fault_injection.inject(fault["kind"], step)

    def resumed(self, step: int, tag: str, source: str = "disk") -> None:
        """Training continues after ``step``, restored from checkpoint ``tag`` (or from memory)."""
        with self._lock:
            self._channel.send(Resumed(step=int(step), tag=tag, source=source))
            self.last_step = int(step)
            self._last_at = time.perf_counter()

    def checkpoint(self, step: int, path: str) -> None:
        """The training code saved a checkpoint of its own at ``path``."""
        with self._lock:
            self._channel.send(ScriptCheckpoint(step=int(step), path=str(path)))
            self._last_at = time.perf_counter()

    def busy(self) -> None:
        """Still working (a long save or evaluation), not hung."""
        self._channel.send(Saving())

    def restart_clock(self) -> None:
        """The next step's time starts now (after a save or a resume, which are not step time)."""
        self._last_at = time.perf_counter()


_active: Reporter | None = None


def activate(reporter: Reporter | None) -> None:
    """Make ``reporter`` the one the module-level functions use (None: they do nothing)."""
    global _active
    _active = reporter


def active() -> Reporter | None:
    """This process's reporter, or None outside an orchestrator rank."""
    return _active


def report(step: int, loss: float | None = None, *, step_time_s: float | None = None,
           total_steps: int | None = None, **metrics: float | None) -> None:
    """Report a finished optimizer step from any training code; a no-op outside the orchestrator.

    ``loss`` becomes the step event's loss (omit it on steps without one); ``total_steps`` (the
    run's planned steps) drives the progress bar. Keyword metrics: ``tokens`` (global tokens in
    the step), ``lr``, ``grad_norm``, ``flops``, and any other number under its own name. Every
    report is also the rank's heartbeat: once a rank reports, a gap longer than
    ``fault_tolerance.hang_timeout_s`` between reports is a hang.
    """
    if _active is not None:
        _active.step(step, loss, step_time_s=step_time_s, total_steps=total_steps, **metrics)


def report_resumed(step: int, tag: str) -> None:
    """Report that training resumed after ``step`` from checkpoint ``tag``; a no-op outside the orchestrator."""
    if _active is not None:
        _active.resumed(step, tag)


def report_checkpoint(step: int, path: str) -> None:
    """Report a checkpoint the training code saved itself; a no-op outside the orchestrator."""
    if _active is not None:
        _active.checkpoint(step, path)


def report_busy() -> None:
    """Say this rank is busy (a long evaluation or save), not hung; a no-op outside the orchestrator."""
    if _active is not None:
        _active.busy()
