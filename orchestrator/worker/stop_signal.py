"""A rank's answer to a SIGTERM that reached its node agent too: save where it is, alone.

Slurm (``scancel``, a preemption, ``scontrol requeue``) and systemd signal every process of a job
at once: the ranks, and Ray's daemons and the node agents too, which die of it. The controller
handles the signal and lives on, but it can no longer reach the ranks to ask for a checkpoint. So a
rank that sees SIGTERM and then loses its agent saves on its own: every rank does, at the same
step (agreed in the all-reduce that ``TrainContext.should_checkpoint`` sends one step ahead), writes
its report next to its files, where the controller finds it without Ray (``checkpoint/store.py``),
and exits. The rules, in the order they are checked:

- the agent stops this process (a ``Stop`` word before its SIGTERM): exit, as before;
- SIGTERM, then the agent gone (its channel closed, or the parent died: ``SIGHUP``, this process's
  parent-death signal) within ``TERM_GRACE_S``: save alone;
- SIGTERM, and the controller asked for a checkpoint meanwhile: carry on (the controller leads);
- SIGTERM alone (someone signalled this rank, or the zygote that forked it died): die of it, as
  before;
- the agent gone without SIGTERM (within ``GONE_GRACE_S``, for a scheduler's signal in flight): exit.

Saving alone is bounded by ``fault_tolerance.preempt_timeout_s``; a process with nothing to save
(a spare, a rank between attempts) exits at once. Scripts keep SIGTERM's default: they run their
own handlers, as under torchrun (``process.py`` restores it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

TERM_GRACE_S = 1.0  # a scheduler's SIGTERM kills the agent well within this
GONE_GRACE_S = 0.2  # the agent died first of the same signal: ours is on its way
_POLL_S = 0.02


class StopSignals:
    """Watches this process's SIGTERM and its agent's presence; decides as the module says.

    ``save_alone()`` switches the training loop to saving on its own and returns whether there is
    anything to save (False: exit now); ``controller_leads()`` says whether the controller asked for
    a checkpoint since. Call :meth:`install` from the main thread before other threads start."""

    def __init__(self, save_alone: Callable[[], bool], controller_leads: Callable[[], bool],
                 save_timeout_s: Callable[[], float]) -> None:
        self._save_alone = save_alone
        self._controller_leads = controller_leads
        self._save_timeout_s = save_timeout_s
        self._term = threading.Event()
        self._gone = threading.Event()
        self._stopped_by_agent = threading.Event()
        self._alone = threading.Lock()  # one decision to save alone
        self._pipe_r, self._pipe_w = os.pipe()

    def install(self) -> None:
        """Catch SIGTERM and SIGHUP without waiting for the main thread: their C handlers write the
        signal's number to a pipe the instant it arrives, and a thread of ours reads it (a Python
        handler runs only when the main thread is between bytecodes, not inside a collective)."""
        os.set_blocking(self._pipe_w, False)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _noop)
        signal.set_wakeup_fd(self._pipe_w, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="stop-signals", daemon=True).start()

    def restore_default(self) -> None:
        """A script runs now: SIGTERM is its own again (its handlers, or death), as under torchrun."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def agent_stops(self) -> None:
        """The agent said it is stopping this process: the SIGTERM that follows is not a scheduler's."""
        self._stopped_by_agent.set()

    def agent_gone(self) -> None:
        """The control channel closed: the agent died, or closed it to end this process."""
        self._gone.set()
        if self._stopped_by_agent.is_set() or not self._term.wait(GONE_GRACE_S):
            os._exit(1)
        self._go_alone()

    def _watch(self) -> None:
        while True:
            for byte in os.read(self._pipe_r, 64):
                if byte == signal.SIGTERM and not self._term.is_set():
                    self._term.set()
                    threading.Thread(target=self._on_term, name="sigterm", daemon=True).start()
                elif byte == signal.SIGHUP:
                    threading.Thread(target=self.agent_gone, name="parent-gone", daemon=True).start()

    def _on_term(self) -> None:
        deadline = time.monotonic() + TERM_GRACE_S
        while time.monotonic() < deadline:
            if self._stopped_by_agent.is_set():
                _die_of(signal.SIGTERM)
            if self._gone.is_set():
                return  # agent_gone decides
            time.sleep(_POLL_S)
        if not self._controller_leads():
            _die_of(signal.SIGTERM)

    def _go_alone(self) -> None:
        if not self._alone.acquire(blocking=False):
            return
        print("orchestrator: SIGTERM, and the node agent is gone with it: saving a checkpoint with the other ranks, "
              "then exiting", file=sys.stderr, flush=True)
        if not self._save_alone():
            os._exit(1)
        time.sleep(self._save_timeout_s())
        print(f"orchestrator: the checkpoint was not saved within {self._save_timeout_s():.0f}s; exiting",
              file=sys.stderr, flush=True)
        os._exit(1)


def _noop(_signum: int, _frame: object) -> None:
    """A Python-level handler: what makes the interpreter write to the wakeup pipe."""


def _die_of(sig: int) -> None:
    """End as the default action of ``sig`` would (the agent sees the same exit status as before).
    From any thread: Python's ``signal.signal`` works in the main thread only, libc's anywhere."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal(sig, ctypes.c_void_p(0))  # SIG_DFL
    os.kill(os.getpid(), sig)
    time.sleep(1.0)
    os._exit(128 + sig)
