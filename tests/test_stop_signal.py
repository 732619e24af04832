"""A rank's reading of SIGTERM (orchestrator/worker/stop_signal.py), on a real process sent real signals:
a scheduler's (its agent dies of the same signal) makes it save alone; its agent's, or a SIGTERM alone,
ends it as before; its agent gone without one ends it at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.helpers import REPO

CHILD = """
import sys, time
from orchestrator.worker.stop_signal import StopSignals
signals = StopSignals(lambda: print("saving alone", flush=True) or True, lambda: False, lambda: 0.5)
signals.install()
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "stop":
        signals.agent_stops()
    elif line.strip() == "gone":
        signals.agent_gone()
time.sleep(30)
"""


def _start() -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def _say(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(word + "\n")
    proc.stdin.flush()


def test_sigterm_then_the_agent_gone_saves_alone_within_its_deadline() -> None:
    proc = _start()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    _say(proc, "gone")
    assert proc.stdout is not None and proc.stdout.readline() == "saving alone\n"
    assert proc.wait(timeout=10) == 1, "the save did not end the process within its deadline: it exits"


def test_the_agent_gone_first_and_sigterm_right_after_is_the_same_scheduler_stop() -> None:
    proc = _start()
    _say(proc, "gone")
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout is not None and proc.stdout.readline() == "saving alone\n"
    proc.wait(timeout=10)


def test_the_agent_s_own_sigterm_ends_the_process_at_once() -> None:
    proc = _start()
    _say(proc, "stop")
    time.sleep(0.05)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM and time.monotonic() - started < 0.5


def test_a_sigterm_alone_ends_the_process_as_before_after_its_grace() -> None:
    proc = _start()
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM
    assert 0.9 < time.monotonic() - started < 3


def test_the_agent_gone_without_sigterm_ends_the_process() -> None:
    proc = _start()
    started = time.monotonic()
    _say(proc, "gone")
    assert proc.wait(timeout=10) == 1 and time.monotonic() - started < 1
    assert proc.stdout is not None and "saving" not in proc.stdout.read()
