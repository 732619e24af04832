"""orchestrator/children.py: a child started with its output in a log, awaited until it is ready."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orchestrator.children import start_logged, stop
from orchestrator.errors import ClusterError
from tests.helpers import wait_gone


def test_ready_is_judged_on_this_starts_output_only(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    log.write_bytes(b"Ray runtime started\n")  # a previous start's: says nothing of this one
    with pytest.raises(ClusterError, match=r"(?s)the node did not start within 1s; see .*node.log:\n.*waiting"):
        start_logged([sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(60)"], log,
                     lambda out: b"Ray runtime started" in out, "the node", 1.0)
    proc = start_logged([sys.executable, "-c", "import time; print('Ray runtime started', flush=True); time.sleep(60)"],
                        log, lambda out: b"Ray runtime started" in out, "the node", 30.0)
    stop(proc, 5.0)
    assert proc.returncode is not None


def test_a_child_that_exits_first_is_named_with_its_last_lines(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match=r"the node exited with code 3; see .*:\nport taken"):
        start_logged([sys.executable, "-c", "import sys; print('port taken'); sys.exit(3)"], tmp_path / "n.log",
                     lambda out: False, "the node", 30.0)


def test_a_child_not_ready_in_time_is_stopped(tmp_path: Path) -> None:
    log = tmp_path / "n.log"
    with pytest.raises(ClusterError):
        start_logged([sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)"], log,
                     lambda out: False, "the node", 1.0)
    assert wait_gone([int(log.read_text().split()[0])], timeout=5) == []
