"""Suite-wide check: when the test session ends, no process any test started is still running.

Every process the suite starts inherits ``SUITE_MARK`` in its environment (the orchestrator's
reapers look for their own token, a user's ``ps`` for anything at all); at the end the suite
waits a bounded time for them to go, then fails, naming and killing the ones left.

Also the session's shared reference runs (``reference_run``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

SUITE_MARK = "ORCHESTRATOR_TEST_SUITE"
_TOKEN = uuid.uuid4().hex
os.environ[SUITE_MARK] = _TOKEN
_GRACE_S = 30.0  # reapers and Ray's own shutdown finish in seconds; this bounds a slow one


def suite_processes() -> dict[int, str]:
    """pid -> command line of the live processes carrying this session's mark, except this one."""
    needle = f"{SUITE_MARK}={_TOKEN}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited; only its parent's wait is missing
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    deadline = time.monotonic() + _GRACE_S
    left = suite_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = suite_processes()
    if not left:
        return
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = "\n".join(f"  {pid}: {cmd[:200]}" for pid, cmd in sorted(left.items()))
    message = f"{len(left)} process(es) started by the test suite still ran {_GRACE_S:.0f}s after it ended (killed now):\n{lines}"
    if reporter is not None:
        reporter.write_sep("=", "processes left behind", red=True)
        reporter.write_line(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, subprocess.CompletedProcess[str]]]:
    """``reference_run(*overrides)``: (run directory, CLI result) of an uninterrupted run of the local
    config with ``overrides``, made once per session. Tests that compare losses with a clean run share
    it (the learning rate is constant, so one long run serves any shorter one); the contract test
    inspects the default one (``tests.helpers.REFERENCE``)."""
    from tests.helpers import cli, launch_args

    runs: dict[tuple[str, ...], tuple[Path, subprocess.CompletedProcess[str]]] = {}

    def run(*overrides: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
        if overrides not in runs:
            run_dir = tmp_path_factory.mktemp("reference") / "run"
            runs[overrides] = run_dir, cli(*launch_args(run_dir, *overrides), timeout=400)
        return runs[overrides]

    return run
