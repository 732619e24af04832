"""The reaper kills a run's marked processes when its controller dies, and only those."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from orchestrator.controller.reaper import RUN_TOKEN_ENV, marked_pids, sweep
from tests.helpers import wait_gone


def _sleeper(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)


def test_sweep_kills_marked_only() -> None:
    marked = _sleeper({**os.environ, RUN_TOKEN_ENV: "tok-a"})
    other = _sleeper({**os.environ, RUN_TOKEN_ENV: "tok-b"})
    try:
        assert marked_pids("tok-a", exclude=set()) == [marked.pid]
        assert sweep(["tok-a"], exclude=set()) == ({marked.pid}, [])
        assert marked.wait(timeout=10) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for proc in (marked, other):
            proc.kill()
            proc.wait()


def test_controller_sigkill_triggers_sweep() -> None:
    # A stand-in controller: starts the reaper, then a marked child, then waits to be killed.
    script = textwrap.dedent("""
        import subprocess, sys, time
        from orchestrator.controller.reaper import Reaper
        Reaper()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    controller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = int(controller.stdout.readline())
    os.kill(controller.pid, signal.SIGKILL)
    controller.wait(timeout=10)
    assert wait_gone([child_pid], timeout=10) == [], "the reaper did not kill the orphaned child"
