"""The reaper kills a run's marked processes when its controller dies, and only those."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

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


def test_sweep_takes_what_a_marked_session_leader_started_without_the_mark() -> None:
    """A training process drops the token from the environment it hands on; its session gives it away."""
    script = textwrap.dedent("""
        import os, subprocess, sys, time
        del os.environ["ORCH_RUN_TOKEN"]
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    leader = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, RUN_TOKEN_ENV: "tok-s"},
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    child_pid = int(leader.stdout.readline())
    unmarked = _sleeper(dict(os.environ))  # a session of its own, not the run's
    try:
        assert marked_pids("tok-s", exclude=set()) == [leader.pid], "the child carries no mark"
        killed, alive = sweep(["tok-s"], exclude=set())
        assert killed == {leader.pid, child_pid} and alive == []
        assert wait_gone([child_pid], timeout=10) == []
        assert unmarked.poll() is None
    finally:
        for proc in (leader, unmarked):
            proc.kill()
            proc.wait()


def test_ray_agents_named_after_the_runs_ray_directory_are_swept(tmp_path) -> None:
    """Ray's agents can lose the token; the reaper also kills whatever runs from the run's Ray directory:
    named on its command line, or (retitled, ``ray::DashboardAgent``) with its log there open."""
    from orchestrator.controller.reaper import ray_temp_dir

    script = textwrap.dedent("""
        import subprocess, sys, time
        from orchestrator.controller.reaper import Reaper, RUN_TOKEN_ENV, ray_temp_dir
        import os
        Reaper()
        tmp = ray_temp_dir(os.environ[RUN_TOKEN_ENV])
        tmp.mkdir()
        env = {k: v for k, v in os.environ.items() if k != RUN_TOKEN_ENV}
        agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--session-dir={tmp}/session_x"],
                                 env=env, start_new_session=True)
        retitled = subprocess.Popen(
            [sys.executable, "-c", "import os, time; log = open(os.environ['LOG'], 'w'); time.sleep(60)"],
            env={**env, "LOG": f"{tmp}/dashboard_agent.log"}, start_new_session=True)
        while not os.path.exists(f"{tmp}/dashboard_agent.log"):
            time.sleep(0.01)
        print(agent.pid, retitled.pid, tmp, flush=True)
        time.sleep(60)
    """)
    controller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    agent_pid, retitled_pid, tmp = controller.stdout.readline().split()
    assert str(ray_temp_dir("x")).startswith("/tmp/orch-ray-") and len(tmp) < 40
    os.kill(controller.pid, signal.SIGKILL)
    controller.wait(timeout=10)
    assert wait_gone([int(agent_pid)], timeout=15) == [], "an agent without the token outlived the run"
    assert wait_gone([int(retitled_pid)], timeout=15) == [], "a retitled agent with its log open outlived the run"
    deadline = time.monotonic() + 15  # removed once the sweep has found nothing more
    while os.path.exists(tmp) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(tmp), "the run's Ray directory is removed"


def test_a_run_killed_with_its_reaper_leaves_a_ray_directory_the_next_run_removes() -> None:
    from orchestrator.controller import ray_session
    from orchestrator.controller.reaper import ray_temp_dir

    stale, busy, fresh = (ray_temp_dir(f"test{name}{os.getpid()}") for name in ("stale", "busy", "fresh"))
    for path in (stale, busy, fresh):
        path.mkdir()
    # Running before its directory looks old: any run starting meanwhile (a test's) sees it busy.
    still_running = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)", f"--session-dir={busy}/s"],
        stdout=subprocess.PIPE, text=True)
    # Until it has exec'd, its command line is this test's: the sweep must see the one it runs from.
    assert still_running.stdout.readline() == "up\n"
    for path in (stale, busy):
        os.utime(path, (0, 0))  # long ago
    try:
        ray_session._remove_stale_temp_dirs()
        assert not stale.exists(), "nothing runs from it: removed"
        assert busy.exists(), "a process still runs from it: kept"
        assert fresh.exists(), "a run that is just starting: kept"
    finally:
        still_running.kill()
        still_running.communicate(timeout=10)
        for path in (busy, fresh):
            path.rmdir()
